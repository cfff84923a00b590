"""repae.kernels.integrations: patched foreign models compute what the unpatched ones do.

Models: a DiT written here from facebookresearch/DiT's published structure (DiTBlock, FinalLayer, timm's Attention
and Mlp; tokens in, conditioning c as a plain tensor), the same with RMSNorm and weighted norms, and tiny diffusers
DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel and FluxTransformer2DModel (random weights).
For each, in fp32 and under bf16 autocast, train and eval mode: the patched model (triton backend) against the
unpatched one (eager) and the unpatched one in float64 (oracle), outputs and the gradients of every parameter and
input, by the 3-way rule of tests/parity.py; unpatch restores the original outputs bitwise.
"""

# B batch, T tokens, D hidden, A heads

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from parity import DEVICE, assert_close_3way
from torch import nn

from repae.kernels.integrations import PatchReport, is_patched, patch, unpatch

B, T, D, A = 2, 8, 48, 2
ATOL = {"fp32": 1e-4, "bf16_autocast": 5e-2}


# --- a DiT as facebookresearch/DiT writes it (models.py), without PatchEmbed and the embedders ---------------

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """timm's Attention (qkv_bias=True, fused SDPA)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        Bx, N, C = x.shape
        qkv = self.qkv(x).reshape(Bx, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(Bx, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, affine=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=affine, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TinyDiT(nn.Module):
    def __init__(self, depth=2, affine_first=False):
        super().__init__()
        self.blocks = nn.ModuleList([DiTBlock(D, A, affine=affine_first and i == 0) for i in range(depth)])
        self.final_layer = FinalLayer(D, 8)

    def forward(self, x, c):
        for block in self.blocks:
            x = block(x, c)
        return self.final_layer(x, c)


class RMSNorm(nn.Module):
    """The hand-written RMSNorm of LLaMA-derived DiTs (LightningDiT's): float statistics, then the weight."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class GemmaRMSNorm(RMSNorm):
    """Scales by (1 + weight): another function, which the probe must catch."""

    def forward(self, x):
        return super().forward(x) / self.weight * (1 + self.weight)


def _dit_norms():
    """DiT blocks with the norms LightningDiT and others use: RMSNorm (torch's and hand-written), LayerNorm with a
    weight and no bias; random weights."""
    model, inputs = _dit()
    model.blocks[0].norm1 = nn.RMSNorm(D, eps=1e-6)
    model.blocks[0].norm2 = RMSNorm(D)
    model.blocks[1].norm1 = nn.LayerNorm(D, eps=1e-5, bias=False)
    model.final_layer.norm_final = nn.RMSNorm(D, eps=1e-6, elementwise_affine=False)
    with torch.no_grad():
        for norm in (model.blocks[0].norm1, model.blocks[0].norm2, model.blocks[1].norm1):
            norm.weight.copy_(1 + 0.2 * torch.randn(D))
    return model, inputs


# --- models and their inputs ----------------------------------------------------------------------------------

def _dit():
    torch.manual_seed(0)
    model = TinyDiT()
    g = torch.Generator().manual_seed(1)
    return model, {"x": torch.randn(B, T, D, generator=g), "c": torch.randn(B, D, generator=g)}


def _diffusers_dit():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                            num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    g = torch.Generator().manual_seed(1)
    return model, {"hidden_states": torch.randn(B, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 700]),
                   "class_labels": torch.tensor([1, 7]), "return_dict": False}


def _pixart():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                               out_channels=8, num_layers=2, cross_attention_dim=16,
                                               sample_size=8, patch_size=2, caption_channels=12,
                                               use_additional_conditions=False)
    with torch.no_grad():  # PixArt zero-initialises nothing we rely on; make the modulation non-trivial anyway
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    g = torch.Generator().manual_seed(1)
    return model, {"hidden_states": torch.randn(B, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 700]),
                   "encoder_hidden_states": torch.randn(B, 5, 12, generator=g), "return_dict": False}


def _sd3():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                            caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
                                            pos_embed_max_size=8)
    g = torch.Generator().manual_seed(1)
    return model, {"hidden_states": torch.randn(B, 4, 8, 8, generator=g), "timestep": torch.tensor([3.0, 700.0]),
                   "encoder_hidden_states": torch.randn(B, 5, 12, generator=g),
                   "pooled_projections": torch.randn(B, 10, generator=g), "return_dict": False}


def _flux():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                             pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))
    g = torch.Generator().manual_seed(1)
    S, L = 16, 5
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(S, 3)
    return model, {"hidden_states": torch.randn(B, S, 8, generator=g), "timestep": torch.tensor([0.1, 0.7]),
                   "encoder_hidden_states": torch.randn(B, L, 12, generator=g),
                   "pooled_projections": torch.randn(B, 10, generator=g), "img_ids": img_ids,
                   "txt_ids": torch.zeros(L, 3), "return_dict": False}


