"""train/generate.py: exactly N samples in the ADM .npz layout with the requested labels, the same arrays on 1
and 2 ranks (gloo), a killed run resumed (at another world size) without rewriting finished samples, and the
three checkpoint kinds (our run dir, its export, an LDM-only checkpoint decoded through a stats file)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from repae.model.release import build_from_args
from repae.model.vae import save_latents_stats
from repae.model.weights import save_weights
from repae.train import generate
from repae.train.export import official_args
from repae.train.main import _free_port

N, BATCH = 24, 5  # 5 chunks, the last one of 4
SDE = ["--num-samples", str(N), "--batch-size", str(BATCH), "--mode", "sde", "--num-steps", "3", "--cfg-scale",
       "2.0", "--guidance-high", "0.7", "--png"]
NAME = f"sits2-f8d4-step0000007-sde3-cfg2.0-gi0.0-0.7-equal-seed0-n{N}"


@pytest.fixture(autouse=True)
def eager_kernels(monkeypatch):
    """Sampling runs the eager kernels (the Triton interpreter is for the kernel tests; far slower)."""
    monkeypatch.setenv("REPAE_KERNELS", "eager")


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """A tiny run in the official layout (train/export.py's, read by load_released_checkpoint), EMA BN not 0/1."""
    root = tmp_path_factory.mktemp("released")
    args = official_args(tiny_config(root / "run").to_dict())
    models = build_from_args(args)
    models.sit.bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    models.sit.bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
    sit = models.sit.state_dict()
    path = root / "checkpoints" / "0000007.pt"
    path.parent.mkdir()
    save_weights({"model": sit, "ema": sit, "vae": models.vae.state_dict(), "args": args, "steps": 7}, path)
    return path


def one_rank(*argv) -> int:
    """main() in this process with one thread (the 2-rank children run OMP_NUM_THREADS=1: same rounding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return generate.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


def two_ranks(*argv) -> subprocess.CompletedProcess:
    from test_main import clean_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "repae.train.generate", *map(str, argv)]
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "REPAE_KERNELS": "eager"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load_adm(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """As ADM's evaluator reads a sample batch: arr_0.npy inside the zip, an uncompressed NHWC uint8 array."""
    with zipfile.ZipFile(path) as z:
        assert {"arr_0.npy", "arr_1.npy"} <= set(z.namelist())
        assert z.getinfo("arr_0.npy").compress_type == zipfile.ZIP_STORED
        with z.open("arr_0.npy") as f:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
            shape, _, dtype = read_header(f)
    assert dtype == np.uint8 and shape == (N, 64, 64, 3)
    with np.load(path) as z:
        return z["arr_0"], z["arr_1"]


def test_labels_equal_and_random():
    y = generate.global_labels(10, 4, "equal", seed=0)
    assert np.bincount(y.numpy()).tolist() == [3, 3, 2, 2]  # N % K extra samples go to classes 0..N%K-1
    y = generate.global_labels(12, 4, "equal", seed=3)  # divisible: the original's class-balanced list
    want = torch.arange(4).repeat_interleave(3)[torch.randperm(12, generator=torch.Generator().manual_seed(3))]
    assert torch.equal(y, want)
    y = generate.global_labels(1000, 7, "random", seed=1)
    assert 0 <= int(y.min()) and int(y.max()) < 7 and not torch.equal(y, generate.global_labels(1000, 7, "random", 2))


def test_killed_run_resumes_on_two_ranks_and_matches_one_rank(released, tmp_path):
    out = tmp_path / "resumed"
    with pytest.raises(SystemExit) as stop:  # killed after its first 2 chunks (samples 0..9)
        one_rank("--ckpt", released, "--out", out, *SDE, "--stop-after-chunks", 2)
    assert stop.value.code == 143
    parts = out / NAME / "parts"
    assert sorted(p.name for p in parts.glob("0*.npz")) == ["000000.npz", "000001.npz"]
    first = {i: os.stat(out / NAME / f"{i:06d}.png") for i in range(10)}
    (parts / ".tmp-1-000002.npz").write_bytes(b"half a file")  # a write cut by the kill
    assert one_rank("--ckpt", released, "--out", out, *SDE, "--batch-size", 6) == 2  # other chunks: refused

    two_ranks("--ckpt", released, "--out", out, *SDE)  # resumes at world size 2
    for i, st in first.items():  # finished samples were not written again
        now = os.stat(out / NAME / f"{i:06d}.png")
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), i
    assert not parts.exists() and len(list((out / NAME).glob("*.png"))) == N
    images, labels = load_adm(out / f"{NAME}.npz")
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [N // 4] * 4
    assert len({im.tobytes() for im in images}) == N  # no sample twice
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / NAME / "000013.png")), images[13])

    assert one_rank("--ckpt", released, "--out", tmp_path / "one", *SDE) == 0  # uninterrupted, one rank
    again, labels1 = load_adm(tmp_path / "one" / f"{NAME}.npz")
    assert np.array_equal(again, images) and np.array_equal(labels1, labels)
    assert one_rank("--ckpt", released, "--out", tmp_path / "one", *SDE) == 0  # done: nothing to do


