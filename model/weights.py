"""One loader for weight files: `.pt`/`.pth`/`.bin` (torch.load, weights_only) and `.safetensors`.

    obj = read_weight_file("exps/run/checkpoints/0400000.pt")        # whole checkpoint dict
    sd  = state_dict_from(obj, key="ema")                             # one entry of it
    load_weights(model, "e2e-sdvae.pt")                               # strict, clear errors
    save_weights(model.state_dict(), "model.safetensors")

The released REPA-E checkpoints hold an `argparse.Namespace` under `args`; `torch.load` with
`weights_only=True` refuses it, so exactly that class is allowed (docs/METHOD.md#bugs-of-the-original-code, item 12),
nothing else. Loading is strict by default: a mismatch raises one ValueError naming every missing and unexpected key and
every shape that differs, never a silently half-loaded model (docs/METHOD.md#bugs-of-the-original-code, item 5). This
file must not hold model code or key remaps (those live beside their models).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

KEY_ORDER_META = "repae_key_order"
WEIGHTS_DIR_ENV = "REPAE_WEIGHTS_DIR"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")

StateDict = dict[str, torch.Tensor]


def _check_file(path: str | os.PathLike, what: str = "weight file") -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"{what} {path}: unknown format, expected one of {', '.join(WEIGHT_SUFFIXES)}")
    return path


def read_weight_file(path: str | os.PathLike, *, what: str = "weight file") -> dict:
    """The object stored in `path` (a dict), on CPU. `.safetensors` gives a flat tensor dict."""
    path = _check_file(path, what)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            # safetensors stores keys sorted; files we write carry the state_dict order in the metadata.
            order = json.loads((f.metadata() or {}).get(KEY_ORDER_META, "[]"))
            keys = [k for k in order if k in f.keys()] + sorted(set(f.keys()) - set(order))
            return {k: f.get_tensor(k) for k in keys}
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors name the offending global; keep that message
            raise ValueError(f"{what} {path} could not be read with weights_only=True: {err}") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what} {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj)


def state_dict_from(obj: Mapping, key: str | None = None, *, source: str = "checkpoint") -> StateDict:
    """The state dict inside a checkpoint: `obj[key]` when key is given, else obj itself.

    Common wrappers are unwrapped when key is None and obj is not already flat: `state_dict`, `model`
    (timm/lightning exports), and the `module.` prefix of DDP-saved files is stripped.
    """
    if key is not None:
        if key not in obj:
            raise ValueError(f"{source} has no entry {key!r}; it holds {sorted(map(str, obj))}")
        obj = obj[key]
    elif not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: entries {bad[:8]} are not tensors; pass key= to pick the state dict "
                         f"(entries: {sorted(map(str, obj))[:16]})")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def describe_mismatch(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
                      limit: int = 20) -> str:
    """Missing keys, unexpected keys and shape differences, one per line ("" if none)."""
    lines = []
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [k for k in expected if k in got and tuple(expected[k].shape) != tuple(got[k].shape)]
    for title, keys, fmt in (
        ("missing", missing, lambda k: f"{k} {tuple(expected[k].shape)}"),
        ("unexpected", unexpected, lambda k: f"{k} {tuple(got[k].shape)}"),
        ("shape mismatch", shapes, lambda k: f"{k}: model {tuple(expected[k].shape)}, file {tuple(got[k].shape)}"),
    ):
        if keys:
            lines.append(f"  {len(keys)} {title}: " + ", ".join(fmt(k) for k in keys[:limit])
                         + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""))
    return "\n".join(lines)


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True,
                            source: str = "state dict") -> list[str]:
    """module.load_state_dict with one readable error; returns the keys that were not loaded.

    strict=True: any missing/unexpected key or shape difference is a ValueError naming all of them.
    strict=False: shape differences are still errors (a wrong shape is never "close enough"); the
    missing keys are returned (and unexpected ones ignored).
    """
    expected = module.state_dict()
    report = describe_mismatch(expected, state_dict)
    shape_bad = any(k in state_dict and tuple(v.shape) != tuple(state_dict[k].shape) for k, v in expected.items())
    if report and (strict or shape_bad):
        raise ValueError(f"{source} does not match {type(module).__name__}:\n{report}")
    result = module.load_state_dict(dict(state_dict), strict=strict)
    return list(result.missing_keys)


def load_weights(module: nn.Module, path: str | os.PathLike, *, key: str | None = None, strict: bool = True,
                 remap: Callable[[StateDict], StateDict] | None = None, what: str = "weight file") -> nn.Module:
    """Read `path`, pick `key`, apply `remap` (e.g. diffusers -> LDM names), load strictly; returns module."""
    obj = read_weight_file(path, what=what)
    sd = state_dict_from(obj, key, source=os.fspath(path))
    if remap is not None:
        sd = remap(sd)
    load_state_dict_checked(module, sd, strict=strict, source=os.fspath(path))
    return module


def weight_search_dirs(weights_dir: str | os.PathLike | None = None) -> list[str]:
    """Where a pretrained file named by the code is looked for, in order: weights_dir, $REPAE_WEIGHTS_DIR,
    torch hub's checkpoint cache (where torch.hub / torchvision would have saved it)."""
    dirs = [os.fspath(weights_dir)] if weights_dir is not None else []
    if os.environ.get(WEIGHTS_DIR_ENV):
        dirs.append(os.environ[WEIGHTS_DIR_ENV])
    dirs.append(os.path.join(torch.hub.get_dir(), "checkpoints"))
    return dirs


def find_weight_file(file_name: str, weights_dir: str | os.PathLike | None = None, *, what: str,
                     hint: str = "") -> str:
    """The first `file_name` in weight_search_dirs(); else FileNotFoundError naming the file, every folder
    searched and `hint` (how to pass a path, where the file is published). Nothing is ever downloaded."""
    dirs = weight_search_dirs(weights_dir)
    for folder in dirs:
        path = os.path.join(folder, file_name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{what} not found: no {file_name} in {', '.join(dirs)}. Put the file in one of them "
                            f"(e.g. ${WEIGHTS_DIR_ENV}). {hint}".rstrip())


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict as `.safetensors` (contiguous copies, shared storage split) or torch `.pt`.

    Written to `path + ".tmp"` first and renamed, so a crash never leaves a truncated file at `path`.
    """
    path = os.fspath(path)
    tmp = path + ".tmp"
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, tmp,
                  metadata={KEY_ORDER_META: json.dumps(list(state_dict))})
    elif path.endswith(WEIGHT_SUFFIXES):
        torch.save(dict(state_dict), tmp)
    else:
        raise ValueError(f"save_weights: unknown format for {path}, expected one of {', '.join(WEIGHT_SUFFIXES)}")
    os.replace(tmp, path)
