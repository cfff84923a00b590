"""`python -m repae.train.evaluate_vae IMAGES --vae PATH`: reconstruct an image set through a VAE and report rFID,
PSNR, SSIM and LPIPS between the originals and the reconstructions.

    python -m repae.train.evaluate_vae imagenet/val --vae exps/sitxl-repae/export/e2e-vae.pt      # 50,000 at 256 px

IMAGES: an image folder (every .png/.jpg/.jpeg/.webp under it, sorted by path; decoded to RGB and ADM
center-cropped to --resolution by train/data.py, as the training data) or an ADM-style .npz (`arr_0` uint8
[n, R, R, 3], used as stored). --vae PATH: one of our run dirs or checkpoint folders, a released or exported run
checkpoint (`checkpoints/<step>.pt`; all read by train/generate_io.load_models), a VAE weights file in LDM layout
(train/export.py's `e2e-vae.pt` / `.safetensors`) or diffusers layout (`diffusion_pytorch_model.safetensors` /
`.bin`, or the folder holding it). A weights file's shape is read from its tensors (--vae-config f8d4|f16d32
names it instead). Reconstruction needs no latent statistics: they only rescale the latents for the SiT.

Protocol (the usual one: the 50,000 ImageNet validation images at 256 px, center crop):
  x = uint8 / 127.5 - 1 -> vae.encode(x) -> posterior MEAN (deterministic; no sampled noise) -> vae.decode -> clamp
  to [-1, 1] and quantise to uint8 as generated samples are (train/generate_io.to_uint8: 255 (x + 1) / 2 clamped,
  truncated). The VAE runs in fp32 (on a GPU with TF32 matmuls and convolutions unless --no-tf32, as generate.py).
  Every metric compares the uint8 originals (after the crop) with the uint8 reconstructions:
  rFID   FID of the reconstructions against the originals: the Inception network, features and Frechet distance
         of train/evaluate.py (pool_3, 2048 wide), both sets' features computed batch by batch as they stream.
  PSNR   per image on uint8 values (range 255, mse over all pixels and channels), mean over images; an exact
         reconstruction (PSNR +inf) is left out of the mean and counted in psnr_num_identical.
  SSIM   per image, skimage's Gaussian SSIM (11 x 11, sigma 1.5, K1 0.01, K2 0.03, range 255, per RGB channel and
         averaged, borders of 5 px left out), mean over images.
  LPIPS  VGG16 with the lpips v0.1 heads on [-1, 1] images (model/lpips.py, double_rescale=False: the lpips
         package's behaviour), mean over images.
In words: docs/METHOD.md#vae-reconstruction-metrics; the formulas: train/evaluate_vae_metrics.py; the VAE, the
images and the reconstruction: train/evaluate_vae_io.py. Prints a table and writes JSON (--json, default
./vae-eval-<vae>-<images>-r<R>-n<n>.json) with the numbers, the protocol and the VAE's source.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from repae.model.lpips import LPIPS
from repae.model.vae import VAE_CONFIGS

from . import evaluate_inception as inception
from . import evaluate_metrics as metrics
from .evaluate import write_result
from .evaluate_vae_io import DEFAULT_RESOLUTION, image_batches, load_vae, reconstruct
from .evaluate_vae_metrics import ReconstructionScores


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m repae.train.evaluate_vae", description=__doc__.split("\n\n")[0])
    p.add_argument("images", help="image folder (ADM center crop to --resolution) or .npz (arr_0: uint8 [n, R, R, 3])")
    p.add_argument("--vae", required=True, help="run dir, checkpoint, e2e-vae.pt, or diffusers AutoencoderKL file")
    p.add_argument("--vae-config", choices=sorted(VAE_CONFIGS), default=None,
                   help="shape of a bare VAE weights file (default: read from its tensors)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run dir (default: the latest)")
    p.add_argument("--resolution", type=int, default=None,
                   help=f"crop side for a folder (default {DEFAULT_RESOLUTION}); an .npz is used at its own side")
    p.add_argument("--num-images", type=int, default=None, help="the first N images in order (default: all)")
    p.add_argument("--batch-size", type=int, default=50, help="images per VAE forward")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes (folder)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 on GPUs (VAE)")
    p.add_argument("--json", default=None, help="where to write the results (default: in the current folder)")
    p.add_argument("--weights-dir", default=None, help="first folder searched for the Inception and VGG16 weights")
    p.add_argument("--inception-weights", default=None, help=f"default: {inception.INCEPTION_FILE} as found")
    p.add_argument("--lpips-vgg", default=None, help="torchvision vgg16-397923af.pth (default: as found)")
    p.add_argument("--lpips-heads", default=None, help="LPIPS heads vgg.pth (default: the lpips package's)")
    p.add_argument("--allow-random-inception", action="store_true",
                   help="TESTS ONLY: a randomly initialised Inception when no weights are given; rFID is noise")
    p.add_argument("--allow-random-lpips", action="store_true",
                   help="TESTS ONLY: a randomly initialised VGG16 trunk for LPIPS; LPIPS is noise")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------------


def _networks(args: argparse.Namespace) -> tuple[LPIPS, nn.Module, str]:
    """(LPIPS, Inception, Inception identity), or the missing-weights error before any work is done."""
    random_trunk = args.allow_random_lpips and args.lpips_vgg is None
    random_inception = args.allow_random_inception and args.inception_weights is None
    for flag, on, what in (("--allow-random-lpips", random_trunk, "LPIPS VGG16 TRUNK"),
                           ("--allow-random-inception", random_inception, "INCEPTION")):
        if on:
            print(f"WARNING: RANDOMLY INITIALISED {what} ({flag}): the numbers below are meaningless; this mode "
                  "exists for tests only", file=sys.stderr)
    with torch.random.fork_rng(devices=[]):  # a random trunk is the same one every time (seed 0), as Inception's
        torch.manual_seed(0)
        lpips = LPIPS(double_rescale=False, pretrained=not random_trunk, vgg_weights=args.lpips_vgg,
                      weights_dir=args.weights_dir, lin_weights=args.lpips_heads)
    net, net_id = inception.build_inception(args.inception_weights, args.weights_dir, allow_random=random_inception)
    return lpips, net, net_id


def compute(args: argparse.Namespace) -> dict:
    """The results dict of one evaluation (ValueError / FileNotFoundError for bad input)."""
    for flag in ("batch_size", "num_images", "resolution"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    n, side, crop, batches = image_batches(args.images, resolution=args.resolution, num_images=args.num_images,
                                           batch_size=args.batch_size, workers=max(args.workers, 0))
    vae, source = load_vae(args.vae, config=args.vae_config, step=args.step)
    if side % vae.config.factor:
        raise ValueError(f"the images are {side} px, not a multiple of the VAE's factor {vae.config.factor}")
    lpips, net, net_id = _networks(args)
    vae, scores, sizes = vae.to(device), ReconstructionScores(lpips.to(device)), []

    def pairs() -> Iterator[np.ndarray]:
        """Each batch's originals then its reconstructions, one Inception forward; scores as they pass."""
        for images_BRR3 in batches:
            originals = torch.from_numpy(np.ascontiguousarray(images_BRR3)).to(device)
            recons_BRR3 = reconstruct(vae, originals)
            scores.update(originals, recons_BRR3.to(device))
            sizes.append(len(images_BRR3))
            yield np.concatenate([images_BRR3, recons_BRR3.numpy()])

    pool = inception.inception_features(net, pairs(), 2 * n, device, desc="reconstruct + inception")["pool"]
    is_recon = np.concatenate([np.repeat([False, True], size) for size in sizes])
    rfid = metrics.frechet_distance(*metrics.fid_statistics(pool[is_recon]), *metrics.fid_statistics(pool[~is_recon]))
    protocol = {"resolution": side, "crop": crop, "num_images": n, "latent": "posterior mean (deterministic)",
                "quantisation": "uint8 as generated samples (clamp, 255 (x + 1) / 2, truncate)",
                "vae_precision": "fp32" + (" (TF32)" if device.type == "cuda" and args.tf32 else ""),
                "lpips": "VGG16, lpips v0.1 heads, double_rescale=False",
                "ssim": "Gaussian 11x11 sigma 1.5, K1 0.01, K2 0.03, range 255, per channel, 5 px borders left out"}
    return {"rfid": rfid, **scores.summary(), "protocol": protocol, "vae": source,
            "images": os.path.abspath(args.images), "inception": net_id, "device": str(device)}


