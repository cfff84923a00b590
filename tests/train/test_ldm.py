"""The LDM-only stage (config stage=ldm; train/step.py ldm_step; docs/METHOD.md#the-ldm-only-stage) through the
trainer: DeepSpeed ZeRO-2 engines, gloo, CPU, fp32, configs/tiny_ldm_cpu.json at batch 4, with a tiny VAE weight
file and a non-trivial latents-stats twin (bias ~ 0.3 N(0, 1), scale ~ exp(0.3 N(0, 1))).

- Two steps equal a transcription of the original's train_ldm_only.py iteration written in this file (the
  transcribed original SiT with nn.BatchNorm2d put in eval mode after model.train(), z = mean + std * eps from the
  VAE posterior, the per-sample loss loop, clip_grad_norm_ over model.parameters(), torch AdamW, the per-tensor EMA
  loop): losses and the grad norm 1e-5 relative, weights by test_step.py's rule (at most 0.5% of the elements
  beyond 1e-6, none beyond 2.5 lr). The latent BN holds the file's statistics bitwise, never updated.
- The loss falls: 10 more steps on one fixed batch at lr 1e-3 lower the SiT loss at every step, to below 0.85 of
  its first value (measured 2.79 -> 2.23, 0.80).
- Resume: 2 + 2 steps with a new trainer in between equal 4 steps straight, bitwise (test_resume.py's
  approach); a checkpoint of the other stage is refused in one line, without falling back.
- With a latent cache the step reads the posterior of the batch's own images (the cache rows of its indices).
- Two ranks equal one rank at global batch 4 (test_two_ranks.py's tolerances; one 2-rank launch).
- Config errors (a stage typo, a missing latents-stats file, a latent cache in a REPA-E run) are one line.
"""

# B batch, C latent channels

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_main import clean_env
from test_resume import assert_same_run, losses
from test_step import LR, assert_params_close, original_copies, reference_ema_update

from repae.model.vae import build_vae, latents_stats_path, load_latents_stats, save_latents_stats
from repae.model.weights import save_weights
from repae.train import checkpoint as ckpt
from repae.train.config import check_paths, load_config
from repae.train.config_sections import OptimSection
from repae.train.draws import synthetic_inputs
from repae.train.main import _free_port

LDM = "tiny_ldm_cpu.json"


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory) -> str:
    """A random tiny VAE (the config's shape) saved as a weight file, with a non-trivial -latents-stats twin."""
    folder = tmp_path_factory.mktemp("vae")
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / LDM)
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    vae = build_vae(cfg.model_configs().vae)
    C = vae.config.embed_dim
    save_weights(vae.state_dict(), str(folder / "vae.pt"))
    save_latents_stats(str(folder / "vae-latents-stats.pt"), 0.3 * torch.randn(C, generator=g),
                       (0.3 * torch.randn(C, generator=g)).exp())
    return str(folder / "vae.pt")


def ldm_config(run_dir, vae_file, *extra: str):
    """The tiny LDM config at test size, on the VAE file. Eager kernels: the Triton ones (which the same step runs on
    a GPU) are covered against them by tests/kernels and test_step.py; the interpreter would take minutes here."""
    return tiny_config(run_dir, f"vae.weights={vae_file}", "vae.allow_random=false", "kernel_backend=eager", *extra,
                       config=LDM)


def bn_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.models.sit.module.bn.state_dict().items()}


def assert_bn_is_the_files(trainer, vae_file):
    """The latent BN holds the latents-stats file's statistics (init_bn's arithmetic), bitwise; never updated."""
    bias_C, scale_C = load_latents_stats(latents_stats_path(vae_file))
    bn = trainer.models.sit.module.bn
    assert torch.equal(bn.running_mean, bias_C), "running_mean is not the file's latents_bias"
    assert torch.equal(bn.running_var, (1.0 / scale_C).square()), "running_var is not 1 / latents_scale^2"
    assert int(bn.num_batches_tracked) == 0


