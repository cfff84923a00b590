"""The inputs of `python -m repae.train.evaluate_vae` (train/evaluate_vae.py): the VAE from any of its sources, the
images from a folder or an .npz, and one reconstruction. Holds no metric (train/evaluate_vae_metrics.py).

    vae, source = load_vae("exps/sitxl-repae/export/e2e-vae.pt")       # eval mode, on the CPU; source: a dict
    n, side, crop, batches = image_batches("imagenet/val", resolution=256, num_images=None, batch_size=50, workers=8)
    recons_BRR3 = reconstruct(vae.to(device), torch.from_numpy(next(batches)).to(device))

VAE sources: a directory holding diffusion_pytorch_model.{safetensors,bin} is a diffusers folder; any other
directory, and a .pt/.pth/.bin/.ckpt file with a top-level `ema`, `args` or `steps` entry, is a run checkpoint read
by train/generate_io.load_models (its VAE; the SiT it also builds is dropped); any other file is a bare
AutoencoderKL state dict in LDM or diffusers layout (model/vae.py remaps the latter), shaped by --vae-config or by
its tensors (model/vae.py vae_config_from_state_dict), loaded strictly.
Images: a folder through train/data.py (sorted scan, RGB conversion, ADM center crop; an unreadable file is an
error, never replaced), an .npz streamed from its zip by train/evaluate_inception.py.
"""

# B batch, R image side, C latent channels, h w latent height and width

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from repae.model.vae import (
    VAE_CONFIGS,
    build_vae,
    diffusers_to_ldm,
    is_diffusers_state_dict,
    vae_config,
    vae_config_from_state_dict,
)
from repae.model.weights import WEIGHT_SUFFIXES, load_state_dict_checked, read_weight_file, state_dict_from

from . import evaluate_inception as inception
from .evaluate_vae_metrics import to_unit_range
from .generate_io import _checkpoint_keys, load_models, to_uint8

DEFAULT_RESOLUTION = 256
DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
RUN_KEYS = {"ema", "args", "steps"}  # top-level entries that make a file a run checkpoint, not a state dict


# ---------------------------------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------------------------------


def _config_name(vae: nn.Module) -> str | dict:
    """The registry name of the VAE's config, else the config's fields."""
    return next((name for name, cfg in VAE_CONFIGS.items() if cfg == vae.config), None) or asdict(vae.config)


def _from_weights_file(path: str, config: str | None) -> tuple[nn.Module, dict]:
    """A bare AutoencoderKL state dict (LDM or diffusers layout), shaped by `config` or by its tensors."""
    sd = state_dict_from(read_weight_file(path, what="VAE weight file"), source=path)
    layout = "diffusers" if is_diffusers_state_dict(sd) else "LDM"
    try:
        sd = diffusers_to_ldm(sd) if layout == "diffusers" else sd
        cfg = vae_config(config) if config is not None else vae_config_from_state_dict(sd)
    except ValueError as err:
        raise ValueError(f"VAE weight file {path}: {err}") from err
    vae = build_vae(cfg)
    load_state_dict_checked(vae, sd, source=f"VAE weight file {path} ({layout} layout)")
    shape_from = "--vae-config" if config is not None else "its tensors"
    return vae, {"kind": f"weights file ({layout} layout)", "config_from": shape_from}


def _is_run_checkpoint(path: str) -> bool:
    """True for a run checkpoint (entries ema / args / steps), False for a bare state dict."""
    if path.endswith(".safetensors"):
        return False
    if not path.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"VAE file {path}: unknown format, expected one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        return bool(RUN_KEYS & _checkpoint_keys(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"VAE file {path} could not be read with weights_only=True: {err}") from err


