"""The evaluation tasks: each module holds a task's math on feature tensors and the function that
runs it on a model and an ``ImageSet``, returning a dict of metrics (in % for accuracies and
recalls) plus counts, ready to be written as JSON."""
