"""model/vae.py, LDM -> diffusers: `ldm_to_diffusers` is the exact inverse of `diffusers_to_ldm` (keys, order and
tensors, attention conv [C, C, 1, 1] <-> Linear [C, C]) for f8d4 and f16d32 shapes at tiny widths, it names keys
as test_vae.py's hand-written diffusers layout does, and `diffusers_config` describes a diffusers AutoencoderKL
with exactly those keys and shapes (skipped without diffusers). Runs in about a second on 2 CPU cores."""

from __future__ import annotations

import inspect

import pytest
import torch
from test_vae import DIFFUSERS_ATTN
from test_vae import ldm_to_diffusers as hand_ldm_to_diffusers

from repae.model.vae import (
    build_vae,
    diffusers_config,
    diffusers_to_ldm,
    ldm_to_diffusers,
    vae_config,
)

# f8d4 (attention in the mid blocks only) and f16d32 (also on level 4, at side 16) at width 32
TINY = {"f8d4": vae_config("f8d4", ch=32, ch_mult=(1, 2, 2, 2)),
        "f16d32": vae_config("f16d32", ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1)}


def random_state_dict(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: torch.randn(v.shape) for k, v in build_vae(TINY[name]).state_dict().items()}


@pytest.mark.parametrize("name", list(TINY))
def test_ldm_to_diffusers_is_the_inverse_of_diffusers_to_ldm(name):
    sd = random_state_dict(name)
    theirs = ldm_to_diffusers(sd)
    back = diffusers_to_ldm(theirs)
    assert list(back) == list(sd)
    assert all(back[k].shape == sd[k].shape and torch.equal(back[k], sd[k]) for k in sd)
    again = ldm_to_diffusers(back)
    assert list(again) == list(theirs) and all(torch.equal(again[k], theirs[k]) for k in theirs)
    # the same names and tensors as the layout written by hand from diffusers' naming (tests/model/test_vae.py)
    hand = hand_ldm_to_diffusers(sd, len(TINY[name].ch_mult), DIFFUSERS_ATTN)
    assert set(theirs) == set(hand) and all(torch.equal(theirs[k], hand[k]) for k in hand)
    attn = [k for k in theirs if ".attentions." in k and k.endswith(("to_q.weight", "to_out.0.weight"))]
    assert attn and all(theirs[k].dim() == 2 for k in attn)  # Linear [C, C]
    if name == "f16d32":
        assert "encoder.down_blocks.4.attentions.0.to_k.weight" in theirs
        assert "decoder.up_blocks.0.attentions.1.to_v.weight" in theirs  # up.4 = up_blocks.0 (lowest resolution)


def test_non_ldm_keys_are_named():
    sd = random_state_dict("f8d4")
    with pytest.raises(ValueError, match=r"1 keys are not AutoencoderKL names: \['encoder\.extra\.weight'\]"):
        ldm_to_diffusers({**sd, "encoder.extra.weight": torch.zeros(1)})


@pytest.mark.parametrize("name", list(TINY))
def test_diffusers_config_builds_a_model_with_exactly_these_weights(name):
    diffusers = pytest.importorskip("diffusers")
    cfg = TINY[name]
    config = diffusers_config(cfg, [0.0] * cfg.embed_dim, [1.0] * cfg.embed_dim, sample_size=64)
    init_args = set(inspect.signature(diffusers.AutoencoderKL.__init__).parameters) - {"self"}
    assert set(config) - {"_class_name", "_diffusers_version"} == init_args  # every argument given, none unknown
    model = diffusers.AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})
    ours = ldm_to_diffusers(build_vae(cfg).state_dict())
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert config["sample_size"] == 64 and config["scaling_factor"] == 1.0 and config["shift_factor"] is None


def test_diffusers_config_needs_one_statistic_per_channel():
    with pytest.raises(ValueError, match=r"latents_mean \(3\) and latents_std \(4\) need one value per latent"):
        diffusers_config(TINY["f8d4"], [0.0] * 3, [1.0] * 4)