def format_table(result: dict) -> str:
    """The four metrics and the protocol line."""
    psnr = f"{result['psnr']:.4f} dB"
    if result["psnr_num_identical"]:
        psnr += f" ({result['psnr_num_identical']} exact reconstructions left out of the mean)"
    p = result["protocol"]
    return "\n".join([f"{'rFID':<8} {result['rfid']:.4f}", f"{'PSNR':<8} {psnr}", f"{'SSIM':<8} {result['ssim']:.4f}",
                      f"{'LPIPS':<8} {result['lpips']:.4f}",
                      f"{p['num_images']} images at {p['resolution']} px, crop: {p['crop']}; {p['latent']}"])


def _stem(path: str) -> str:
    """A short file-name part for a path: its base name without extension (the folder for diffusers files)."""
    path = os.path.normpath(os.path.abspath(path))
    name = os.path.splitext(os.path.basename(path))[0]
    if name.startswith("diffusion_pytorch_model"):
        name = os.path.basename(os.path.dirname(path))
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = compute(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"evaluate_vae: {' '.join(line.strip() for line in str(err).splitlines())}", file=sys.stderr)
        return 2
    print(format_table(result))
    p = result["protocol"]
    name = f"vae-eval-{_stem(args.vae)}-{_stem(args.images)}-r{p['resolution']}-n{p['num_images']}.json"
    write_result(result, args.json or name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
