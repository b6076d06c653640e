"""Evaluation data: every data set read into an ``ImageSet`` (``image_set``) by one image reader
(``images``), with its class names and templates from one place (``prompts``); ``registry`` says
which reader (``readers``, ``suite_layouts``) each ``--dataset`` name uses."""
