"""train/checkpoint.py as an adversary and an unlucky cluster user meet it: pickled payloads in any checkpoint file
are refused on resume and on export and never run; each kind of damage falls back to the newest complete
checkpoint or stops with one line naming the file; config changes on resume are refused (model, engine layout,
ZeRO world size) or applied (optimizer settings); `latest` cannot point outside the checkpoint folder; planted
symlinks neither break a write nor get followed when deleting; a full disk keeps the previous checkpoint and
leaves no temp folder; pruning keeps the newest finite checkpoint; stage 0 resumes at another world size."""

from __future__ import annotations

import errno
import os
import pickle
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from repae.train.main import _free_port

pytest.importorskip("deepspeed")

COMMON = ("schedule.max_steps=2", "logging.ckpt_every=1", "logging.log_every=1", "logging.sample_every=0",
          "logging.keep_last=3")
STEP1, STEP2 = "step0000001", "step0000002"
SIT_OPTIM = f"{STEP2}/sit/zero_pp_rank_0_mp_rank_00_optim_states.pt"


class Payload:
    """Unpickling it runs `touch <marker>`: what a malicious file in a handed-over run directory would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, ds_world):
    """A 2-step tiny run (ZeRO 2, one rank) with checkpoints at steps 1 and 2; tests work on copies."""
    from repae.train.trainer import Trainer

    run = tmp_path_factory.mktemp("base") / "run"
    Trainer(tiny_config(run, *COMMON)).fit()
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", STEP1, STEP2]
    return run


def copy_run(base_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base_run, run, symlinks=True)
    return run


def trainer_for(run, *extra):
    from repae.train.trainer import Trainer

    return Trainer(tiny_config(run, *COMMON, *extra))


def one_line(text: str) -> str:
    assert "\n" not in text.strip() and "Traceback" not in text, text
    return text


def poison(path: Path, marker: Path) -> None:
    """Genuine content plus a payload entry, saved the way torch.save writes any checkpoint."""
    from repae.train.checkpoint import load_file

    obj = load_file(str(path))
    obj["payload"] = Payload(marker)
    torch.save(obj, path)


def test_the_payload_is_live(tmp_path):
    """Sanity check of the test itself: plain unpickling runs it."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------
