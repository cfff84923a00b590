"""Checkpoints on disk: the layout, atomic writes, validation with fallback, pruning, and loading that never
runs code from a file.

    <run_dir>/checkpoints/
        latest                   one line, the name of the newest complete step folder (step0000400)
        step0000400/             one complete checkpoint: a real folder (a symlink is never used or followed)
            trainer.pt           rank 0: step, EMA, step generator, data position, NaN counters, history,
                                 config (a dict), world_size, finite (every weight, buffer and EMA value finite)
            rng_rank<r>.pt       torch (and CUDA) RNG states of rank r
            sit/ vae/ disc/      DeepSpeed engine folders of the stage's models (stage=ldm: sit/ only):
                                 mp_rank_00_model_states.pt (weights, and the optimizer at ZeRO stage 0),
                                 [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt (ZeRO 1/2: rank r's
                                 partition of the optimizer states)
            sit.pt vae.pt ...    the same without DeepSpeed (PlainEngine): {"module", "optimizer"}
        .tmp-step0000400/        a checkpoint being written, renamed to step0000400 once every rank is done

What this file guarantees:
- Loading: every file goes through torch.load(weights_only=True) with SAFE_GLOBALS allowed (four DeepSpeed
  classes its ZeRO files pickle: loss scalers, the stage enum, fragment addresses), DeepSpeed's own reads
  included (SafeCheckpointEngine replaces its loader). A file that pickles anything else is refused, never run.
- Resuming: `latest` must hold a plain step name; a path (absolute, `..`, separators) or a symlink is refused.
  The checkpoint is validated (every expected file present and loadable) before anything is loaded; a damaged
  one falls back to the newest complete older one, with a line naming the file and the reason; none usable is
  one line and the run stops; one of another stage (other engines) is refused, one line, no fallback. A
  checkpoint whose state is not finite is resumed (it is what `latest` names) with a warning naming the newest
  finite one (write its name into `latest` to resume from it instead).
- Config on resume: train/resume.py (another model or engine layout refused, optimizer settings applied).
- Writing: into .tmp-stepN through file objects (fsync'd), then rename and `latest`. A write error on any rank
  (all ranks agree on it, so none waits forever) removes the temp folder and keeps the previous checkpoint and
  `latest`; a full disk says "disk full while writing <path>". Stale temp folders are removed at start-up.
- Pruning: the keep_last newest, plus the newest finite one while all kept ones are non-finite; folders newer
  than the one just written (left from a timeline abandoned by a fallback) are removed. Deleting a symlink
  removes the link, never what it points to.
This file owns the layout; single files are read and written by train/checkpoint_io.py, each engine writes and
reads its own part (train/engine.py), and the trainer hands in its engines and its state dict.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from .checkpoint_io import (
    CheckpointError,
    DiskFullError,
    StageMismatch,
    check_plain,
    failure_text,
    fsync_dir,
    load_file,
    need_keys,
    remove_tree,
    save_file,
)
from .config_sections import STAGE_ENGINES
from .distributed import barrier, first_failure
from .engine import ENGINE_KINDS, PlainEngine

CKPT_DIR = "checkpoints"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TRAINER_FILE = "trainer.pt"
STEP_RE = re.compile(r"step([0-9]{7,})")
TRAINER_KEYS = ("step", "ema", "random", "data", "nan_counts", "nan_total", "history", "config", "world_size")


def step_name(step: int) -> str:
    return f"step{step:07d}"


def _step_of(name: str) -> int:
    return int(STEP_RE.fullmatch(name).group(1))


def all_finite(modules) -> bool:
    """True when every floating-point parameter and buffer of the modules is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for m in modules for t in m.state_dict().values()
             if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


# ---------------------------------------------------------------------------------------------------
# Folder operations that never follow a symlink
# ---------------------------------------------------------------------------------------------------


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
    fsync_dir(root)

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
    """Each engine's kind ('plain' or 'deepspeed'): which files validate() expects for it."""
    return {k: e.kind for k, e in engines.items()}


def written_engines(path: str) -> tuple[str, ...]:
    """The engines a checkpoint folder holds: those of its config's stage (written before stages: repae)."""
    return STAGE_ENGINES[load_file(os.path.join(path, TRAINER_FILE), mmap=True)["config"].get("stage", "repae")]


