"""Synthetic StepInputs for the train-step benchmark (a helper module, not a test)."""

import torch

from repae.train.step import StepInputs


def synthetic_inputs(trainer, seed: int) -> StepInputs:
    g = torch.Generator().manual_seed(seed)
    c = trainer.models.sit.module.config
    B, R = trainer.cfg.schedule.global_batch_size, trainer.cfg.data.resolution
    lat = (B, c.in_channels, c.input_size, c.input_size)
    dev = trainer.device
    return StepInputs(images=torch.randint(0, 256, (B, 3, R, R), generator=g, dtype=torch.uint8).to(dev),
                      labels=torch.randint(0, c.num_classes, (B,), generator=g).to(dev),
                      t=torch.rand(B, generator=g).to(dev), noise=torch.randn(lat, generator=g).to(dev),
                      drop_mask=(torch.rand(B, generator=g) < 0.1).to(dev),
                      posterior_noise=torch.randn(lat, generator=g).to(dev))