def reference_ldm_step(m, inputs, *, proj_coeff=0.5):
    """One iteration of the original's train_ldm_only.py, with the trainer's draws: targets without grad, z =
    mean + std * eps of the posterior (its sample_posterior of the cached moments), model.train() then
    bn.eval(), the SiT loss, backward, clip_grad_norm_(model.parameters(), 1.0), AdamW, update_ema."""
    with torch.no_grad():
        zs = [enc(inputs.images) for enc in m["encoders"]]
        posterior = m["vae"].encode(inputs.images.float() / 127.5 - 1)
        z = posterior.mean + posterior.std * inputs.posterior_noise
    m["sit"].train()
    m["sit"].bn.eval()
    out = m["sit"](z, inputs.labels, zs, inputs.t.view(-1, 1, 1, 1), inputs.noise,
                   force_drop_ids=inputs.drop_mask.int())
    loss = out["denoising_loss"].mean() + proj_coeff * out["proj_loss"].mean()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(m["sit"].parameters(), 1.0)
    m["opt"].step()
    m["opt"].zero_grad(set_to_none=True)
    reference_ema_update(m["ema"], m["sit"])
    return {"sit/loss": loss.detach(), "sit/denoising_loss": out["denoising_loss"].mean().detach(),
            "sit/proj_loss": out["proj_loss"].mean().detach(), "sit/grad_norm": grad_norm}


