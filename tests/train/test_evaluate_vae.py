"""train/evaluate_vae*.py: PSNR and SSIM against a NumPy/SciPy reference written here (skimage's algorithm: scipy's
reflect-mode Gaussian filter, then the 5-px border cropped), the scores of an exact reconstruction, the VAE read
back from each source (a real diffusers AutoencoderKL file, our export's e2e-vae.pt, a run checkpoint), and the
command end to end on 12 tiny images in a folder and in an .npz, with a random Inception and LPIPS trunk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

from repae.model.lpips import CHANNELS, LPIPS
from repae.model.vae import VAE_CONFIGS, build_vae, diffusers_to_ldm, vae_config, vae_config_from_state_dict
from repae.model.weights import save_weights
from repae.train import evaluate_inception, evaluate_metrics, evaluate_vae
from repae.train.evaluate_vae_io import load_vae
from repae.train.evaluate_vae_metrics import ReconstructionScores, psnr, ssim

RTOL = 1e-6
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())  # f8d4's latent width, factor 2
N, SIDE = 12, 32


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads wait on each other (the command ran 3-5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# Metrics against the reference
# ---------------------------------------------------------------------------------------------------


def ref_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def ref_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=255, channel_axis=-1), step by step as skimage computes it."""
    def one_channel(x, y):
        blur = lambda v: scipy.ndimage.gaussian_filter(v, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
        ux, uy, uxx, uyy, uxy = blur(x), blur(y), blur(x * x), blur(y * y), blur(x * y)
        vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        pad = 5  # (win_size - 1) // 2 with win_size = 2 * int(3.5 * 1.5 + 0.5) + 1 = 11
        return s[pad:-pad, pad:-pad].mean()

    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean([one_channel(a[..., c], b[..., c]) for c in range(3)]))


def image_pairs(shape, seed):
    """uint8 originals and 'reconstructions' = originals + noise (so SSIM is far from 0 and from 1)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(np.int64) + rng.integers(-40, 41, shape), 0, 255).astype(np.uint8)
    return a, b


@pytest.mark.parametrize("shape", [(3, 32, 32, 3), (2, 17, 23, 3), (1, 11, 40, 3)])
def test_psnr_and_ssim_match_the_reference(shape):
    a, b = image_pairs(shape, seed=sum(shape))
    got_psnr, got_ssim = psnr(torch.from_numpy(a), torch.from_numpy(b)), ssim(torch.from_numpy(a), torch.from_numpy(b))
    assert got_psnr.dtype == got_ssim.dtype == torch.float64 and got_psnr.shape == got_ssim.shape == (shape[0],)
    for i in range(shape[0]):
        assert got_psnr[i].item() == pytest.approx(ref_psnr(a[i], b[i]), rel=RTOL)
        assert got_ssim[i].item() == pytest.approx(ref_ssim(a[i], b[i]), rel=RTOL)
        assert 0.05 < got_ssim[i] < 0.99
    with pytest.raises(ValueError, match="at least 11 x 11"):
        ssim(torch.zeros(1, 10, 32, 3, dtype=torch.uint8), torch.zeros(1, 10, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        psnr(torch.zeros(1, 16, 16, 3), torch.zeros(1, 16, 16, 3))


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory):
    """Random non-negative LPIPS heads in the lpips package's layout (no lpips package needed)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "vgg.pth"
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(CHANNELS)}, path)
    return path


def test_exact_reconstruction_scores(heads_file):
    a, b = image_pairs((4, 24, 24, 3), seed=1)
    a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)
    scores = ReconstructionScores(LPIPS(double_rescale=False, pretrained=False, lin_weights=heads_file))
    scores.update(a_t, a_t)
    first = scores.summary()
    assert first["psnr"] == float("inf") and first["psnr_num_identical"] == 4
    assert first["ssim"] == pytest.approx(1.0, abs=1e-12) and first["lpips"] == 0.0
    scores.update(a_t[:2], b_t[:2])  # two real reconstructions: PSNR averages those only
    mixed = scores.summary()
    assert mixed["num_images"] == 6 and mixed["psnr_num_identical"] == 4
    assert mixed["psnr"] == pytest.approx((ref_psnr(a[0], b[0]) + ref_psnr(a[1], b[1])) / 2, rel=RTOL)
    assert mixed["lpips"] > 0


