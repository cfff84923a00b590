"""Checkpoints on disk: the layout, atomic writes, validation with fallback, pruning, and loading that never
runs code from a file.

    <run_dir>/checkpoints/
        latest                   one line, the name of the newest complete step folder (step0000400)
        step0000400/             one complete checkpoint: a real folder (a symlink is never used or followed)
            trainer.pt           rank 0: step, EMA, step generator, data position, NaN counters, history,
                                 config (a dict), world_size, finite (every weight, buffer and EMA value finite)
            rng_rank<r>.pt       torch (and CUDA) RNG states of rank r
            sit/ vae/ disc/      DeepSpeed engine folders: mp_rank_00_model_states.pt (weights, and the
                                 optimizer at ZeRO stage 0), [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt
                                 (ZeRO 1/2: rank r's partition of the optimizer states)
            sit.pt vae.pt ...    the same without DeepSpeed (PlainEngine): {"module", "optimizer"}
        .tmp-step0000400/        a checkpoint being written, renamed to step0000400 once every rank is done

What this file guarantees:
- Loading: every file goes through torch.load(weights_only=True) with SAFE_GLOBALS allowed (four DeepSpeed
  classes its ZeRO files pickle: loss scalers, the stage enum, fragment addresses), DeepSpeed's own reads
  included (SafeCheckpointEngine replaces its loader). A file that pickles anything else is refused, never run.
- Resuming: `latest` must hold a plain step name; a path (absolute, `..`, separators) or a symlink is refused.
  The checkpoint is validated (every expected file present and loadable) before anything is loaded; a damaged
  one falls back to the newest complete older one, with a line naming the file and the reason; none usable is
  one line and the run stops. A checkpoint whose state is not finite is resumed (it is what `latest` names) with
  a warning naming the newest finite one (write its name into `latest` to resume from it instead).
- Config on resume (check_resume): another model (MODEL_KEYS) or engine layout (ENGINE_KEYS) is refused naming
  the key; new optimizer settings (OPTIM_KEYS) are applied to the loaded optimizers and logged old -> new;
  another world size resumes at ZeRO stage 0 or without DeepSpeed (whole optimizer on every rank; the step math
  does not depend on the world size) and is refused at ZeRO 1/2 (optimizer states partitioned per rank).
- Writing: into .tmp-stepN through file objects (fsync'd), then rename and `latest`. A write error on any rank
  (all ranks agree on it, so none waits forever) removes the temp folder and keeps the previous checkpoint and
  `latest`; a full disk says "disk full while writing <path>". Stale temp folders are removed at start-up.
- Pruning: the keep_last newest, plus the newest finite one while all kept ones are non-finite; folders newer
  than the one just written (left from a timeline abandoned by a fallback) are removed. Deleting a symlink
  removes the link, never what it points to.
This file holds no training logic: the trainer hands in its engines and its state dict.
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
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .step import PlainEngine

CKPT_DIR = "checkpoints"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TRAINER_FILE = "trainer.pt"
MODEL_STATES = "mp_rank_00_model_states.pt"
STEP_RE = re.compile(r"step([0-9]{7,})")
TRAINER_KEYS = ("step", "ema", "random", "data", "nan_counts", "nan_total", "history", "config", "world_size")
# Config keys whose change means another model (other parameter shapes or meaning): refused on resume.
# sit.freeze_pos_embed changes which parameters the SiT optimizer holds.
MODEL_KEYS = ("sit.name", "sit.overrides", "sit.encoder_depth", "sit.projector_dim", "sit.num_classes", "sit.qk_norm",
              "sit.freeze_pos_embed", "vae.name", "vae.overrides", "encoder.enc_type", "data.resolution")
# DeepSpeed settings that change the optimizer's file layout (defaults as DeepSpeed reads them): refused.
ENGINE_KEYS = {"deepspeed.zero_optimization.stage": 0, "deepspeed.bf16.enabled": False,
               "deepspeed.fp16.enabled": False}
# AdamW settings applied to the loaded optimizer param groups (torch's load_state_dict restores the old ones).
OPTIM_KEYS = ("lr", "betas", "eps", "weight_decay")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used or written; one line naming the file, rank or key (a ValueError, so the
    entry point prints it as one line)."""


class DiskFullError(CheckpointError):
    """No space left (or quota exceeded) while writing a checkpoint; the partial folder is already removed."""


def step_name(step: int) -> str:
    return f"step{step:07d}"


def _step_of(name: str) -> int:
    return int(STEP_RE.fullmatch(name).group(1))


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return ascii(text[:limit])[1:-1]


