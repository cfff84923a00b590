"""Sample N images for FID: `python -m repae.train.generate --ckpt RUN_OR_FILE --preset repae-sdvae`.

    python -m repae.train.generate --ckpt exps/sitxl-repae --num-samples 50000 --out samples
    torchrun --nproc_per_node 8 -m repae.train.generate --ckpt pretrained/<run>/checkpoints/0400000.pt \
        --preset repae-sdvae --batch-size 125 --out samples
    deepspeed --num_gpus 8 --module repae.train.generate --ckpt ... --preset ...

Writes OUT/<name>.npz in the ADM layout (`arr_0` uint8 [N, R, R, 3] in sample order, `arr_1` int64 [N] labels,
as ADM's own image_sample.py stores class-conditional samples; ADM's evaluator reads `arr_0`), and with --png
OUT/<name>/{i:06d}.png. <name> = <model>-<vae>-step<step:07d>-<mode><steps>[-heun]-cfg<s>-gi<low>-<high>-
<label sampling>-seed<seed>-n<N>, e.g. sitxl2-f8d4-step0400000-sde250-cfg2.2-gi0.0-0.65-equal-seed0-n50000.

Determinism (what a sample depends on): sample i has label labels[i] of one global list (`equal`: N // K of
each of the K classes, plus one more for classes 0..N % K - 1, permuted by torch.randperm with a CPU generator
seeded `seed`; with N % K == 0 that is the original's class-balanced list; `random`: torch.randint with that
generator) and initial noise drawn from a CPU generator seeded from (seed, i) alone. The samples are cut into
chunks of --batch-size consecutive indices (the last one shorter); the SDE's per-step noise comes from one
generator per chunk seeded from (seed, chunk). So the output does not depend on the world size, the launcher
or where a run was killed and resumed; it depends on the batch size through the SDE noise (and through the
batched matmuls' rounding), and on the device (the SDE generator lives on it).

Resuming: each chunk is written as OUT/<name>/parts/<chunk:06d>.npz by a temp file and a rename (its PNGs
before it), so a killed run leaves only complete chunks; the same command skips them, never writing a sample
twice. OUT/<name>/parts/meta.json holds the settings; resuming with others (batch size, checkpoint, --png)
is refused. Rank 0 assembles the .npz after every rank is done and removes parts/. The remaining chunks are
dealt round-robin over the ranks, so a resume may use another world size.
Exit codes: 0 done (or the .npz already exists), 2 bad input (one line).
"""

# B batch, C latent channels, H W latent height and width, R image side, K classes

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from datetime import timedelta

import numpy as np
import torch

# The paper's sampler settings per released model. A preset sets these; flags given explicitly win.
PRESETS = {
    # docs/METHOD.md#sampling ("Paper settings", SiT-XL trained end to end with each VAE): SDE, 250 steps.
    "repae-sdvae": dict(mode="sde", num_steps=250, cfg_scale=2.2, guidance_low=0.0, guidance_high=0.65),
    "repae-invae": dict(mode="sde", num_steps=250, cfg_scale=1.8, guidance_low=0.0, guidance_high=0.825),
    "repae-vavae": dict(mode="sde", num_steps=250, cfg_scale=1.9, guidance_low=0.0, guidance_high=0.825),
    # docs/METHOD.md#the-papers-recipe: E2E-VA-VAE + SiT-XL/1, LDM-only, 4M steps (later README: FID 1.12,
    # class-balanced labels; snapshot README: FID 1.26, random labels as its generate.py drew them).
    "e2e-vavae-4m": dict(mode="sde", num_steps=250, cfg_scale=2.4, guidance_low=0.0, guidance_high=0.73,
                         label_sampling="equal"),
    "e2e-vavae-4m-snapshot": dict(mode="sde", num_steps=250, cfg_scale=2.5, guidance_low=0.0,
                                  guidance_high=0.75, label_sampling="random"),
}
# The original generate.py's defaults (docs/METHOD.md#sampling), class-balanced labels as its current code.
DEFAULTS = dict(mode="ode", num_steps=50, cfg_scale=1.5, guidance_low=0.0, guidance_high=1.0, heun=False,
                label_sampling="equal")


