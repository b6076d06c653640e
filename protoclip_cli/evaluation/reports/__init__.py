"""What evaluation writes: result records (ours and CLIP_benchmark's), figures, model cards,
comparison tables and prototype reports."""