def test_ldm_step_matches_the_original_and_the_loss_falls(tmp_path, ds_world, vae_file):
    from repae.train.trainer import Trainer

    trainer = Trainer(ldm_config(tmp_path / "run", vae_file))
    assert set(trainer.engines) == {"sit"} and not hasattr(trainer.models, "disc")
    assert not trainer.models.sit.module.pos_embed.requires_grad  # the original's LDM script never trains it
    assert_bn_is_the_files(trainer, vae_file)
    orig, ema = original_copies(trainer)
    ref = {"sit": orig, "ema": ema, "vae": trainer.models.vae, "encoders": trainer.models.encoders,
           "opt": torch.optim.AdamW(list(orig.parameters()), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)}
    B = trainer.cfg.schedule.global_batch_size
    for step in range(2):
        inputs = synthetic_inputs(trainer, seed=step, drop_mask=torch.tensor([True] + [False] * (B - 1)))
        ours = trainer.run_step(inputs)
        want = reference_ldm_step(ref, inputs)
        ours["sit/grad_norm"] = torch.as_tensor(trainer.models.sit.grad_norm(), dtype=torch.float32)
        for k, v in want.items():
            torch.testing.assert_close(ours[k], v.float(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=k, step=step: f"step {step} {k}: {m}")
        assert_params_close("sit", trainer.models.sit.module.state_dict().items(), orig.state_dict().items())
        assert_params_close("ema", trainer.ema.state_dict().items(), ema.state_dict().items())
        assert_bn_is_the_files(trainer, vae_file)
        assert all(torch.equal(orig.bn.state_dict()[k], v) for k, v in bn_state(trainer).items())

    # The loss falls: the same batch (images, t, noises, label drop) 10 more times at lr 1e-3.
    trainer.models.sit.set_optimizer_settings(OptimSection(lr=1e-3))
    fixed = synthetic_inputs(trainer, seed=5)
    curve = [float(trainer.run_step(fixed)["sit/loss"]) for _ in range(10)]
    assert all(b < a for a, b in zip(curve, curve[1:])) and curve[-1] < 0.85 * curve[0], curve
    assert_bn_is_the_files(trainer, vae_file)


def test_ldm_resume_is_bit_identical_and_stages_do_not_mix(tmp_path, ds_world, vae_file):
    from repae.train.trainer import Trainer

    common = ["schedule.max_steps=4", "logging.ckpt_every=2", "logging.log_every=1", "logging.sample_every=0"]
    straight = Trainer(ldm_config(tmp_path / "a", vae_file, *common))
    straight.fit()
    first = Trainer(ldm_config(tmp_path / "b", vae_file, *common, "schedule.max_steps=2"))
    first.fit()
    root = tmp_path / "b" / "checkpoints"
    assert open(root / "latest").read() == "step0000002"
    files = os.listdir(root / "step0000002")
    assert "sit" in files and "vae" not in files and "disc" not in files, files
    resumed = Trainer(ldm_config(tmp_path / "b", vae_file, *common))
    resumed.fit()
    assert resumed.step == 4
    assert_same_run(straight, resumed)
    assert len(losses(resumed)["sit/loss"]) == 4
    assert_bn_is_the_files(resumed, vae_file)

    # generate.py reads the run: the EMA SiT, the frozen VAE of its config and that VAE's statistics.
    from repae.train.generate_io import load_models

    models = load_models(str(tmp_path / "a"))
    assert models.decode_from == latents_stats_path(vae_file) and models.step == 4
    assert all(torch.equal(v, straight.ema.state_dict()[k]) for k, v in models.sit.state_dict().items())
    assert all(torch.equal(v, straight.models.vae.state_dict()[k]) for k, v in models.vae.state_dict().items())

    # A REPA-E run (sit, vae, disc) finds this LDM checkpoint: refused in one line, no fallback to older ones.
    repae = {"sit": "deepspeed", "vae": "deepspeed", "disc": "deepspeed"}
    with pytest.raises(ckpt.CheckpointError, match=r"holds a stage=ldm run \(sit\), this run trains sit, vae, "
                                                   r"disc: resume it with stage=ldm") as err:
        ckpt.select(str(root), repae)
    assert "\n" not in str(err.value)
    # ... and an LDM run finds a REPA-E one (its trainer.pt says so): the same.
    state = ckpt.load_file(str(root / "step0000004" / "trainer.pt"))
    state["config"]["stage"] = "repae"
    ckpt.save_file(state, str(root / "step0000004" / "trainer.pt"))
    with pytest.raises(ckpt.CheckpointError, match=r"holds a stage=repae run \(sit, vae, disc\), this run trains "
                                                   r"sit: resume it with stage=repae"):
        ckpt.select(str(root), {"sit": "deepspeed"})


def test_latent_cache_feeds_the_step(tmp_path, ds_world, vae_file):
    """With data.latent_cache the step's (mean, std) are the cache rows of the batch's dataset indices
    (source.last_indices): the frozen VAE's posterior of the very images of the batch. Compared to fp32 rounding
    (rtol 1e-5): a convolution may round differently at another batch size (the cache is written in batches of
    16, the step sees 4); measured bitwise with two threads, up to 1e-6 absolute with one."""
    from repae.train.latent_cache import posterior_moments, write_cache
    from repae.train.trainer import Trainer

    cfg = ldm_config(tmp_path / "run", vae_file)  # the demo photos are copied into this run_dir
    write_cache(cfg, str(tmp_path / "cache"), batch_size=16, device=torch.device("cpu"), progress=False,
                log=lambda *_: None)
    trainer = Trainer(ldm_config(tmp_path / "run", vae_file, f"data.latent_cache={tmp_path / 'cache'}"))
    for _ in range(2):
        inputs = trainer.next_inputs()
        for got, want in zip(inputs.moments, posterior_moments(trainer.models.vae, inputs.images)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        logs = trainer.run_step(inputs)
        assert logs["sit/skipped"] == 0 and torch.isfinite(logs["sit/loss"])


SCRIPT = r'''
import os, sys, torch
sys.path.insert(0, sys.argv[3])
os.environ.setdefault("DS_ACCELERATOR", "cpu")
from repae.train.main import finish_distributed, init_distributed
init_distributed()
from test_ldm import ldm_config, two_rank_state
from repae.train.trainer import Trainer
t = Trainer(ldm_config(sys.argv[1], sys.argv[4], "schedule.max_steps=2", "logging.sample_every=0",
                       "logging.log_every=1"))
t.fit()
if t.rank == 0:
    torch.save(two_rank_state(t), sys.argv[2])
finish_distributed()
'''


def two_rank_state(trainer) -> dict[str, torch.Tensor]:
    state = {f"sit.{n}": v for n, v in trainer.models.sit.module.state_dict().items()}
    state.update({f"ema.{n}": v for n, v in trainer.ema.state_dict().items()})
    return state


def test_two_ranks_equal_one_rank(tmp_path, ds_world, vae_file):
    """Tolerances as test_two_ranks.py (fp32; the gradient all-reduce sums in another order): losses 2e-5 relative,
    weights mean |difference| below 1e-6 and none above 2.5 lr (measured: losses 2e-6 relative, weights at most
    1.5e-7 apart); the latent BN statistics bitwise (never updated)."""
    from repae.train.trainer import Trainer

    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(script), str(tmp_path / "run2"), str(tmp_path / "state2.pt"),
           str(Path(__file__).resolve().parent), vae_file]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = Trainer(ldm_config(tmp_path / "run1", vae_file, "schedule.max_steps=2", "logging.sample_every=0",
                             "logging.log_every=1"))
    one.fit()
    two = torch.load(tmp_path / "state2.pt", weights_only=True)
    one = two_rank_state(one)
    logs = {n: [json.loads(line) for line in open(tmp_path / f"run{n}" / "log.jsonl")] for n in (1, 2)}
    assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[2]] == [1, 2]
    for a, b in zip(logs[1], logs[2]):
        for key in ("sit/loss", "sit/denoising_loss", "sit/proj_loss"):
            assert abs(a[key] - b[key]) <= 2e-5 * abs(a[key]) + 1e-7, (a["step"], key, a[key], b[key])
    assert one.keys() == two.keys()
    for prefix in ("sit.", "ema."):
        keys = [k for k in one if k.startswith(prefix) and one[k].is_floating_point() and ".bn." not in k]
        diffs = torch.cat([(two[k] - one[k]).abs().flatten() for k in keys])
        assert diffs.mean() < 1e-6 and diffs.max() <= 2.5 * LR, (prefix, diffs.mean().item(), diffs.max().item())
    assert all(torch.equal(one[k], two[k]) for k in one if k.startswith("sit.bn."))