def kinds_on_disk(path: str, names=STAGE_ENGINES["repae"]) -> dict[str, str]:
    """The engine kinds a checkpoint folder was written with (export: no engines to ask)."""
    return {k: "plain" if PlainEngine.wrote(path, k) else "deepspeed" for k in names}


def validate(path: str, kinds: dict[str, str]) -> CheckpointInfo:
    """Every file a resume reads is present, weights-only loadable and shaped as we write it (tensors are mapped,
    not read); CheckpointError naming the first bad file and why."""
    root = os.path.dirname(path)
    if os.path.islink(path):
        raise CheckpointError(f"{path} is a symbolic link (checkpoints are real folders inside {root})")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: missing folder")
    trainer_file = os.path.join(path, TRAINER_FILE)
    state = need_keys(load_file(trainer_file, mmap=True), TRAINER_KEYS, trainer_file)
    name = os.path.basename(path)
    if STEP_RE.fullmatch(name) and state["step"] != _step_of(name):
        raise CheckpointError(f"{trainer_file}: holds step {state['step']}, not the folder's {_step_of(name)}")
    if set(STAGE_ENGINES[stage := state["config"].get("stage", "repae")]) != set(kinds):
        raise StageMismatch(f"{path} holds a stage={stage} run ({', '.join(STAGE_ENGINES[stage])}), this run trains "
                            f"{', '.join(kinds)}: resume it with stage={stage}, or start a new logging.run_dir")
    world = state["world_size"]
    if not isinstance(world, int) or world < 1:
        raise CheckpointError(f"{trainer_file}: world_size {world!r} is not a positive integer")
    for r in range(world):
        rng_file = os.path.join(path, f"rng_rank{r}.pt")
        need_keys(load_file(rng_file, mmap=True), ("torch",), rng_file)
    partitioned = {}
    for key, kind in kinds.items():
        if (dp := ENGINE_KINDS[kind].check_files(path, key)) is not None:
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
        except StageMismatch:
            raise
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
            failure = failure_text(tmp, err)
    if (failure := first_failure(failure, device)) is not None:
        raise (DiskFullError if failure.startswith("disk full") else CheckpointError)(failure)

    def write(obj, path):
        nonlocal failure
        if failure is None:
            try:
                check_plain(obj, os.path.basename(path))
                save_file(obj, path)
            except (OSError, CheckpointError, TypeError) as err:  # TypeError: check_plain
                failure = failure_text(path, err)

    for key, engine in engines.items():
        failure = engine.save(tmp, key, rank=rank, failure=failure)
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    write(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        write(trainer_state, os.path.join(tmp, TRAINER_FILE))
    if (failure := first_failure(failure, device)) is None and rank == 0:
        try:
            remove_tree(final)  # an older folder of this name, or a file / symlink planted here
            os.replace(tmp, final)
            fsync_dir(root)
            write_latest(root, name)
        except OSError as err:
            failure = failure_text(os.path.join(root, LATEST), err)
    failure = first_failure(failure, device)
    if failure is not None:
        if rank == 0:
            remove_tree(tmp)
            remove_tree(os.path.join(root, LATEST + ".tmp"))
        kept = f"kept {previous} ({open(previous).read().strip()})" if os.path.isfile(previous) else "no earlier one"
        barrier()
        raise (DiskFullError if failure.startswith("disk full") else CheckpointError)(
            f"{failure}: removed the partial {tmp}, {kept}")
    if rank == 0:
        for line in prune(root, keep_last, name, finite=bool(trainer_state.get("finite", True))):
            log(line)
    barrier()
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
        engine.load(path, key, device)


def engine_weights(path: str, key: str, kind: str) -> dict:
    """One engine's module state dict from a validated checkpoint folder, read weights-only (export)."""
    return ENGINE_KINDS[kind].read_weights(path, key)


def load_state(path: str, rank: int) -> tuple[dict, dict | None]:
    """trainer.pt and this rank's RNG states (None when the checkpoint was written by fewer ranks)."""
    state = load_file(os.path.join(path, TRAINER_FILE))
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    return state, (load_file(rng_file) if os.path.isfile(rng_file) else None)