MODELS = {"dit": _dit, "dit_norms": _dit_norms, "diffusers_dit": _diffusers_dit, "pixart": _pixart, "sd3": _sd3,
          "flux": _flux}
KINDS = {"dit": {"dit_block": 2, "dit_final_layer": 1}, "dit_norms": {"dit_block": 2, "dit_final_layer": 1},
         "diffusers_dit": {"diffusers_ada_norm_zero": 2},
         "pixart": {"diffusers_ada_norm_single": 2},
         "sd3": {"diffusers_sd3_joint_block": 2, "diffusers_ada_norm_continuous": 2},
         "flux": {"diffusers_flux_block": 1, "diffusers_ada_norm_zero_single": 1, "diffusers_ada_norm_continuous": 1}}


def _run(model, inputs, *, autocast=False, upcast=False, dout=None):
    """Output and the gradients of every parameter and float input: {name: tensor}, plus dout.

    The global RNG is reseeded first, so that random ops in the model (diffusers DiT's label dropout in train mode)
    draw the same in every run."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    leaves = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = (v.double() if upcast else v).clone().to(DEVICE).requires_grad_(True)
        elif isinstance(v, torch.Tensor):
            v = v.to(DEVICE)
        leaves[k] = v
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = model(**leaves)
    out = out[0] if isinstance(out, tuple) else out
    if dout is None:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out.backward(dout.to(out.dtype))
    res = {"out": out.detach()}
    res.update({"d" + k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad})
    res.update({"d" + n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters() if p.grad is not None})
    return res, dout


# Every precision x mode for the DiT and the diffusers models the integration was asked for; two cases each for the
# rest (none of these models has dropout, so train and eval differ only in the flag), to keep the file under 25 s
# under the Triton interpreter.
CASES = [(name, precision, mode) for name in ("dit", "diffusers_dit", "pixart") for precision in ATOL
         for mode in ("train", "eval")]
CASES += [(name, *case) for name in ("dit_norms", "sd3", "flux") for case in (("fp32", "train"),
                                                                             ("bf16_autocast", "eval"))]


@pytest.mark.parametrize("name,precision,mode", CASES)
def test_patched_model_matches_unpatched(name, precision, mode):
    model, inputs = MODELS[name]()
    model.to(DEVICE).train(mode == "train")
    oracle_model = copy.deepcopy(model).double()
    autocast = precision == "bf16_autocast"
    eager, dout = _run(model, inputs, autocast=autocast)
    oracle, _ = _run(oracle_model, inputs, upcast=True, dout=dout)
    report = patch(model, backend="triton")
    assert report.patched == KINDS[name], str(report)
    got, _ = _run(model, inputs, autocast=autocast, dout=dout)
    assert got.keys() == eager.keys() == oracle.keys()
    for key in got:
        assert_close_3way(got[key], eager[key], oracle[key], atol=ATOL[precision], name=key)
    assert unpatch(model) == sum(KINDS[name].values()) and not is_patched(model)
    again, _ = _run(model, inputs, autocast=autocast, dout=dout)
    for key in again:
        assert torch.equal(again[key], eager[key]), key


def test_report_names_what_was_left_alone():
    model = TinyDiT(affine_first=True)
    report = patch(model, backend="eager")
    assert isinstance(report, PatchReport)
    assert report.patched == {"dit_block": 1, "dit_final_layer": 1}
    assert report.left_alone == [("blocks.0", "norm1 has an affine bias (elementwise_affine=True): the kernel has no "
                                               "bias input")]
    text = str(report)
    assert "2 modules patched" in text and "blocks.0: norm1 has an affine bias" in text
    assert not hasattr(model.blocks[0], "_repae_patch") and "forward" not in vars(model.blocks[0])


def test_rmsnorms_that_do_not_fit_are_left_alone():
    model = TinyDiT(depth=3)
    model.blocks[0].norm2 = nn.RMSNorm(D, eps=None)
    model.blocks[1].norm2 = GemmaRMSNorm(D)
    model.blocks[2].norm1 = nn.LayerNorm(D, bias=False)
    report = patch(model, backend="eager")
    assert report.left_alone == [
        ("blocks.0", "norm2 (RMSNorm) has eps=None, not a float (None: the input dtype's epsilon)"),
        ("blocks.1", "norm2 (GemmaRMSNorm) does not compute rms_norm(x) * weight (checked on a probe)")]


def test_diffusers_final_layer_is_reported():
    model, _ = _diffusers_dit()
    report = patch(model, backend="eager")
    assert report.left_alone and report.left_alone[0][0] == "" and "inline" in report.left_alone[0][1]


def test_nothing_recognised_and_double_patch_raise():
    with pytest.raises(ValueError, match="nothing recognised in Sequential. Looked for DiT-style blocks"):
        patch(nn.Sequential(nn.Linear(4, 4)))
    model = TinyDiT()
    patch(model, backend="eager")
    with pytest.raises(ValueError, match="already patched"):
        patch(model)
    unpatch(model)
    assert patch(model).num_patched == 3


def test_extra_forward_arguments_fall_back_to_the_original():
    """A block called with inputs DiT's forward does not take runs its own forward (here: its class's)."""
    model, inputs = _dit()
    block = model.blocks[0]
    patch(model, backend="eager")
    with pytest.raises(TypeError, match="positional argument"):
        block(inputs["x"], inputs["c"], "rope")


class RopeAttention(Attention):
    def forward(self, x, rope=None):
        return super().forward(x if rope is None else x * rope)


class LightningDiTBlock(DiTBlock):
    """LightningDiT's block: forward(x, c, feat_rope=None) passes attn(..., rope=feat_rope); wo_shift variant."""

    def __init__(self, hidden_size, num_heads, wo_shift=False):
        super().__init__(hidden_size, num_heads)
        self.attn, self.wo_shift = RopeAttention(hidden_size, num_heads), wo_shift

    def forward(self, x, c, feat_rope=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=feat_rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


def test_lightningdit_rope_argument_reaches_attention():
    torch.manual_seed(0)
    model = nn.ModuleList([LightningDiTBlock(D, A), LightningDiTBlock(D, A, wo_shift=True)])
    x, c, rope = torch.randn(B, T, D), torch.randn(B, D), 1 + 0.5 * torch.randn(T, D)
    want = [model[0](x, c, rope), model[0](x, c, feat_rope=rope), model[0](x, c)]
    report = patch(model, backend="eager")
    assert report.patched == {"dit_block": 1} and "wo_shift" in report.left_alone[0][1]
    got = [model[0](x, c, rope), model[0](x, c, feat_rope=rope), model[0](x, c)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_patched_dit_compiles_fullgraph():
    """One graph (fullgraph=True raises on a break), forward and backward; aot_eager keeps this test fast, the
    slow test below compiles with inductor."""
    torch._dynamo.reset()
    model, inputs = _dit()
    model.to(DEVICE)
    patch(model, backend="triton")
    want, dout = _run(model, inputs)
    got, _ = _run(torch.compile(model, fullgraph=True, backend="aot_eager"), inputs, dout=dout)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["diffusers_dit", "pixart", "sd3", "flux"])
def test_patched_diffusers_models_compile_fullgraph(name):
    """The unpatched models compile with fullgraph=True (inductor); so do the patched ones, to the same outputs."""
    torch._dynamo.reset()
    model, inputs = MODELS[name]()
    model.to(DEVICE).eval()  # no label dropout: inductor draws random numbers its own way
    patch(model, backend="triton")
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        want = model(**inputs)[0]
        got = torch.compile(model, fullgraph=True)(**inputs)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_diffusers_ada_norm_zero_block_with_cross_attention_and_pos_embed():
    """The BasicTransformerBlock paths DiTTransformer2DModel does not take: attn2 (ungated residual, gate 1) and the
    sinusoidal positional embedding on the normalised input."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(16, 2, 8, cross_attention_dim=12, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
                                  norm_elementwise_affine=False, positional_embeddings="sinusoidal",
                                  num_positional_embeddings=16).eval()
    assert diffusers is not None and block.attn2 is not None and block.pos_embed is not None
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(B, T, 16, generator=g), "timestep": torch.tensor([3, 700]),
              "encoder_hidden_states": torch.randn(B, 5, 12, generator=g), "class_labels": torch.tensor([1, 7])}
    want, dout = _run(block, inputs)
    assert patch(block, backend="eager").patched == {"diffusers_ada_norm_zero": 1}
    got, _ = _run(block, inputs, dout=dout)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=key)


def test_integrations_import_without_diffusers():
    """diffusers blocks are recognised by name: importing and using the module needs no diffusers."""
    script = ("import sys; sys.modules['diffusers'] = None\n"
              "import torch; from repae.kernels.integrations import patch\n"
              "block = torch.nn.Module(); block.norm_final = torch.nn.LayerNorm(8, elementwise_affine=False)\n"
              "block.linear = torch.nn.Linear(8, 4); block.adaLN_modulation = torch.nn.Linear(8, 16)\n"
              "assert patch(block, backend='eager').patched == {'dit_final_layer': 1}\n"
              "assert not any(m == 'diffusers' or m.startswith('diffusers.') for m, v in sys.modules.items() if v)\n"
              "print('ok')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
