"""repae.train: the REPA-E step and the DeepSpeed trainer (issue 5; empty so far)."""