def load_vae(path: str, *, config: str | None = None, step: int | None = None) -> tuple[nn.Module, dict]:
    """(AutoencoderKL in eval mode on the CPU, where it came from) for any --vae PATH (module docstring)."""
    if os.path.isdir(path):
        found = [os.path.join(path, name) for name in DIFFUSERS_FILES if os.path.isfile(os.path.join(path, name))]
        weights_file = found[0] if found else None
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"VAE not found: {path}")
    else:
        weights_file = None if _is_run_checkpoint(path) else path
    if weights_file is not None:
        if step is not None:
            raise ValueError(f"--step is for run checkpoints; {weights_file} is a VAE weights file")
        vae, source = _from_weights_file(weights_file, config)
    else:
        if config is not None:
            raise ValueError(f"--vae-config is for VAE weight files; {path} is a run checkpoint that gives the "
                             f"VAE's shape itself")
        models = load_models(path, step=step)
        vae, source = models.vae, {"kind": "run checkpoint", "step": models.step}
    return vae.eval(), {"path": os.path.abspath(weights_file or path), **source, "config": _config_name(vae)}


@torch.inference_mode()
def reconstruct(vae: nn.Module, images_BRR3: torch.Tensor) -> torch.Tensor:
    """uint8 [B, R, R, 3] on the VAE's device -> its reconstructions, uint8 [B, R, R, 3] on the CPU: encode, the
    posterior mean, decode, then to_uint8 (which clamps to [-1, 1] in effect and truncates)."""
    z_BChw = vae.encode(to_unit_range(images_BRR3)).mode()
    return to_uint8(vae.decode(z_BChw))


# ---------------------------------------------------------------------------------------------------
# The images
# ---------------------------------------------------------------------------------------------------


def _count(available: int, wanted: int | None, path: str) -> int:
    if wanted is not None and wanted > available:
        raise ValueError(f"--num-images {wanted}: {path} holds only {available} images")
    return available if wanted is None else wanted


def _folder_batches(dataset, num_images: int, batch_size: int, workers: int) -> Iterator[np.ndarray]:
    """uint8 [B, R, R, 3] numpy batches of the first num_images of an ImageFolderDataset, decoded by `workers`;
    an unreadable file is a ValueError naming it (no replacement: the set must be the stated one)."""
    from torch.utils.data import DataLoader, Subset

    from .loader import collate_samples

    loader = DataLoader(Subset(dataset, range(num_images)), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_samples)
    for images_B3RR, _, _, bad in loader:
        if bad:
            index, reason, _ = bad[0]
            raise ValueError(f"unreadable image {dataset.path(index)}: {reason}")
        yield images_B3RR.permute(0, 2, 3, 1).numpy()


def _first(batches: Iterator[np.ndarray], num_images: int) -> Iterator[np.ndarray]:
    """The batches up to num_images images in all."""
    left = num_images
    for batch in batches:
        if left <= 0:
            break
        yield batch[:left]
        left -= len(batch)


def image_batches(path: str, *, resolution: int | None, num_images: int | None, batch_size: int,
                  workers: int) -> tuple[int, int, str, Iterator[np.ndarray]]:
    """(number of images, side R, the crop in words, uint8 numpy [B, R, R, 3] batches) of a folder or an .npz."""
    if os.path.isdir(path):
        from .data import ImageFolderDataset

        side = resolution or DEFAULT_RESOLUTION
        dataset = ImageFolderDataset(path, side, max_bad_images=0)
        n = _count(len(dataset), num_images, path)
        crop = "ADM center crop (train/data.py center_crop_arr) of each image, in sorted path order"
        return n, side, crop, _folder_batches(dataset, n, batch_size, workers)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such image folder or file: {path}")
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: expected an image folder or an .npz (arr_0: uint8 [n, R, R, 3])")
    peek = inception.iter_image_batches(path, 1)  # checks arr_0's dtype and layout
    first = next(peek, None)
    peek.close()
    if first is None:
        raise ValueError(f"{path}: arr_0 holds no images")
    side = first.shape[1]
    if first.shape[2] != side or (resolution is not None and resolution != side):
        raise ValueError(f"{path} holds {first.shape[1]} x {first.shape[2]} images; expected square ones"
                         + (f" of --resolution {resolution}" if resolution is not None else ""))
    n = _count(inception.count_images(path), num_images, path)
    return n, side, "none (the .npz's images as stored)", _first(inception.iter_image_batches(path, batch_size), n)
