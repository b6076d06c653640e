"""Evaluation of CLIP-style models: zero-shot classification, linear probe, image-text retrieval,
clustering quality and the modality gap, on frozen tower features (see docs/evaluation.md).

The metric modules (``zeroshot``, ``retrieval``, ``linear_probe``, ``clustering``, ``modality``)
work on feature tensors only; ``models``, ``datasets`` and ``features`` turn checkpoints and data
on disk into those tensors.
"""
