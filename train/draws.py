"""The random draws of a step, independent of the world size (docs/METHOD.md#world-size-independence).

StepRandom draws t, the flow noise, the label-drop mask and the posterior noise for the GLOBAL batch from one
seeded generator, and each rank keeps its slice: the same run at any world size. synthetic_inputs makes a whole
StepInputs from a seed (random images too), for benchmarks and tests that bypass the data source.
"""

# B batch, C latent channels, H, W latent sides, R image side

from __future__ import annotations

import math

import torch

from .step import StepInputs


class StepRandom:
    """t, flow noise, label-drop mask and posterior noise for the global batch (world-size independent)."""

    def __init__(self, seed: int, global_batch: int, latent_shape: tuple[int, int, int], drop_prob: float,
                 weighting: str, path_type: str):
        self.gen = torch.Generator().manual_seed(seed + 0x5EED)
        self.G, self.latent_shape, self.drop_prob = global_batch, latent_shape, drop_prob
        self.weighting, self.path_type = weighting, path_type

    def draw(self, rank: int, world_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        G, g = self.G, self.gen
        if self.weighting == "uniform":
            t = torch.rand(G, generator=g)
        else:  # lognormal: s = exp(randn); linear t = s / (1 + s), cosine (2/pi) atan(s)
            s = torch.randn(G, generator=g).exp()
            t = s / (1 + s) if self.path_type == "linear" else 2 / math.pi * torch.atan(s)
        noise = torch.randn((G, *self.latent_shape), generator=g)
        drop = torch.rand(G, generator=g) < self.drop_prob
        post = torch.randn((G, *self.latent_shape), generator=g)
        b = G // world_size
        sl = slice(rank * b, (rank + 1) * b)
        return {k: v[sl].to(device) for k, v in (("t", t), ("noise", noise), ("drop_mask", drop),
                                                   ("posterior_noise", post))}

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, d: dict) -> None:
        self.gen.set_state(d["gen"])


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
