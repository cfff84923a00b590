"""The Inception features of the ADM evaluator, with torch-fidelity's port of the TF FID Inception network, and a
per-file feature cache. Metrics live in `train/evaluate_metrics.py`; the command in `train/evaluate.py`.

Per image (uint8 NHWC of any side R, resized inside the network to 299 with TF1's bilinear rule):
  pool     [2048]   pool_3, for FID, precision/recall                  torch-fidelity feature '2048'
  logits   [1008]   pool_3 @ W of softmax/logits/MatMul (no bias), IS  torch-fidelity 'logits_unbiased'
  spatial  [2023]   mixed_6/conv (Mixed_6d.branch1x1 after ReLU, [17, 17, 192]), its first 7 channels flattened
                    in NHWC order (17 * 17 * 7), for sFID                 a forward hook (torch-fidelity lacks it)
Legend: B batch, R image side, F feature width.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Iterator

import numpy as np
import torch

from repae.model.compat import ensure_torchvision_importable
from repae.model.weights import find_weight_file, load_weights

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
SPATIAL_CHANNELS = 7
CACHE_VERSION = 1
FEATURES = ("pool", "spatial", "logits")


def _unloaded_inception() -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 built without its download or load (weights come later)."""
    ensure_torchvision_importable()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # skips the constructor's own load
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return Unloaded("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=empty)


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an open .npy stream, positioned at the data afterwards."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f".npy format version {version} is not supported (1.0 and 2.0 are)")


def build_inception(weights: str | None = None, weights_dir: str | None = None, *,
                    allow_random: bool = False) -> tuple[torch.nn.Module, str]:
    """(network in eval mode, identity string for the cache). `weights` is a file; else INCEPTION_FILE is looked
    up in weights_dir, $REPAE_WEIGHTS_DIR and the torch hub cache (FileNotFoundError naming all, never a download).
    allow_random: the same network with a fixed random initialisation (tests only: its numbers mean nothing)."""
    net = _unloaded_inception()
    if allow_random:
        gen = torch.Generator().manual_seed(0)
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):  # fan-in scaled, so activations stay O(1)
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        return net.eval(), "random-init-seed0"
    if weights is None:
        weights = find_weight_file(INCEPTION_FILE, weights_dir, what="Inception weights (FID Inception, TF port)",
                                   hint=f"It is published at {INCEPTION_URL}.")
    net = load_weights(net, weights, what="Inception weights").eval()
    return net, f"{os.path.basename(weights)}:{file_fingerprint(weights)}"


def file_fingerprint(path: str) -> str:
    """size, mtime and a hash of the first MiB: cheap, and changes whenever the file is rewritten."""
    stat = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    return f"{stat.st_size}-{stat.st_mtime_ns}-{head}"


def npz_keys(path: str) -> list[str]:
    """Array names in an .npz, without reading them."""
    with zipfile.ZipFile(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def count_images(path: str, name: str = "arr_0") -> int:
    """Number of images in `name` of an .npz, read from the header."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
        shape, _, _ = _npy_header(f)
    return int(shape[0])


def iter_image_batches(path: str, batch_size: int, name: str = "arr_0") -> Iterator[np.ndarray]:
    """uint8 [B, R, R, 3] batches of `name` in an .npz, streamed from the zip (a 50k-image file never sits in
    memory whole). ValueError for a missing array or one that is not uint8 NHWC RGB."""
    with zipfile.ZipFile(path) as zf:
        if f"{name}.npy" not in zf.namelist():
            raise ValueError(f"{path}: no array {name!r} (has {', '.join(npz_keys(path)) or 'nothing'})")
        with zf.open(f"{name}.npy") as f:
            shape, fortran, dtype = _npy_header(f)
            if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
                raise ValueError(f"{path}: {name} must be uint8 [n, R, R, 3] (NHWC RGB), got {dtype} {shape}")
            per_image = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                data = f.read(count * per_image)
                if len(data) != count * per_image:
                    raise ValueError(f"{path}: {name} is truncated")
                yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(count, *shape[1:])


@torch.inference_mode()
def inception_features(net: torch.nn.Module, batches: Iterator[np.ndarray], num_images: int,
                       device: torch.device, desc: str = "inception", progress: bool = True) -> dict[str, np.ndarray]:
    """{'pool': [n, 2048], 'spatial': [n, 2023], 'logits': [n, 1008]} float32, batches forwarded on `device`
    with a progress bar (`progress=False`: none, e.g. on the ranks other than 0)."""
    from tqdm.auto import tqdm

    captured = []
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda _m, _i, out: captured.append(out))
    net = net.to(device)
    out = {name: [] for name in FEATURES}
    try:
        with tqdm(total=num_images, desc=desc, unit="img", disable=not progress) as bar:
            for images_BRR3 in batches:
                x_B3RR = torch.from_numpy(np.ascontiguousarray(images_BRR3)).to(device).permute(0, 3, 1, 2)
                pool_BF, logits_BF = net(x_B3RR)
                spatial_BHWF = captured.pop()[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # NHWC, as TF flattens
                out["pool"].append(pool_BF.float().cpu())
                out["logits"].append(logits_BF.float().cpu())
                out["spatial"].append(spatial_BHWF.reshape(len(x_B3RR), -1).float().cpu())
                bar.update(len(x_B3RR))
    finally:
        hook.remove()
    return {name: torch.cat(parts).numpy() for name, parts in out.items()}


def cache_path(path: str, cache_dir: str | None) -> str:
    """`<file>.inception.npz` beside the file, or in cache_dir under the file's name."""
    if cache_dir is None:
        return path + ".inception.npz"
    return os.path.join(cache_dir, os.path.basename(path) + ".inception.npz")


def cached_features(path: str, net: torch.nn.Module, net_id: str, *, device: torch.device, batch_size: int,
                    cache_dir: str | None = None, use_cache: bool = True) -> dict[str, np.ndarray]:
    """The features of `path`'s images, read from its cache when the cache's key (file fingerprint, network
    identity, cache version) matches, else computed and the cache rewritten atomically."""
    key = f"v{CACHE_VERSION}|{file_fingerprint(path)}|{net_id}"
    cache = cache_path(path, cache_dir)
    if use_cache and os.path.isfile(cache):
        with np.load(cache) as z:
            if str(z["key"]) == key:
                return {name: z[name] for name in FEATURES}
    feats = inception_features(net, iter_image_batches(path, batch_size), count_images(path), device,
                               desc=os.path.basename(path))
    if use_cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        tmp = cache + ".tmp.npz"
        np.savez(tmp, key=np.array(key), **feats)
        os.replace(tmp, cache)
    return feats
