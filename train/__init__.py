"""repae.train: the REPA-E step, the DeepSpeed trainer, its config, data, checkpoints and tools."""
