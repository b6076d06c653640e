"""Evaluation of CLIP-style models (see docs/evaluation.md), in three rooms that import downwards:

- ``data``: the evaluation data sets, each read into an ``ImageSet`` (images with labels or
  captions), their class names and prompt templates, and which reader each ``--dataset`` name uses;
- ``tasks``: the model under evaluation, feature extraction and its cache, and the tasks (zero-shot,
  linear probe, retrieval, clustering, modality gap, the reference's zero-shot suite), each with its
  math on feature tensors next to the function that runs it on a model and an ``ImageSet``;
- ``reports``: what is written from results: records (ours and CLIP_benchmark's), figures, model
  cards, comparison tables, prototype reports.

``reports`` may import ``tasks`` and ``data``, ``tasks`` may import ``data``; never the other way.
"""