# ---------------------------------------------------------------------------------------------------
# Reading and writing one file
# ---------------------------------------------------------------------------------------------------


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
    return f"unreadable ({type(err).__name__}: {_one_line(err)})"


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


def _check_plain(obj, where: str) -> None:
    """Assert that obj is made of what weights-only loading reads back (a bug guard for what the trainer saves)."""
    if isinstance(obj, (torch.Tensor, torch.Size, int, float, bool, str, type(None))):
        return
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}.{k}")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
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
            self.failure = _failure_text(path, err)


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


def _failure_text(path: str, err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno in DISK_FULL:
        return f"disk full while writing {path} ({os.strerror(err.errno)})"
    if isinstance(err, CheckpointError):
        return str(err)
    return f"could not write {path} ({type(err).__name__}: {_one_line(err)})"


def all_finite(modules) -> bool:
    """True when every floating-point parameter and buffer of the modules is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for m in modules for t in m.state_dict().values()
             if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


# ---------------------------------------------------------------------------------------------------
# Folder operations that never follow a symlink
# ---------------------------------------------------------------------------------------------------


def remove_tree(path: str) -> None:
    """Remove a folder, file or symlink at path; a symlink is unlinked, never followed (rmtree does not follow
    the links inside a folder either)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def remove_stale_temps(root: str) -> list[str]:
    """Remove what an interrupted write left in root (.tmp-* folders, latest.tmp); returns the names removed."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(TMP_PREFIX) or n == LATEST + ".tmp")
    for name in names:
        remove_tree(os.path.join(root, name))
    return names


def step_folders(root: str) -> list[str]:
    """Names in root that look like step folders (real folders or not), oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted((n for n in os.listdir(root) if STEP_RE.fullmatch(n)), key=_step_of)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_latest(root: str, name: str) -> None:
    """Point `latest` at name atomically; a file or symlink planted at latest.tmp is removed, not written through."""
    tmp = os.path.join(root, LATEST + ".tmp")
    remove_tree(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))  # replaces a symlink `latest` itself, never its target
    _fsync_dir(root)


# ---------------------------------------------------------------------------------------------------
# Validation and the choice of the checkpoint to resume
# ---------------------------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """What validation learned about one complete checkpoint (small: no tensors)."""

    path: str
    step: int
    world_size: int
    finite: bool
    config: dict
    partitioned: dict[str, int] = field(default_factory=dict)
    """DeepSpeed engines whose optimizer states are partitioned (ZeRO 1/2) -> the world size that wrote them."""
    notes: list[str] = field(default_factory=list)
    """What was broken on the way here (fallbacks), one line each."""


def engine_kinds(engines: dict) -> dict[str, str]:
    return {k: "plain" if isinstance(e, PlainEngine) else "deepspeed" for k, e in engines.items()}


def kinds_on_disk(path: str, names=("sit", "vae", "disc")) -> dict[str, str]:
    """The engine kinds a checkpoint folder was written with (export: no engines to ask)."""
    return {k: "plain" if os.path.isfile(os.path.join(path, f"{k}.pt")) else "deepspeed" for k in names}


def _need(obj, keys, path: str) -> dict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: no entry {missing[0]!r} (written by another version, or damaged)")
    return obj


