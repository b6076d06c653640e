"""The episodic trainer: episode planning, feature extraction, prototypes, checkpoints, the loop."""
