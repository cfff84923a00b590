"""The files `python -m repae.train.generate` reads and writes. In: the EMA SiT, the VAE and the latent statistics
that undo the latent normalisation, from any of the three checkpoint kinds. Out: chunk files and the .npz.

    models = load_models("exps/sitxl-repae")                              # our run dir (its `latest`)
    models = load_models("exps/sitxl-repae/checkpoints/step0400000")      # one of our checkpoint folders
    models = load_models("exps/sitxl-repae/export/checkpoints/0400000.pt")  # train/export.py output
    models = load_models("pretrained/sit-xl-repae-sdvae/checkpoints/0400000.pt")  # a released REPA-E run
    images_BRR3 = to_uint8(models.vae.decode(models.denormalize(latents_BCHW)))

Which VAE and which statistics (docs/METHOD.md#sampling, as the original's generate.py):
- VAE weights: `vae` if given, else the checkpoint's own VAE, else the run's `vae_ckpt` argument (LDM-only runs,
  whose checkpoints hold no VAE; ours: the config's vae.weights, and vae.latents_stats when set).
- Statistics: `latents_stats` if given; else the EMA latent BN (running_mean, running_var) when the VAE came from
  the checkpoint (the BN was trained with that VAE); else `<vae>-latents-stats.pt` next to the VAE file.
Every file is read weights-only (train/checkpoint.py for our folders, model/release.py for the official layout).
Chunk files are written to a temp name and renamed; the .npz has ADM's layout. Holds no sampling.
"""

# B batch, C latent channels, H W latent height and width, R image side

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from repae.model.release import ReleasedModels, build_from_args, load_released_checkpoint
from repae.model.sit import SiT
from repae.model.vae import latents_stats_path, load_latents_stats
from repae.model.weights import load_state_dict_checked, load_weights

from . import checkpoint as ckpt
from .export import official_args


@dataclass
class SamplingModels:
    """EMA SiT and VAE (eval mode, on CPU until moved) and how latents return to the VAE's scale."""

    sit: SiT
    vae: nn.Module
    denormalize: Callable[[torch.Tensor], torch.Tensor]
    """x_norm [B, C, H, W] -> x / latents_scale + latents_bias."""
    step: int | None
    stem: str
    """Short model name for file names, e.g. sitxl2-f8d4."""
    decode_from: str
    """Where the statistics come from, for the log line."""


def _stem(args: dict) -> str:
    return "-".join(re.sub(r"[^a-z0-9]", "", str(args.get(k, "")).lower()) for k in ("model", "vae"))


def _checkpoint_keys(path: str) -> set[str]:
    """Top-level keys of a checkpoint file without reading its tensors (mmap; a legacy file is read)."""
    if path.endswith(".safetensors"):
        raise ValueError(f"{path}: a .safetensors file holds one state dict, not a run checkpoint "
                         f"(pass the checkpoints/<step>.pt file)")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return set(obj)


def _official_file(run_dir: str, step: int | None) -> str:
    """checkpoints/<step:07d>.pt of an official-layout run dir (args.json next to checkpoints/), newest if None."""
    folder = os.path.join(run_dir, "checkpoints")
    if step is not None:
        return os.path.join(folder, f"{step:07d}.pt")
    names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"[0-9]+\.pt", n)) if os.path.isdir(folder) else []
    if not names:
        raise FileNotFoundError(f"no checkpoints/<step>.pt in {run_dir}")
    return os.path.join(folder, max(names, key=lambda n: int(n[:-3])))


def _load_ours(path: str) -> tuple[ReleasedModels, bool]:
    """One of our checkpoint folders: the EMA SiT (trainer.pt's `ema`) and the VAE engine's weights. An LDM-only
    run (stage=ldm) holds no VAE: its config's vae.weights is the run's vae_ckpt, vae.latents_stats its statistics."""
    kinds = ckpt.kinds_on_disk(path, ckpt.written_engines(path))
    ckpt.validate(path, kinds)  # every file present and weights-only loadable before anything is built
    state = ckpt.load_file(os.path.join(path, ckpt.TRAINER_FILE))
    models = build_from_args(official_args(state["config"]))
    models.steps = state["step"]
    load_state_dict_checked(models.sit, state["ema"], source=f"{path}/{ckpt.TRAINER_FILE}[ema]")
    if "vae" not in kinds:
        vae = state["config"]["vae"]
        models.args.update(vae_ckpt=vae["weights"], vae_latents_stats=vae["latents_stats"])
        return models, False
    load_state_dict_checked(models.vae, ckpt.engine_weights(path, "vae", kinds["vae"]), source=f"{path}[vae]")
    return models, True