def test_ldm_only_checkpoint_decodes_through_the_stats_file(released, tmp_path):
    """No `vae` in the checkpoint: the run's vae_ckpt and its -latents-stats.pt, as the original's generate.py."""
    obj = torch.load(released, weights_only=True)
    vae_file = tmp_path / "e2e-vae.pt"
    save_weights(obj.pop("vae"), vae_file)
    ema = obj["ema"]
    save_latents_stats(tmp_path / "e2e-vae-latents-stats.pt", ema["bn.running_mean"], ema["bn.running_var"].rsqrt())
    obj["args"] = {**obj["args"], "vae_ckpt": str(vae_file)}
    ldm = tmp_path / "ldm" / "checkpoints" / "0000007.pt"
    ldm.parent.mkdir(parents=True)
    save_weights(obj, ldm)
    ode = ["--num-samples", 4, "--batch-size", 4, "--num-steps", 2, "--label-sampling", "random"]
    assert one_rank("--ckpt", ldm, "--out", tmp_path / "a", *ode) == 0
    assert one_rank("--ckpt", released, "--out", tmp_path / "b", *ode) == 0
    name = "sits2-f8d4-step0000007-ode2-cfg1.5-gi0.0-1.0-random-seed0-n4.npz"
    a, b = np.load(tmp_path / "a" / name)["arr_0"], np.load(tmp_path / "b" / name)["arr_0"]
    assert np.abs(a.astype(int) - b).max() <= 1  # z / scale + bias vs z / rsqrt(var) + mean: rounding only
    os.remove(tmp_path / "e2e-vae-latents-stats.pt")
    assert one_rank("--ckpt", ldm, "--out", tmp_path / "c", *ode) == 2


def test_run_dir_and_its_export_give_the_same_samples(tmp_path, ds_world):
    from test_step import make_inputs

    from repae.train.export import main as export_main
    from repae.train.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path / "run"))
    trainer.run_step(make_inputs(trainer, seed=0))
    trainer.save_checkpoint()
    assert export_main(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    ode = ["--num-samples", 3, "--batch-size", 2, "--num-steps", 2, "--heun"]
    assert one_rank("--ckpt", tmp_path / "run", "--out", tmp_path / "a", *ode) == 0
    assert one_rank("--ckpt", tmp_path / "export" / "checkpoints" / "0000001.pt", "--out", tmp_path / "b", *ode) == 0
    name = "sits2-f8d4-step0000001-ode2-heun-cfg1.5-gi0.0-1.0-equal-seed0-n3.npz"
    assert np.array_equal(np.load(tmp_path / "a" / name)["arr_0"], np.load(tmp_path / "b" / name)["arr_0"])
    assert one_rank("--ckpt", tmp_path / "run", "--out", tmp_path / "c", "--mode", "sde", "--heun") == 2
