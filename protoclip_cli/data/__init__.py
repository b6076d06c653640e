"""Data: the embedded synthetic data set, shard reading and the training pipeline."""