def _load_any(path: str, step: int | None) -> tuple[ReleasedModels, bool]:
    """(models, whether the VAE came from the checkpoint) for a run dir, a step folder or a .pt file."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "args.json")):  # official layout: args.json + checkpoints/*.pt
            return _load_any(_official_file(path, step), None)
        if os.path.isfile(os.path.join(path, ckpt.TRAINER_FILE)):
            if step is not None:
                raise ValueError(f"--step {step} given with a checkpoint folder ({path}); give one or the other")
            return _load_ours(path)
        return _load_ours(ckpt.resolve(os.path.join(path, ckpt.CKPT_DIR), step))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if step is not None:
        raise ValueError(f"--step {step} given with a checkpoint file ({path}); give one or the other")
    has_vae = "vae" in _checkpoint_keys(path)
    return load_released_checkpoint(path), has_vae


def load_models(path: str | os.PathLike, *, step: int | None = None, vae: str | None = None,
                latents_stats: str | None = None) -> SamplingModels:
    """The models and statistics to sample with (rules in the module docstring); ValueError/FileNotFoundError
    with one line for bad input."""
    path = os.fspath(path)
    models, vae_in_ckpt = _load_any(path, step)
    if vae is None and not vae_in_ckpt:
        vae = models.args.get("vae_ckpt")
        if not vae:
            raise ValueError(f"{path} holds no VAE and its run arguments name no vae_ckpt: pass --vae")
        latents_stats = latents_stats or models.args.get("vae_latents_stats")  # our LDM-only runs: their config's
    if vae is not None:
        load_weights(models.vae, vae, what="VAE weights")
    sit = models.sit.eval()
    if latents_stats is None and vae is None:
        denormalize, source = sit.bn.denormalize, "the EMA latent BN"
    else:
        stats = latents_stats or latents_stats_path(vae)
        if not os.path.isfile(stats):
            raise FileNotFoundError(f"latents-stats file not found: {stats} (pass --latents-stats)")
        bias_C, scale_C = load_latents_stats(stats)
        if bias_C.numel() != sit.in_channels:
            raise ValueError(f"{stats} holds {bias_C.numel()} channels, the SiT has {sit.in_channels}")

        def denormalize(x_BCHW: torch.Tensor) -> torch.Tensor:
            shape = (1, -1, 1, 1)
            return x_BCHW / scale_C.to(x_BCHW).view(shape) + bias_C.to(x_BCHW).view(shape)

        source = stats
    return SamplingModels(sit=sit, vae=models.vae.eval(), denormalize=denormalize, step=models.steps,
                          stem=_stem(models.args), decode_from=source)


def to_uint8(images_B3RR: torch.Tensor) -> torch.Tensor:
    """Decoded images in [-1, 1] -> uint8 [B, R, R, 3] on CPU: clamp(255 (x + 1) / 2, 0, 255), truncated as the
    original's `.to(torch.uint8)` (docs/METHOD.md#sampling)."""
    return torch.clamp(255.0 * ((images_B3RR + 1) / 2.0), 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------------
# Chunk files and the .npz
# ---------------------------------------------------------------------------------------------------


def chunk_path(parts: str, chunk: int) -> str:
    return os.path.join(parts, f"{chunk:06d}.npz")


def atomic_savez(path: str, **arrays: np.ndarray) -> None:
    """np.savez into a temp file in the same folder, fsync'd, then renamed: the file is complete or absent."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_chunk(parts: str, chunk: int, indices: range, images_BRR3: np.ndarray, labels_B: np.ndarray,
                png_folder: str | None = None) -> None:
    """One chunk's samples (indices) as parts/<chunk>.npz, its PNGs first (png_folder/{i:06d}.png)."""
    if png_folder is not None:
        from PIL import Image

        for i, image in zip(indices, images_BRR3):
            Image.fromarray(image).save(os.path.join(png_folder, f"{i:06d}.png"))
    atomic_savez(chunk_path(parts, chunk), images=images_BRR3, labels=labels_B,
                 indices=np.arange(indices.start, indices.stop))


def assemble(parts: str, out_file: str, chunks: list[range], labels_N: np.ndarray) -> tuple[int, ...]:
    """The chunks (their index ranges, in order) -> out_file with arr_0 uint8 [N, R, R, 3] and arr_1 int64 [N]
    labels (ADM's layout); every chunk must hold exactly its indices. Returns arr_0's shape."""
    arr = None
    for chunk, indices in enumerate(chunks):
        with np.load(chunk_path(parts, chunk)) as z:
            images, idx, y = z["images"], z["indices"], z["labels"]
        if not (np.array_equal(idx, np.arange(indices.start, indices.stop)) and np.array_equal(y, labels_N[idx])):
            raise ValueError(f"{chunk_path(parts, chunk)} does not hold samples {indices.start}..{indices.stop - 1} "
                             f"with their labels")
        if arr is None:
            arr = np.empty((len(labels_N), *images.shape[1:]), dtype=np.uint8)
        arr[indices.start:indices.stop] = images
    atomic_savez(out_file, arr_0=arr, arr_1=labels_N)
    return arr.shape
