"""Synthetic StepInputs for the train-step benchmark and the trainer tests (a helper module, not a test)."""

import torch

from repae.train.step import StepInputs


def synthetic_inputs(trainer, seed: int, drop_mask: torch.Tensor | None = None) -> StepInputs:
    """A global batch of random uint8 images, labels, t and noises on the trainer's device, drawn from
    Generator(seed); the label-drop mask is drawn with the model's dropout probability unless given."""
    g = torch.Generator().manual_seed(seed)
    c = trainer.models.sit.module.config
    B, R = trainer.cfg.schedule.global_batch_size, trainer.cfg.data.resolution
    lat = (B, c.in_channels, c.input_size, c.input_size)
    images = torch.randint(0, 256, (B, 3, R, R), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, c.num_classes, (B,), generator=g)
    t, noise = torch.rand(B, generator=g), torch.randn(lat, generator=g)
    if drop_mask is None:
        drop_mask = torch.rand(B, generator=g) < c.class_dropout_prob
    posterior_noise = torch.randn(lat, generator=g)
    dev = trainer.device
    return StepInputs(images=images.to(dev), labels=labels.to(dev), t=t.to(dev), noise=noise.to(dev),
                      drop_mask=drop_mask.to(dev), posterior_noise=posterior_noise.to(dev))
