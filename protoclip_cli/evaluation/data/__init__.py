"""Evaluation data: every data set read into an ``ImageSet``, with its class names and templates."""