@dataclass(frozen=True)
class Settings:
    """Everything the samples depend on (besides the weights); stored in parts/meta.json."""

    ckpt: str
    step: int | None
    mode: str
    num_steps: int
    heun: bool
    cfg_scale: float
    guidance_low: float
    guidance_high: float
    label_sampling: str
    num_classes: int
    seed: int
    num_samples: int
    batch_size: int
    png: bool
    tf32: bool

    def name(self, stem: str) -> str:
        step = "stepNA" if self.step is None else f"step{self.step:07d}"
        sampler = f"{self.mode}{self.num_steps}" + ("-heun" if self.heun else "")
        return (f"{stem}-{step}-{sampler}-cfg{self.cfg_scale}-gi{self.guidance_low}-{self.guidance_high}-"
                f"{self.label_sampling}-seed{self.seed}-n{self.num_samples}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="sample N images from a REPA-E SiT into an ADM-style .npz")
    p.add_argument("--ckpt", required=True, help="our run dir or step folder, an exported or released "
                   "checkpoints/<step>.pt, or an official run dir (args.json + checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step inside a run dir (default: latest)")
    p.add_argument("--vae", default=None, help="VAE weights to decode with (default: the checkpoint's)")
    p.add_argument("--latents-stats", default=None, help="{latents_scale, latents_bias} file (default: the EMA "
                   "latent BN, or <vae>-latents-stats.pt with --vae)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="the paper's sampler settings")
    p.add_argument("--mode", choices=("ode", "sde"), default=None, help=f"default {DEFAULTS['mode']}")
    p.add_argument("--heun", action=argparse.BooleanOptionalAction, default=None, help="ODE only")
    p.add_argument("--num-steps", type=int, default=None, help=f"default {DEFAULTS['num_steps']}")
    p.add_argument("--cfg-scale", type=float, default=None, help=f"default {DEFAULTS['cfg_scale']}")
    p.add_argument("--guidance-low", type=float, default=None, help=f"default {DEFAULTS['guidance_low']}")
    p.add_argument("--guidance-high", type=float, default=None, help=f"default {DEFAULTS['guidance_high']}")
    p.add_argument("--label-sampling", choices=("equal", "random"), default=None, help="default equal")
    p.add_argument("--num-classes", type=int, default=None, help="classes to draw labels from (default: "
                   "the SiT's, 1000 for ImageNet)")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=64, help="samples per chunk, one chunk per rank at a time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples")
    p.add_argument("--png", action="store_true", help="also write OUT/<name>/{i:06d}.png")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on GPUs")
    p.add_argument("--stop-after-chunks", type=int, default=None, help=argparse.SUPPRESS)  # tests: a kill
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p.parse_args(argv)


def resolve_settings(a: argparse.Namespace, *, step: int | None, model_classes: int) -> Settings:
    """Explicit flags > preset > DEFAULTS; ValueError for an impossible combination."""
    chosen = {**DEFAULTS, **PRESETS.get(a.preset, {})}
    chosen.update({k: getattr(a, k) for k in DEFAULTS if getattr(a, k) is not None})
    num_classes = model_classes if a.num_classes is None else a.num_classes
    if chosen["heun"] and chosen["mode"] != "ode":
        raise ValueError("--heun is an ODE option (--mode ode)")
    if not 1 <= num_classes <= model_classes:
        raise ValueError(f"--num-classes must be in [1, {model_classes}] (the SiT's classes), got {num_classes}")
    if a.num_samples < 1 or a.batch_size < 1 or chosen["num_steps"] < 1 or chosen["cfg_scale"] < 1.0:
        raise ValueError("--num-samples, --batch-size and --num-steps must be >= 1 and --cfg-scale >= 1.0")
    return Settings(ckpt=os.path.abspath(a.ckpt), step=step, num_classes=num_classes, seed=a.seed,
                    num_samples=a.num_samples, batch_size=a.batch_size, png=a.png, tf32=a.tf32, **chosen)


# ---------------------------------------------------------------------------------------------------
# Labels and noise: functions of (seed, sample index) only
# ---------------------------------------------------------------------------------------------------


def global_labels(num_samples: int, num_classes: int, how: str, seed: int) -> torch.Tensor:
    """int64 [N]: the label of every sample (module docstring); the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    if how == "random":
        return torch.randint(0, num_classes, (num_samples,), generator=g)
    per_class, extra = divmod(num_samples, num_classes)
    y = torch.cat([torch.arange(num_classes).repeat_interleave(per_class), torch.arange(extra)])
    return y[torch.randperm(num_samples, generator=g)]


def derived_seed(purpose: str, seed: int, index: int) -> int:
    """A 63-bit seed from (purpose, seed, index): independent streams for every sample and chunk."""
    digest = hashlib.sha256(f"{purpose}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_noise(indices: range, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """fp32 [B, C, H, W] on CPU: sample i's x_T from its own generator."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(derived_seed("x_T", seed, i)))
                        for i in indices])


# ---------------------------------------------------------------------------------------------------
# Sampling one chunk, and the chunk files
# ---------------------------------------------------------------------------------------------------


def num_chunks(s: Settings) -> int:
    return math.ceil(s.num_samples / s.batch_size)


def chunk_range(chunk: int, s: Settings) -> range:
    """The sample indices of a chunk: batch_size consecutive ones (the last chunk shorter)."""
    return range(chunk * s.batch_size, min((chunk + 1) * s.batch_size, s.num_samples))