def _optim_file(folder: str, rank: int) -> str:
    for prefix in ("", "bf16_"):
        path = os.path.join(folder, f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        if os.path.isfile(path):
            return path
    return os.path.join(folder, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")  # missing: load_file says so


def validate(path: str, kinds: dict[str, str]) -> CheckpointInfo:
    """Every file a resume reads is present, weights-only loadable and shaped as we write it (tensors are mapped,
    not read); CheckpointError naming the first bad file and why."""
    root = os.path.dirname(path)
    if os.path.islink(path):
        raise CheckpointError(f"{path} is a symbolic link (checkpoints are real folders inside {root})")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: missing folder")
    trainer_file = os.path.join(path, TRAINER_FILE)
    state = _need(load_file(trainer_file, mmap=True), TRAINER_KEYS, trainer_file)
    name = os.path.basename(path)
    if STEP_RE.fullmatch(name) and state["step"] != _step_of(name):
        raise CheckpointError(f"{trainer_file}: holds step {state['step']}, not the folder's {_step_of(name)}")
    world = state["world_size"]
    if not isinstance(world, int) or world < 1:
        raise CheckpointError(f"{trainer_file}: world_size {world!r} is not a positive integer")
    for r in range(world):
        rng_file = os.path.join(path, f"rng_rank{r}.pt")
        _need(load_file(rng_file, mmap=True), ("torch",), rng_file)
    partitioned = {}
    for key, kind in kinds.items():
        if kind == "plain":
            file = os.path.join(path, f"{key}.pt")
            _need(load_file(file, mmap=True), ("module", "optimizer"), file)
            continue
        folder = os.path.join(path, key)
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: missing engine folder (DeepSpeed engine {key})")
        file = os.path.join(folder, MODEL_STATES)
        states = _need(load_file(file, mmap=True), ("module", "optimizer", "dp_world_size"), file)
        if states["optimizer"] is None:  # ZeRO 1/2: one optimizer partition per rank of the writing run
            dp = states["dp_world_size"]
            for r in range(dp):
                optim = _optim_file(folder, r)
                _need(load_file(optim, mmap=True), ("optimizer_state_dict",), optim)
            partitioned[key] = dp
    return CheckpointInfo(path=path, step=state["step"], world_size=world, finite=bool(state.get("finite", True)),
                          config=state["config"], partitioned=partitioned)


def _read_pointer(root: str) -> tuple[str | None, str | None]:
    """(step name, None) when `latest` is good; (None, problem) when it is damaged; CheckpointError when it points
    outside root. (None, None): no `latest`."""
    pointer = os.path.join(root, LATEST)
    if os.path.islink(pointer):
        raise CheckpointError(f"{pointer} is a symbolic link: refusing to follow it (it must be a file holding a "
                              f"step folder name)")
    if not os.path.lexists(pointer):
        return None, None
    if not os.path.isfile(pointer):
        return None, f"{pointer} is not a file"
    with open(pointer, "rb") as f:
        text = f.read(256).decode("utf-8", errors="replace").strip()
    if not text:
        return None, f"{pointer} is empty"
    if "/" in text or "\\" in text or ".." in text or os.path.isabs(text):
        raise CheckpointError(f"{pointer} holds {ascii(text[:80])}: `latest` must name a step folder inside {root} "
                              f"(like step0000100), not a path; refusing to follow it")
    if not STEP_RE.fullmatch(text):
        return None, f"{pointer} holds {ascii(text[:40])}, not a step folder name (like step0000100)"
    return text, None


def resolve(root: str, step: int | None = None) -> str:
    """The folder `latest` names (or step<step>), strictly inside root; no fallback (export)."""
    if step is not None:
        return os.path.join(root, step_name(step))
    name, problem = _read_pointer(root)
    if problem is not None:
        raise CheckpointError(f"{problem}: pass --step to pick a checkpoint")
    if name is None:
        raise CheckpointError(f"no checkpoint in {root} (no `latest` file)")
    return os.path.join(root, name)


def select(root: str, kinds: dict[str, str]) -> CheckpointInfo | None:
    """The checkpoint to resume: the one `latest` names when it validates, else the newest complete older one
    (info.notes say what was broken). None: no checkpoint at all. CheckpointError: none usable, or `latest`
    points outside root."""
    names = step_folders(root)
    name, problem = _read_pointer(root)
    problems = []
    if name is None and problem is None:
        if not names:
            return None
        problem = f"{os.path.join(root, LATEST)} is missing"
    if problem is not None:
        problems.append(problem)
        candidates = names[::-1]
    else:
        candidates = [name] + [n for n in names[::-1] if _step_of(n) < _step_of(name)]
    for n in candidates:
        try:
            info = validate(os.path.join(root, n), kinds)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        info.notes = [f"{p}: resuming from {info.path} instead" for p in problems]
        if not info.finite:
            finite = next((m for m in names[::-1] if _step_of(m) < info.step and _finite_on_disk(root, m)), None)
            if finite is not None:
                info.notes.append(f"WARNING: {info.path} holds non-finite values; the newest finite checkpoint is "
                                  f"{finite} (write that name into {os.path.join(root, LATEST)} to resume from it)")
        return info
    raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(problems))


def _finite_on_disk(root: str, name: str) -> bool:
    """The finite flag of a folder's trainer.pt (unreadable: False; written before the flag existed: True)."""
    path = os.path.join(root, name)
    if os.path.islink(path):
        return False
    try:
        return bool(load_file(os.path.join(path, TRAINER_FILE), mmap=True).get("finite", True))
    except (CheckpointError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------------
# Config on resume
# ---------------------------------------------------------------------------------------------------


_MISSING = "(not in the checkpoint's config)"


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _has(d: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def check_resume(info: CheckpointInfo, config: dict, world: int) -> list[str]:
    """Refuse what cannot resume (another model, engine layout, or world size at ZeRO 1/2), naming the key; return
    one line per other config difference (the optimizer ones are applied by apply_optimizer_settings)."""
    old, new = _flatten(info.config), _flatten(config)
    known = [m for m in MODEL_KEYS if _has(info.config, m)]  # a field newer than the checkpoint: the load decides
    for key in sorted(set(old) | set(new)):
        if any(key == m or key.startswith(m + ".") for m in known) and old.get(key) != new.get(key):
            raise CheckpointError(f"config key {key}={new.get(key)!r} differs from {old.get(key, _MISSING)!r} in "
                                  f"{info.path}: the checkpoint holds another model (resume with the same value, or "
                                  f"start a new logging.run_dir)")
    for key, default in ENGINE_KEYS.items():
        if old.get(key, default) != new.get(key, default):
            raise CheckpointError(f"config key {key}={new.get(key, default)!r} differs from {old.get(key, default)!r} "
                                  f"in {info.path}: DeepSpeed stores the optimizer in another layout (resume with "
                                  f"the same value)")
    for key, dp in info.partitioned.items():
        if dp != world:
            raise CheckpointError(f"{info.path} was written by {_ranks(dp)} with ZeRO stage "
                                  f"{old.get('deepspeed.zero_optimization.stage')}, which partitions the {key} "
                                  f"optimizer states per rank; this run has {_ranks(world)}: resume with "
                                  f"{_ranks(dp)} (ZeRO stage 0 checkpoints resume at any world size)")
    notes = [f"{k}: {old.get(k, _MISSING)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if old.get(k, _MISSING) != new.get(k, _MISSING) and not k.startswith("optim_")]
    if info.world_size != world:
        notes.append(f"world size: {info.world_size} -> {world} (the step's draws and data order are global; "
                     f"ranks without an rng_rank file keep their fresh torch RNG state)")
    return notes


def apply_optimizer_settings(engines: dict, sections: dict, old_config: dict) -> list[str]:
    """Set lr, betas, eps, weight_decay and grad_clip of the config on the loaded optimizers (loading restores the
    checkpoint's, ZeRO's clip value included); one line per value that changed, old -> new."""
    notes = []
    for key, engine in engines.items():
        section, old = sections[key], old_config.get(f"optim_{key}", {})
        opt = engine.optimizer
        inner = getattr(opt, "optimizer", opt)  # the torch AdamW inside DeepSpeed's ZeRO / bf16 wrappers
        for name in OPTIM_KEYS:
            value = getattr(section, name)
            for group in inner.param_groups:
                group[name] = tuple(value) if isinstance(value, (tuple, list)) else value
        if isinstance(engine, PlainEngine):
            engine.grad_clip = section.grad_clip
        elif hasattr(opt, "clip_grad"):
            opt.clip_grad = section.grad_clip
        for name in (*OPTIM_KEYS, "grad_clip"):
            before, now = old.get(name, _MISSING), getattr(section, name)
            if (tuple(before) if isinstance(before, (list, tuple)) else before) != now:
                notes.append(f"optim_{key}.{name}: {before!r} -> {now!r} (applied to the loaded optimizer)")
    return notes


# ---------------------------------------------------------------------------------------------------
# Collective helpers: every rank reaches the same decision, so none waits in a barrier forever
# ---------------------------------------------------------------------------------------------------


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _agree(failure: str | None, device: torch.device) -> str | None:
    """The first failure of any rank (None: every rank succeeded)."""
    if _world() == 1:
        return failure
    flag = torch.tensor([0.0 if failure is None else 1.0], device=device)
    dist.all_reduce(flag)
    if float(flag) == 0:
        return None
    texts = [None] * _world()
    dist.all_gather_object(texts, failure)
    return next((f"{t} (rank {r})" for r, t in enumerate(texts) if t is not None), None)


def on_rank0(fn, device: torch.device):
    """fn() on rank 0, its result (or its CheckpointError) on every rank."""
    result, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn()
        except CheckpointError as err:
            error = str(err)
    if _world() > 1:
        box = [result, error]
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        result, error = box
    if error is not None:
        raise CheckpointError(error)
    return result


# ---------------------------------------------------------------------------------------------------
# Save, load, prune
# ---------------------------------------------------------------------------------------------------


def save(root: str, step: int, engines: dict, trainer_state: dict | None, *, rank: int, keep_last: int,
         device: torch.device, log=print) -> str:
    """Write root/step<step> atomically (every rank calls it; trainer_state from rank 0) and prune; returns its
    path. A failure on any rank removes the temp folder and raises one CheckpointError on every rank."""
    name = step_name(step)
    tmp, final = os.path.join(root, TMP_PREFIX + name), os.path.join(root, name)
    previous = os.path.join(root, LATEST)
    failure = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            remove_stale_temps(root)
            os.makedirs(tmp)
        except OSError as err:
            failure = _failure_text(tmp, err)
    if (failure := _agree(failure, device)) is not None:
        raise (DiskFullError if failure.startswith("disk full") else CheckpointError)(failure)

    def write(obj, path):
        nonlocal failure
        if failure is None:
            try:
                _check_plain(obj, os.path.basename(path))
                save_file(obj, path)
            except (OSError, CheckpointError, TypeError) as err:  # TypeError: _check_plain
                failure = _failure_text(path, err)

    for key, engine in engines.items():
        if isinstance(engine, PlainEngine):
            if rank == 0:
                write({"module": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict()},
                      os.path.join(tmp, f"{key}.pt"))
            continue
        writer = safe_engine(engine)
        writer.failure = failure  # after a failure, DeepSpeed only keeps step with the other ranks
        try:
            engine.save_checkpoint(tmp, tag=key, save_latest=False)
        except OSError as err:  # outside its checkpoint engine (the recovery scripts it copies)
            failure = failure or _failure_text(os.path.join(tmp, key), err)
        failure = failure or writer.failure
        writer.failure = None
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    write(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        write(trainer_state, os.path.join(tmp, TRAINER_FILE))
    if (failure := _agree(failure, device)) is None and rank == 0:
        try:
            remove_tree(final)  # an older folder of this name, or a file / symlink planted here
            os.replace(tmp, final)
            _fsync_dir(root)
            write_latest(root, name)
        except OSError as err:
            failure = _failure_text(os.path.join(root, LATEST), err)
    failure = _agree(failure, device)
    if failure is not None:
        if rank == 0:
            remove_tree(tmp)
            remove_tree(os.path.join(root, LATEST + ".tmp"))
        kept = f"kept {previous} ({open(previous).read().strip()})" if os.path.isfile(previous) else "no earlier one"
        if dist.is_initialized():
            dist.barrier()
        raise (DiskFullError if failure.startswith("disk full") else CheckpointError)(
            f"{failure}: removed the partial {tmp}, {kept}")
    if rank == 0:
        for line in prune(root, keep_last, name, finite=bool(trainer_state.get("finite", True))):
            log(line)
    if dist.is_initialized():
        dist.barrier()
    return final


def prune(root: str, keep_last: int, current: str, *, finite: bool) -> list[str]:
    """Delete step folders beyond the keep_last newest up to `current` (the one just written) and every folder newer
    than it; the newest finite one stays while all kept ones are non-finite. Returns a line per kept-back folder."""
    names = step_folders(root)
    now = _step_of(current)
    newer = [n for n in names if _step_of(n) > now]
    upto = [n for n in names if _step_of(n) <= now]
    keep, lines = upto[-keep_last:], []
    if not finite and not any(_finite_on_disk(root, n) for n in keep if n != current):
        older_finite = next((n for n in upto[:-keep_last][::-1] if _finite_on_disk(root, n)), None)
        if older_finite is not None:
            keep.append(older_finite)
            lines.append(f"keeping {os.path.join(root, older_finite)}: the newest checkpoint with finite state (the "
                         f"{len(keep) - 1} newer ones hold non-finite values)")
    for n in newer:
        lines.append(f"removing {os.path.join(root, n)}: newer than {current}, left from an abandoned run")
    for n in newer + [n for n in upto if n not in keep]:
        remove_tree(os.path.join(root, n))
    return lines


def load_engines(path: str, engines: dict, device: torch.device) -> None:
    """Load every engine's weights and optimizer from a validated checkpoint (weights-only, DeepSpeed's files too)."""
    for key, engine in engines.items():
        where = os.path.join(path, f"{key}.pt" if isinstance(engine, PlainEngine) else key)
        try:
            if isinstance(engine, PlainEngine):
                state = load_file(where, map_location=device)
                engine.module.load_state_dict(state["module"])
                engine.optimizer.load_state_dict(state["optimizer"])
                continue
            safe_engine(engine)
            loaded, _ = engine.load_checkpoint(path, tag=key, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - DeepSpeed's asserts and state-dict mismatches, as one line
            raise CheckpointError(f"{where}: could not be loaded into the {key} engine ({type(err).__name__}: "
                                  f"{_one_line(err)})") from err
        if loaded is None:
            raise CheckpointError(f"{where}: DeepSpeed found no model states to load")


def load_state(path: str, rank: int) -> tuple[dict, dict | None]:
    """trainer.pt and this rank's RNG states (None when the checkpoint was written by fewer ranks)."""
    state = load_file(os.path.join(path, TRAINER_FILE))
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    return state, (load_file(rng_file) if os.path.isfile(rng_file) else None)