def test_the_papers_ldm_recipe():
    """configs/sitxl1_ldm_e2e_vavae.json: train_ldm_only.py's settings for the paper's 4M-step run."""
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "sitxl1_ldm_e2e_vavae.json")
    assert (cfg.stage, cfg.sit.name, cfg.vae.name, cfg.encoder.enc_type) == ("ldm", "SiT-XL/1", "f16d32",
                                                                            "dinov2-vit-b")
    assert (cfg.schedule.max_steps, cfg.schedule.global_batch_size, cfg.optim_sit.lr, cfg.optim_sit.grad_clip,
            cfg.loss.proj_coeff, cfg.sit.encoder_depth, cfg.sit.class_dropout_prob) == (4_000_000, 256, 1e-4, 1.0,
                                                                                         0.5, 8, 0.1)
    assert cfg.sit.freeze_pos_embed and cfg.logging.ckpt_every == 50_000 and cfg.schedule.ema_decay == 0.9999
    assert cfg.vae.latents_stats is not None and cfg.data.latent_cache is not None


@pytest.mark.parametrize("overrides,message", [
    (["stage=ldmm"], r"^config key stage='ldmm' must be one of \('repae', 'ldm'\)$"),
    (["data.latent_cache=/tmp/x"], r"^config key data\.latent_cache is read by the LDM-only stage only \(stage=ldm"),
])
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.json", overrides)


def test_missing_latents_stats_is_one_line(tmp_path, vae_file):
    lonely = tmp_path / "lonely.pt"
    lonely.write_bytes(open(vae_file, "rb").read())  # a VAE without its -latents-stats twin
    with pytest.raises(FileNotFoundError, match=r"^config key vae\.latents_stats: .*lonely-latents-stats\.pt does "
                                                r"not exist; stage=ldm fixes the latent BN") as err:
        check_paths(ldm_config(tmp_path / "run", str(lonely)))
    assert "\n" not in str(err.value)
    check_paths(tiny_config(tmp_path / "run", f"vae.weights={lonely}"))  # REPA-E starts the BN without one