# Security: weights-only everywhere
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["trainer.pt", "rng_rank0.pt", "sit/mp_rank_00_model_states.pt",
                                 "sit/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_pickle_payload_is_refused_on_resume_and_export(base_run, tmp_path, capsys, rel):
    from repae.train import checkpoint as ckpt
    from repae.train.export import main as export_main

    run, marker = copy_run(base_run, tmp_path), tmp_path / "marker"
    for step in (STEP1, STEP2):
        poison(run / "checkpoints" / step / rel, marker)
    trainer = trainer_for(run)
    with pytest.raises(ckpt.CheckpointError) as err:
        trainer.fit()
    msg = one_line(str(err.value))
    assert f"{STEP2}/{rel}" in msg and f"{STEP1}/{rel}" in msg and "refused" in msg and "posix.system" in msg
    assert export_main(["--run-dir", str(run), "--out", str(tmp_path / "export")]) == 2
    err_out = one_line(capsys.readouterr().err)
    assert f"{STEP2}/{rel}" in err_out and "refused" in err_out
    if rel.startswith("sit/"):  # DeepSpeed's own reads go through our loader too (validation bypassed here)
        with pytest.raises(ckpt.CheckpointError, match="refused"):
            ckpt.load_engines(str(run / "checkpoints" / STEP2), trainer.engines, trainer.device)
    assert not marker.exists()


def test_every_checkpoint_file_loads_weights_only(base_run):
    """What we and DeepSpeed write is weights-only loadable with exactly our allow list (no payload needed)."""
    from repae.train.checkpoint import load_file

    files = sorted((base_run / "checkpoints" / STEP2).rglob("*.pt"))
    assert len(files) == 8  # trainer, rng, 3 x (model states, ZeRO optimizer partition)
    for f in files:
        assert isinstance(load_file(str(f)), dict), f


# ---------------------------------------------------------------------------------------------------
# Damaged checkpoints: fall back, or stop with one line
# ---------------------------------------------------------------------------------------------------


GARBAGE = random.Random(0).randbytes(999)  # seeded: the same bytes on every run


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {  # kind: (what to do to the run, the file named, the words of the reason, the step resumed)
    "truncated trainer.pt": (lambda c: _truncate(c / STEP2 / "trainer.pt"), f"{STEP2}/trainer.pt", "truncated", 1),
    "truncated optimizer shard": (lambda c: _truncate(c / SIT_OPTIM), SIT_OPTIM, "truncated", 1),
    "garbage model states": (lambda c: (c / STEP2 / "disc" / "mp_rank_00_model_states.pt").write_bytes(GARBAGE),
                             f"{STEP2}/disc/mp_rank_00_model_states.pt", "not a torch", 1),
    "empty optimizer shard": (lambda c: (c / SIT_OPTIM).write_bytes(b""), SIT_OPTIM, "empty", 1),
    "missing engine folder": (lambda c: shutil.rmtree(c / STEP2 / "vae"), f"{STEP2}/vae", "missing engine folder", 1),
    "missing rng file": (lambda c: (c / STEP2 / "rng_rank0.pt").unlink(), f"{STEP2}/rng_rank0.pt", "missing", 1),
    "empty latest": (lambda c: (c / "latest").write_text(""), "checkpoints/latest", "is empty", 2),
    "garbage latest": (lambda c: (c / "latest").write_bytes(b"\x00\xffjunk"), "checkpoints/latest", "not a step", 2),
    "missing latest": (lambda c: (c / "latest").unlink(), "checkpoints/latest", "is missing", 2),
    "latest names a missing folder": (lambda c: (c / "latest").write_text("step0000009"), "step0000009",
                                      "missing folder", 2),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_falls_back_with_one_line(base_run, tmp_path, capsys, kind):
    damage, named, reason, resumed = DAMAGE[kind]
    run = copy_run(base_run, tmp_path)
    damage(run / "checkpoints")
    trainer = trainer_for(run)
    capsys.readouterr()
    path = trainer.latest_checkpoint()
    assert path == str(run / "checkpoints" / f"step{resumed:07d}")
    notes = [line for line in capsys.readouterr().out.splitlines() if "instead" in line]
    assert len(notes) == 1 and named in notes[0] and reason in notes[0], notes
    trainer.load_checkpoint(path)
    assert trainer.step == resumed


def test_no_usable_checkpoint_stops_with_one_line(base_run, tmp_path):
    from repae.train.checkpoint import CheckpointError

    run = copy_run(base_run, tmp_path)
    _truncate(run / "checkpoints" / STEP2 / "trainer.pt")
    shutil.rmtree(run / "checkpoints" / STEP1 / "disc")
    with pytest.raises(CheckpointError) as err:
        trainer_for(run).fit()
    msg = one_line(str(err.value))
    assert msg.startswith("no usable checkpoint") and f"{STEP2}/trainer.pt" in msg and f"{STEP1}/disc" in msg


def test_non_finite_latest_warns_and_pruning_keeps_the_newest_finite(base_run, tmp_path, capsys, monkeypatch):
    from repae.train import checkpoint as ckpt

    run = copy_run(base_run, tmp_path)
    trainer = trainer_for(run, "logging.keep_last=1", "schedule.max_steps=4")
    trainer.load_checkpoint(trainer.latest_checkpoint())
    monkeypatch.setattr(ckpt, "all_finite", lambda modules: False)  # as if the state had gone NaN after step 2
    for _ in range(2):
        trainer.run_step()
        trainer.save_checkpoint()
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", STEP2, "step0000004"]
    out = capsys.readouterr().out
    assert f"keeping {run / 'checkpoints' / STEP2}: the newest checkpoint with finite state" in out
    trainer.latest_checkpoint()
    warning = [line for line in capsys.readouterr().out.splitlines() if "non-finite" in line]
    assert len(warning) == 1 and STEP2 in warning[0] and "step0000004" in warning[0]
    monkeypatch.undo()  # a finite save prunes normally again: only the newest is kept
    trainer.run_step()
    trainer.save_checkpoint()
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step0000005"]


def test_all_finite_sees_nan_in_buffers():
    from repae.train.checkpoint import all_finite

    bn = torch.nn.BatchNorm1d(3)
    assert all_finite([bn])
    bn.running_var[1] = float("nan")
    assert not all_finite([torch.nn.Linear(2, 2), bn])


# ---------------------------------------------------------------------------------------------------
# Config changes on resume
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,key", [("sit.overrides.depth=3", "sit.overrides.depth"),
                                          ("data.resolution=32", "data.resolution"),
                                          ("sit.freeze_pos_embed=true", "sit.freeze_pos_embed"),
                                          ("deepspeed.zero_optimization.stage=0", "deepspeed.zero_optimization.stage")])