# ---------------------------------------------------------------------------------------------------
# The VAE sources and the command
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """One tiny VAE's weights as a diffusers folder (from a real diffusers.AutoencoderKL; None without diffusers),
    as train/export.py's e2e-vae.pt (LDM layout) and inside an official-layout run checkpoint."""
    from conftest import tiny_config

    from repae.model.release import build_from_args
    from repae.train.export import official_args

    root = tmp_path_factory.mktemp("vaes")
    ours = build_vae(vae_config("f8d4", **TINY))
    diffusers_dir = None
    try:
        from repae.model.compat import ensure_torchvision_importable

        ensure_torchvision_importable()
        import diffusers
    except ImportError:
        torch.manual_seed(0)  # no diffusers: the diffusers variant is skipped, the others use our own init
    else:
        torch.manual_seed(0)
        theirs = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=1,
                                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                         latent_channels=4, norm_num_groups=32, sample_size=SIDE)
        diffusers_dir = root / "vae"
        diffusers_dir.mkdir()
        save_weights(theirs.state_dict(), diffusers_dir / "diffusion_pytorch_model.safetensors")
        ours.load_state_dict(diffusers_to_ldm(theirs.state_dict()))
    save_weights(ours.state_dict(), root / "e2e-vae.pt")  # what train/export.py writes
    args = official_args(tiny_config(root / "run").to_dict())
    args["repae_config"]["vae"]["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    sit = build_from_args(args).sit.state_dict()
    (root / "checkpoints").mkdir()
    save_weights({"model": sit, "ema": sit, "vae": ours.state_dict(), "args": args, "steps": 3},
                 root / "checkpoints" / "0000003.pt")
    return {"ours": ours.eval(), "diffusers": diffusers_dir, "e2e": root / "e2e-vae.pt",
            "ckpt": root / "checkpoints" / "0000003.pt"}


def test_vae_shape_is_read_from_the_tensors():
    for name, cfg in VAE_CONFIGS.items():  # the registry's own config object (SD-VAE: no level attention at 256 px)
        with torch.device("meta"):
            assert vae_config_from_state_dict(build_vae(name).state_dict()) is cfg, name
    tiny = vae_config("f16d32", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(64,))  # level 2
    with torch.device("meta"):
        got = vae_config_from_state_dict(build_vae(tiny).state_dict())
    assert (got.embed_dim, got.ch_mult, got.ch, got.num_res_blocks, got.attn_resolutions) == (32, (1, 2, 2), 32, 1,
                                                                                                (64,))


def test_every_vae_source_loads_the_same_weights(vaes):
    want = vaes["ours"].state_dict()
    sources = [vaes["e2e"], vaes["ckpt"]] + ([vaes["diffusers"]] if vaes["diffusers"] is not None else [])
    for path in sources:
        vae, source = load_vae(str(path))
        assert vae.config == vaes["ours"].config and not vae.training, path
        assert all(torch.equal(v, want[k]) for k, v in vae.state_dict().items()), path
        assert list(source["config"]["ch_mult"]) == [1, 2], source
    assert load_vae(str(vaes["ckpt"]))[1]["kind"] == "run checkpoint"
    if vaes["diffusers"] is None:
        pytest.skip("diffusers is not installed: the diffusers-layout file was not written")


def write_images(root, num: int):
    """num random 32-px RGB images as PNGs in two class folders, and the same arrays."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num, SIDE, SIDE, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / f"c{i % 2}" / f"{i:03d}.png")
    return images


def fast_sqrtm(matrix: np.ndarray) -> np.ndarray:
    """Not a square root: scipy's 2048-wide sqrtm takes ~16 s on 2 cores; rFID's plumbing is under test here."""
    return np.diag(np.sqrt(np.diag(matrix).clip(min=0)))


@pytest.fixture(scope="module")
def random_inception():
    """The command's --allow-random-inception network (seed 0), built once for both runs (~2.5 s each), resizing its
    input to 75 px instead of 299 (its smallest; 10x faster on the CPU): the plumbing is under test, not the numbers."""
    net, net_id = evaluate_inception.build_inception(allow_random=True)
    net.INPUT_IMAGE_SIZE = 75
    return net, net_id


def test_command_end_to_end(tmp_path, vaes, heads_file, random_inception, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_metrics, "_sqrtm", fast_sqrtm)

    def build_inception(weights, weights_dir, *, allow_random):
        assert allow_random and weights is None
        return random_inception

    monkeypatch.setattr(evaluate_inception, "build_inception", build_inception)
    images = write_images(tmp_path / "folder", N)
    # The folder's sorted paths are c0/000, c0/002, ..., c1/001, ...: the .npz holds them in that order, plus 2.
    in_order = np.concatenate([images[0::2], images[1::2]])
    np.savez(tmp_path / "set.npz", arr_0=np.concatenate([in_order, images[:2]]))
    common = ["--allow-random-inception", "--allow-random-lpips", "--lpips-heads", str(heads_file),
              "--batch-size", "5", "--workers", "0", "--device", "cpu"]
    vae_a = vaes["diffusers"] if vaes["diffusers"] is not None else vaes["ckpt"]
    assert evaluate_vae.main([str(tmp_path / "folder"), "--vae", str(vae_a), "--resolution", str(SIDE),
                              "--json", str(tmp_path / "a.json"), *common]) == 0
    err = capsys.readouterr().err
    assert "RANDOMLY INITIALISED INCEPTION" in err and "RANDOMLY INITIALISED LPIPS VGG16 TRUNK" in err
    monkeypatch.chdir(tmp_path)  # the default JSON goes to the current folder
    assert evaluate_vae.main([str(tmp_path / "set.npz"), "--vae", str(vaes["e2e"]), "--num-images", str(N),
                              *common]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / f"vae-eval-e2e-vae-set-r{SIDE}-n{N}.json").read_text())
    for key in ("rfid", "psnr", "ssim", "lpips", "num_images", "psnr_num_identical"):
        assert a[key] == b[key], key  # same weights, same images, same batches
    assert isinstance(a["rfid"], float) and np.isfinite(a["rfid"]) and a["num_images"] == N
    assert a["protocol"]["resolution"] == SIDE and a["protocol"]["latent"] == "posterior mean (deterministic)"
    assert "center crop" in a["protocol"]["crop"] and b["protocol"]["crop"].startswith("none")
    assert b["vae"]["kind"] == "weights file (LDM layout)" and b["vae"]["config_from"] == "its tensors"
    if vaes["diffusers"] is not None:
        assert a["vae"]["kind"] == "weights file (diffusers layout)"
    # The protocol, computed here without the command's code: posterior mean, decode, clamp, truncate to uint8 (in
    # the command's batches of 5: another batch size may round a pixel differently).
    with torch.no_grad():
        x = torch.from_numpy(in_order).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = torch.cat([vaes["ours"].decode(vaes["ours"].encode(part).mean) for part in x.split(5)]).clamp(-1, 1)
    recon = (255 * (y + 1) / 2).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert a["psnr"] == pytest.approx(np.mean([ref_psnr(o, r) for o, r in zip(in_order, recon)]), rel=1e-9)
    assert a["ssim"] == pytest.approx(np.mean([ref_ssim(o, r) for o, r in zip(in_order, recon)]), rel=RTOL)
    # An unreadable file stops the run naming it (the set must be the one stated, nothing is replaced).
    (tmp_path / "folder" / "c1" / "005.png").write_bytes(b"not a png")
    capsys.readouterr()
    assert evaluate_vae.main([str(tmp_path / "folder"), "--vae", str(vaes["e2e"]), "--resolution", str(SIDE),
                              *common]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the warnings and the progress bar
    assert last.startswith("evaluate_vae: unreadable image") and "005.png" in last


def one_line_error(capsys, argv) -> str:
    assert evaluate_vae.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_are_one_line_errors(tmp_path, vaes, capsys):
    np.savez(tmp_path / "set.npz", arr_0=np.zeros((3, SIDE, SIDE, 3), np.uint8))
    images = str(tmp_path / "set.npz")
    err = one_line_error(capsys, [images, "--vae", str(tmp_path / "nope.pt")])
    assert "VAE not found" in err and "nope.pt" in err
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "wrong.pt")
    err = one_line_error(capsys, [images, "--vae", str(tmp_path / "wrong.pt")])
    assert str(tmp_path / "wrong.pt") in err and "no encoder.conv_in.weight" in err
    err = one_line_error(capsys, [images, "--vae", str(vaes["e2e"]), "--vae-config", "f8d4"])
    assert str(vaes["e2e"]) in err and "does not match AutoencoderKL" in err
    assert "missing: encoder.down.0.block.1." in err
    err = one_line_error(capsys, [images, "--vae", str(vaes["ckpt"]), "--vae-config", "f8d4"])
    assert "--vae-config is for VAE weight files" in err
    err = one_line_error(capsys, [images, "--vae", str(vaes["e2e"]), "--resolution", "256"])
    assert "holds 32 x 32 images" in err
    err = one_line_error(capsys, [images, "--vae", str(vaes["e2e"]), "--num-images", "4"])
    assert "holds only 3 images" in err
    err = one_line_error(capsys, [str(tmp_path / "none"), "--vae", str(vaes["e2e"])])
    assert "no such image folder or file" in err
