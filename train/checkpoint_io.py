"""Reading and writing one checkpoint file, and removing folders, safely (the layout: train/checkpoint.py).

- load_file: torch.load(weights_only=True) with the few DeepSpeed classes its ZeRO files pickle allowed
  (safe_globals); a file that pickles anything else is refused, never run; a missing, empty, truncated or foreign
  file is one CheckpointError line naming it.
- save_file: torch.save through a file object, fsync'd; a full disk is DiskFullError naming the path.
- SafeCheckpointEngine: DeepSpeed's checkpoint engine with these two functions as its reader and writer.
- remove_tree: unlinks a symlink, never follows it.
The layout of a checkpoint folder is train/checkpoint.py's business, not this file's.
"""

from __future__ import annotations

import collections
import errno
import functools
import os
import pickle
import re
import shutil
import struct
import zipfile

import torch

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used or written; one line naming the file, rank or key (a ValueError, so the
    entry point prints it as one line)."""


class DiskFullError(CheckpointError):
    """No space left (or quota exceeded) while writing a checkpoint; the partial folder is already removed."""


class StageMismatch(CheckpointError):
    """A checkpoint of another stage (other engines) than the run's: refused, never a reason to fall back."""


def one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return ascii(text[:limit])[1:-1]



@functools.cache
def safe_globals() -> tuple:
    """The classes beyond torch's weights-only defaults that our files pickle: DeepSpeed's ZeRO optimizer state
    holds its loss scaler, ZeroStageEnum and tensor-fragment addresses (found with pickletools on stage 0/1/2
    checkpoints; fp16 mode uses DynamicLossScaler). Unpickling them builds plain objects and runs nothing else."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # no DeepSpeed: PlainEngine checkpoints need none of them
        return ()
    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def _load_reason(err: Exception) -> str:
    text = str(err)
    if (m := re.search(r"GLOBAL ([\w.]+)", text)) is not None:
        return (f"refused: it pickles {m.group(1)}, which weights-only loading does not allow (nothing was run; "
                f"this trainer never writes it)")
    if "central directory" in text or "PytorchStreamReader" in text:
        return "truncated or not a torch file (its zip archive is incomplete)"
    # struct.error / "unexpected EOF": a legacy-format file cut inside a record / inside its tensor data
    if isinstance(err, (EOFError, struct.error)) or "unexpected EOF" in text:
        return "truncated (unexpected end of file)"
    if (m := re.search(r"Unsupported operand \d+", text)) is not None:
        return f"not a torch checkpoint file ({m.group(0)})"
    return f"unreadable ({type(err).__name__}: {one_line(err)})"


ZIP_HEADER = b"PK\x03\x04"
"""First bytes of torch's (zip) format; the legacy format starts with the pickled torch magic number."""
LEGACY_HEADER = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


def load_file(path: str, *, map_location="cpu", mmap: bool = False):
    """torch.load(weights_only=True) with safe_globals() allowed; CheckpointError '<path>: <reason>' otherwise.
    mmap=True maps the tensors instead of reading them (validation: the pickle is checked, the data not read)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_HEADER))
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and (head.startswith(ZIP_HEADER) or ZIP_HEADER.startswith(head)):
        raise CheckpointError(f"{path}: truncated (its zip archive is incomplete)")
    if len(head) < len(LEGACY_HEADER) and LEGACY_HEADER.startswith(head):
        raise CheckpointError(f"{path}: truncated (cut inside the legacy format's header)")
    if not is_zip and not head.startswith(LEGACY_HEADER):  # what any unpickler would make of it is noise
        raise CheckpointError(f"{path}: not a torch checkpoint file (starts with {head[:8]!r}, neither torch's zip "
                              f"format nor its legacy one)")
    mmap = mmap and is_zip  # the legacy (non-zip) format cannot be mapped
    with torch.serialization.safe_globals(list(safe_globals())):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as err:  # noqa: BLE001 - every failure becomes one line naming the file
            raise CheckpointError(f"{path}: {_load_reason(err)}") from err


def need_keys(obj, keys, path: str) -> dict:
    """obj as a dict holding every key, else CheckpointError naming the file and the first missing key."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: no entry {missing[0]!r} (written by another version, or damaged)")
    return obj


def check_plain(obj, where: str) -> None:
    """Assert that obj is made of what weights-only loading reads back (a bug guard for what the trainer saves)."""
    if isinstance(obj, (torch.Tensor, torch.Size, int, float, bool, str, type(None))):
        return
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            check_plain(k, where)
            check_plain(v, f"{where}.{k}")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}: checkpoints hold only tensors, dicts, lists, numbers and "
                    f"strings (weights-only loadable)")


def save_file(obj, path: str, *, zip_format: bool = True) -> None:
    """torch.save through a file object (so a full disk is OSError ENOSPC, not torch's 'unexpected pos'), fsync'd.
    Raises DiskFullError naming the path on ENOSPC/EDQUOT, other OSErrors as they are."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f, _use_new_zipfile_serialization=zip_format)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        if err.errno in DISK_FULL:
            raise DiskFullError(f"disk full while writing {path} ({os.strerror(err.errno)})") from err
        raise


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with our reader and writer; everything else is the engine it wraps.

    load() is load_file (weights_only + safe_globals). save() keeps a failure instead of raising it, so that this
    rank still reaches DeepSpeed's barriers; the caller reads `failure` after engine.save_checkpoint."""

    def __init__(self, inner):
        self.inner = inner
        self.failure: str | None = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def load(self, path: str, map_location=None):
        return load_file(path, map_location=map_location)

    def save(self, state_dict, path: str):
        if self.failure is not None:
            return  # this save already failed: write nothing more, only keep step with the other ranks
        try:
            save_file(state_dict, path, zip_format=getattr(self.inner, "zipfile_serialization", True))
        except (OSError, CheckpointError) as err:
            self.failure = failure_text(path, err)


def safe_engine(engine) -> SafeCheckpointEngine:
    """Install (once) and return the SafeCheckpointEngine of a DeepSpeed engine."""
    current = engine.checkpoint_engine
    if isinstance(current, SafeCheckpointEngine):
        return current
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(f"DeepSpeed checkpoint engine {type(current).__name__} is not supported (config key "
                              f"deepspeed.checkpoint): only the default torch engine, which we load weights-only")
    if engine.load_universal_checkpoint():
        raise CheckpointError("config key deepspeed.checkpoint.load_universal is not supported: DeepSpeed reads "
                              "universal checkpoints with torch.load(weights_only=False)")
    engine.checkpoint_engine = SafeCheckpointEngine(current)
    return engine.checkpoint_engine


def failure_text(path: str, err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno in DISK_FULL:
        return f"disk full while writing {path} ({os.strerror(err.errno)})"
    if isinstance(err, CheckpointError):
        return str(err)
    return f"could not write {path} ({type(err).__name__}: {one_line(err)})"


def remove_tree(path: str) -> None:
    """Remove a folder, file or symlink at path; a symlink is unlinked, never followed (rmtree does not follow
    the links inside a folder either)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)



def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