def test_another_model_or_engine_layout_is_refused_naming_the_key(base_run, tmp_path, override, key):
    from repae.train.checkpoint import CheckpointError

    run = copy_run(base_run, tmp_path)
    with pytest.raises(CheckpointError) as err:
        trainer_for(run, override).fit()
    msg = one_line(str(err.value))
    assert msg.startswith(f"config key {key}=") and STEP2 in msg


def test_a_load_that_deepspeed_refuses_is_one_line(base_run, tmp_path):
    """Past check_resume (e.g. a field newer than the checkpoint's config), DeepSpeed's own errors are one line."""
    from repae.train import checkpoint as ckpt

    trainer = trainer_for(copy_run(base_run, tmp_path), "sit.overrides.depth=3")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_engines(str(tmp_path / "run" / "checkpoints" / STEP2), trainer.engines, trainer.device)
    assert f"{STEP2}/sit: could not be loaded into the sit engine" in one_line(str(err.value))


def test_new_optimizer_settings_are_applied_and_logged(base_run, tmp_path, capsys):
    run = copy_run(base_run, tmp_path)
    trainer = trainer_for(run, "optim_sit.lr=2e-4", "optim_vae.grad_clip=0.5", "optim_disc.betas=[0.5, 0.9]")
    trainer.load_checkpoint(trainer.latest_checkpoint())
    out = capsys.readouterr().out
    for line in ("optim_sit.lr: 0.0001 -> 0.0002", "optim_vae.grad_clip: 1.0 -> 0.5",
                 "optim_disc.betas: (0.9, 0.999) -> (0.5, 0.9)"):
        assert line in out, out
    opt = {k: e.optimizer for k, e in trainer.engines.items()}
    assert all(g["lr"] == 2e-4 for g in opt["sit"].optimizer.param_groups)  # the AdamW inside ZeRO's wrapper
    assert all(g["betas"] == (0.5, 0.9) for g in opt["disc"].optimizer.param_groups)
    assert opt["vae"].clip_grad == 0.5  # ZeRO's load restores the checkpoint's clip value; ours wins
    assert all(g["lr"] == 1e-4 for g in opt["vae"].optimizer.param_groups)


# ---------------------------------------------------------------------------------------------------
# `latest` and symlinks
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pointer", ["/etc", "../../outside/step0000001", f"{STEP1}/../..", "symlink"])
def test_latest_outside_the_checkpoint_folder_is_refused(base_run, tmp_path, pointer):
    from repae.train.checkpoint import CheckpointError
    from repae.train.export import main as export_main

    run = copy_run(base_run, tmp_path)
    latest = run / "checkpoints" / "latest"
    latest.unlink()
    if pointer == "symlink":
        (tmp_path / "elsewhere").write_text(STEP1)
        latest.symlink_to(tmp_path / "elsewhere")
    else:
        latest.write_text(pointer)
    with pytest.raises(CheckpointError) as err:
        trainer_for(run).fit()
    assert "refusing to follow it" in one_line(str(err.value))
    assert export_main(["--run-dir", str(run), "--out", str(tmp_path / "export")]) == 2