@torch.no_grad()
def sample_chunk(models, s: Settings, chunk: int, labels: torch.Tensor, device: torch.device) -> np.ndarray:
    """uint8 [B, R, R, 3] of the chunk's samples."""
    from repae.model.samplers import euler_maruyama_sampler, euler_sampler

    from .generate_io import to_uint8

    indices = chunk_range(chunk, s)
    cfg = models.sit.config
    x_BCHW = initial_noise(indices, (cfg.in_channels, cfg.input_size, cfg.input_size), s.seed).to(device)
    y_B = labels[indices.start:indices.stop].to(device)
    kwargs = dict(num_steps=s.num_steps, cfg_scale=s.cfg_scale, guidance_low=s.guidance_low,
                  guidance_high=s.guidance_high, null_class=cfg.num_classes)
    if s.mode == "sde":
        gen = torch.Generator(device).manual_seed(derived_seed("sde", s.seed, chunk))
        latents = euler_maruyama_sampler(models.sit.inference, x_BCHW, y_B, path_type=models.sit.path_type,
                                         generator=gen, **kwargs)
    else:
        latents = euler_sampler(models.sit.inference, x_BCHW, y_B, heun=s.heun, **kwargs)
    return to_uint8(models.vae.decode(models.denormalize(latents.float()))).numpy()


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def init_world() -> tuple[int, int, torch.device]:
    """(rank, world size, device): a process group from the launcher's RANK/WORLD_SIZE (gloo on CPU, NCCL on
    GPUs), an existing one (tests), or one process."""
    import torch.distributed as dist

    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=1))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def prepare_parts(parts: str, s: Settings, rank: int) -> list[int]:
    """Create parts/ and meta.json (rank 0) and list the chunks still to do (every rank, before anyone writes
    one); then check that a resumed run has the same settings."""
    from .generate_io import chunk_path

    meta = os.path.join(parts, "meta.json")
    if rank == 0:
        os.makedirs(parts, exist_ok=True)
        for name in os.listdir(parts):  # what a killed write left
            if name.startswith(".tmp-"):
                os.remove(os.path.join(parts, name))
        if not os.path.isfile(meta):
            with open(meta + ".tmp", "w") as f:
                json.dump(asdict(s), f, indent=2)
            os.replace(meta + ".tmp", meta)
    todo = [c for c in range(num_chunks(s)) if not os.path.isfile(chunk_path(parts, c))]
    _barrier()  # every rank has listed the chunks (the same list) before any rank writes one
    with open(meta) as f:
        old = json.load(f)
    changed = [f"{k}={old.get(k)!r}" for k, v in asdict(s).items() if old.get(k) != v]
    if changed:
        raise ValueError(f"{parts} was started with other settings ({', '.join(changed)}); rerun with those or "
                         f"use another --out")
    return todo


def _progress(rank: int, s: Settings, todo: list[int]):
    """tqdm over all samples on rank 0 (None elsewhere), starting at those already written."""
    if rank != 0:
        return None
    from tqdm import tqdm

    done = s.num_samples - sum(len(chunk_range(c, s)) for c in todo)
    return tqdm(total=s.num_samples, initial=done, unit="img", desc="generate", dynamic_ncols=True)


def run(a: argparse.Namespace) -> int:
    from .generate_io import assemble, chunk_path, load_models, write_chunk

    rank, world, device = init_world()
    models = load_models(a.ckpt, step=a.step, vae=a.vae, latents_stats=a.latents_stats)
    s = resolve_settings(a, step=models.step, model_classes=models.sit.config.num_classes)
    name = s.name(models.stem)
    out_file, folder = os.path.join(a.out, f"{name}.npz"), os.path.join(a.out, name)
    if os.path.isfile(out_file):
        if rank == 0:
            print(f"[repae] {out_file} already exists: nothing to do", flush=True)
        return 0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = s.tf32
    parts = os.path.join(folder, "parts")
    todo = prepare_parts(parts, s, rank)
    if rank == 0:
        print(f"[repae] {s.num_samples} samples -> {out_file} on {world} rank(s), decoding with "
              f"{models.decode_from}; {len(todo)} of {num_chunks(s)} chunks of {s.batch_size} to do", flush=True)
    models.sit.to(device)
    models.vae.to(device)
    labels = global_labels(s.num_samples, s.num_classes, s.label_sampling, s.seed)
    bar = _progress(rank, s, todo)
    for n, chunk in enumerate(todo[rank::world]):  # the remaining chunks dealt round-robin
        if a.stop_after_chunks is not None and n >= a.stop_after_chunks:
            raise SystemExit(143)  # as if killed here: the chunks written so far stay
        indices = chunk_range(chunk, s)
        images = sample_chunk(models, s, chunk, labels, device)
        write_chunk(parts, chunk, indices, images, labels[indices.start:indices.stop].numpy(),
                    folder if s.png else None)
        if bar is not None:  # every rank's chunks on disk
            bar.update(s.num_samples - bar.n - sum(len(chunk_range(c, s)) for c in todo
                                                    if not os.path.isfile(chunk_path(parts, c))))
    _barrier()
    if rank == 0:
        if bar is not None:
            bar.update(s.num_samples - bar.n)
            bar.close()
        shape = assemble(parts, out_file, [chunk_range(c, s) for c in range(num_chunks(s))], labels.numpy())
        shutil.rmtree(parts)
        print(f"[repae] wrote {out_file}: arr_0 uint8 {list(shape)}, arr_1 int64 [{s.num_samples}] labels",
              flush=True)
    return 0


def main(argv=None) -> int:
    import torch.distributed as dist

    a = parse_args(argv)
    owned = not dist.is_initialized()
    try:
        return run(a)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
