"""The model under evaluation (``model``), feature extraction and its cache (``features``), and the
tasks: each task module holds its math on feature tensors and ends with ``evaluate(model, data,
...)``, which runs it on an ``ImageSet`` and returns a dict of metrics (in % for accuracies and
recalls, rounded by ``percent``) plus counts, ready to be written as JSON."""