def test_symlinked_step_folder_is_not_used_and_not_followed_when_deleted(base_run, tmp_path, capsys):
    run = copy_run(base_run, tmp_path)
    outside = tmp_path / "outside"
    shutil.move(run / "checkpoints" / STEP2, outside)
    (run / "checkpoints" / STEP2).symlink_to(outside, target_is_directory=True)
    trainer = trainer_for(run)
    path = trainer.latest_checkpoint()
    assert path.endswith(STEP1) and "is a symbolic link" in capsys.readouterr().out
    trainer.load_checkpoint(path)
    trainer.run_step()
    trainer.save_checkpoint()  # step 2 again: the link is replaced by a real folder, its target left alone
    assert not (run / "checkpoints" / STEP2).is_symlink() and (outside / "trainer.pt").is_file()


def test_symlinks_planted_at_the_next_names_do_not_break_the_write(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    trainer = trainer_for(run, "schedule.max_steps=3")
    trainer.load_checkpoint(trainer.latest_checkpoint())
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    (tmp_path / "victim.txt").write_text("precious")
    ckpts = run / "checkpoints"
    (ckpts / "step0000003").symlink_to(victim, target_is_directory=True)
    (ckpts / ".tmp-step0000003").symlink_to(victim, target_is_directory=True)
    (ckpts / "latest.tmp").symlink_to(tmp_path / "victim.txt")
    trainer.run_step()
    path = trainer.save_checkpoint()
    assert Path(path).is_dir() and not Path(path).is_symlink() and (Path(path) / "trainer.pt").is_file()
    assert (ckpts / "latest").read_text() == "step0000003" and not (ckpts / "latest").is_symlink()
    assert (victim / "keep.txt").read_text() == "precious" and (tmp_path / "victim.txt").read_text() == "precious"
    assert sorted(os.listdir(victim)) == ["keep.txt"]


# ---------------------------------------------------------------------------------------------------
# Disk full, stale temp folders
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["optim_states.pt", "trainer.pt", "rng_rank0.pt"])
def test_disk_full_keeps_the_previous_checkpoint_and_no_temp_folder(base_run, tmp_path, monkeypatch, target):
    from repae.train.checkpoint import DiskFullError

    run = copy_run(base_run, tmp_path)
    trainer = trainer_for(run, "schedule.max_steps=3")
    trainer.load_checkpoint(trainer.latest_checkpoint())
    trainer.run_step()
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):  # what the kernel says once the disk is full
        if str(getattr(f, "name", f)).endswith(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DiskFullError) as err:
        trainer.save_checkpoint()
    monkeypatch.undo()
    msg = one_line(str(err.value))
    assert msg.startswith(f"disk full while writing {run / 'checkpoints' / '.tmp-step0000003'}/")
    assert target in msg and f"kept {run / 'checkpoints' / 'latest'} ({STEP2})" in msg
    ckpts = run / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["latest", STEP1, STEP2] and (ckpts / "latest").read_text() == STEP2
    again = trainer_for(run)
    again.load_checkpoint(again.latest_checkpoint())
    assert again.step == 2


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_file_damage_is_named_for_both_torch_formats(tmp_path, zip_format):
    """Both formats torch.save writes load; cut short, each says truncated; any other bytes are not a torch file."""
    from repae.train.checkpoint import CheckpointError, load_file, save_file

    good, cut = tmp_path / "good.pt", tmp_path / "cut.pt"
    save_file({"w": torch.arange(1000.0)}, str(good), zip_format=zip_format)
    assert torch.equal(load_file(str(good))["w"], torch.arange(1000.0))
    for size in (10, 30, good.stat().st_size // 2, good.stat().st_size - 1):
        cut.write_bytes(good.read_bytes()[:size])
        with pytest.raises(CheckpointError, match=f"{cut}: truncated"):
            load_file(str(cut))
    for junk in (GARBAGE, b"hello world, not a checkpoint", b"\x80\x04K\x01."):  # the last: a plain pickle of 1
        cut.write_bytes(junk)
        with pytest.raises(CheckpointError, match=f"{cut}: not a torch checkpoint file"):
            load_file(str(cut))


def test_a_real_enospc_names_the_file(tmp_path):
    """/dev/full fails every write with ENOSPC: through a file object torch reports it (not 'unexpected pos')."""
    from repae.train.checkpoint import DiskFullError, save_file

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(DiskFullError, match="disk full while writing /dev/full"):
        save_file({"w": torch.ones(1 << 16)}, "/dev/full")


def test_stale_temp_folders_are_removed_at_start(base_run, tmp_path, capsys):
    run = copy_run(base_run, tmp_path)
    ckpts = run / "checkpoints"
    (ckpts / ".tmp-step0000003" / "sit").mkdir(parents=True)
    (ckpts / ".tmp-step0000003" / "sit" / "partial.pt").write_bytes(b"\0" * 100)
    (ckpts / "latest.tmp").write_text("step0000003")
    trainer_for(run)
    assert sorted(os.listdir(ckpts)) == ["latest", STEP1, STEP2]
    assert "removed" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# Another world size (two gloo ranks resume a one-rank checkpoint)
# ---------------------------------------------------------------------------------------------------

SCRIPT = r'''
import os, sys
import torch
sys.path.insert(0, sys.argv[2])
os.environ.setdefault("DS_ACCELERATOR", "cpu")
from repae.train.main import finish_distributed, init_distributed
init_distributed()
from conftest import tiny_config
from repae.train.checkpoint import CheckpointError
from repae.train.trainer import Trainer
t = Trainer(tiny_config(sys.argv[1], *sys.argv[3:]))
try:
    t.fit()
except CheckpointError as err:
    print(f"CHECKPOINT-ERROR rank {t.rank}: {err}", flush=True)
    # Both ranks refuse the checkpoint; the launcher kills the others once one exits non-zero, so each waits for
    # the other to have printed its line first.
    torch.distributed.barrier()
    finish_distributed()
    sys.exit(2)
print(f"DONE rank {t.rank} step {t.step}", flush=True)
finish_distributed()
# Now and then (about 1 run in 15, on 2 CPU cores) one gloo rank aborts in interpreter teardown after all of the
# above ("terminate called without an active exception"); the launcher then fails the run. Not what this test is
# about, and not reproduced alone: the process ends here, its work and output done.
sys.stdout.flush()
os._exit(0)
'''


def run_two_ranks(tmp_path: Path, run: Path, *overrides: str) -> subprocess.CompletedProcess:
    from test_main import clean_env

    script = tmp_path / "resume.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(script), str(run), str(Path(__file__).resolve().parent), *overrides]
    return subprocess.run(cmd, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)


def test_zero2_checkpoint_on_another_world_size_is_one_line(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    proc = run_two_ranks(tmp_path, run, *COMMON, "schedule.max_steps=3")
    assert proc.returncode != 0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CHECKPOINT-ERROR")]
    assert len(lines) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]  # both ranks, the same line
    assert "written by 1 rank with ZeRO stage 2" in lines[0] and "this run has 2 ranks" in lines[0]
    assert "ZeRORuntimeException" not in proc.stdout + proc.stderr


def test_zero0_checkpoint_resumes_on_another_world_size(tmp_path, ds_world):
    stage0 = (*COMMON, "deepspeed.zero_optimization.stage=0")
    run = tmp_path / "run"
    trainer_for(run, *stage0, "schedule.max_steps=1").fit()
    proc = run_two_ranks(tmp_path, run, *stage0)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size: 1 -> 2" in proc.stdout and "DONE rank 1 step 2" in proc.stdout
    assert open(run / "checkpoints" / "latest").read() == STEP2
