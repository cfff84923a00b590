"""Patch foreign DiT-family models in place so their adaLN blocks run through repae.kernels.adaln.

    from repae.kernels.integrations import patch, unpatch
    report = patch(model)          # recognised blocks now compute the same function with the fused kernel
    print(report)                  # blocks patched by kind, blocks left alone and why
    unpatch(model)                 # the original forwards, bit for bit

What is fused, per recognised block (the rest of each forward is the original code, called as before):
- "dit_block" (facebookresearch/DiT and its descendants: fast-DiT, SiT, REPA, REPA-E, LightningDiT; attributes
  norm1, attn, norm2, mlp, adaLN_modulation giving 6 chunks, DiT's forward):
      h = adaln(x, shift_msa, scale_msa)                                   (norm1 + modulate)
      x, h = adaln(x, shift_mlp, scale_mlp, y=attn(h), gate=gate_msa)      (attn residual + norm2 + modulate)
      return x + gate_mlp * mlp(h)                                         (eager, as DiT writes it)
- "dit_final_layer" (norm_final, linear, adaLN_modulation giving 2 chunks): linear(adaln(x, shift, scale)).
- "diffusers_ada_norm_zero" (diffusers BasicTransformerBlock, norm_type "ada_norm_zero", DiTTransformer2DModel)
  and "diffusers_ada_norm_single" (norm_type "ada_norm_single", PixArtTransformer2DModel): norm1 + modulate,
  then the residual before the feed-forward norm (attn1's gated one, or, with cross-attention, attn2's ungated
  one as gate = 1, an exact product) + that norm + modulate. The modulation vectors, the norm eps of each norm
  module and diffusers' `1 + scale` convention are read from the block; attention and feed-forward are its own.
- "diffusers_sd3_joint_block" (SD3 JointTransformerBlock) and "diffusers_flux_block" (Flux FluxTransformerBlock):
  on the image and the context stream, norm1 (AdaLayerNormZero) + modulate, then the gated attention residual +
  norm2 + modulate; Flux's rope, IP-adapter output and fp16 clip as the original.
- "diffusers_ada_norm_zero_single" (AdaLayerNormZeroSingle, in Flux's single blocks) and
  "diffusers_ada_norm_continuous" (AdaLayerNormContinuous: SD3/Flux norm_out, the context norm1 of SD3's last
  block; (scale, shift) chunk order): norm + modulate, patched as modules.

Norms: torch.nn.LayerNorm -> norm="layer" with the module's eps (and its weight, weight=, when it has one and no
bias); torch.nn.RMSNorm and hand-written RMSNorms (a class named *RMSNorm* with `eps` and `weight`, checked at patch
time on a random input against rms_norm(x) * weight, so that e.g. Gemma's (1 + weight) is refused) -> norm="rms".

Recognised and left alone (the report says why):
- a norm with an affine bias (LayerNorm(elementwise_affine=True)): the kernel has no bias input, and computing
  without it would be another function; an RMSNorm with eps=None (the input dtype's epsilon), or a hand-written one
  that fails the probe; LayerNorm subclasses such as diffusers' FP32LayerNorm (it rounds the normalised x to the
  input dtype before modulating, a different rounding).
- diffusers BasicTransformerBlock with another norm_type (no adaptive modulation).
- the final norm + modulate of DiTTransformer2DModel and PixArtTransformer2DModel: written inline in the model's
  forward, not in a submodule, so patching it would mean copying the whole forward. Left eager.
- SD3.5 joint blocks with use_dual_attention (a second gated branch is added before norm2, and norm1 is
  SD35AdaLayerNormZeroX); FluxSingleTransformerBlock itself: only its norm fits (patched as
  AdaLayerNormZeroSingle), since its residual follows a concat and proj_out with no norm behind it.

Recognition is structural (attribute names, module types, chunk counts): a module with DiT's attribute names
and a different forward would be given DiT's forward. A DiT block whose forward takes `feat_rope` (LightningDiT
and its descendants) gets attn(h, rope=feat_rope), as theirs calls it. Blocks called with other extra arguments,
or diffusers blocks in a configuration the fused path does not cover (chunked feed-forward, GLIGEN, 4-D hidden
states), run their original forward. Patching a model twice raises; unpatch(model) first.

Under bf16 autocast the normalised h is produced in the autocast dtype (as model/sit.py does): every consumer here
starts with a Linear, which would cast it to that dtype anyway. A patched model stays torch.compile-able: the new
forwards are plain Python over modules and the kernels' registered ops.
This module imports no diffusers: diffusers blocks are recognised by class name and module.
"""

# B batch, T tokens, D hidden width

from __future__ import annotations

import dataclasses
import inspect
import types
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .functional import adaln, autocast_out_dtype

_ATTR = "_repae_patch"


@dataclasses.dataclass
class PatchReport:
    """What patch() did: patched blocks counted by kind, and recognised blocks left alone with the reason."""

    model: str
    patched: dict[str, int] = dataclasses.field(default_factory=dict)
    left_alone: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def num_patched(self) -> int:
        return sum(self.patched.values())

    def __str__(self) -> str:
        lines = [f"repae.kernels.integrations.patch({self.model}): {self.num_patched} modules patched"]
        lines += [f"  {kind}: {n}" for kind, n in sorted(self.patched.items())]
        if self.left_alone:
            lines.append(f"  left alone ({len(self.left_alone)}):")
            lines += [f"    {path or '<model>'}: {reason}" for path, reason in self.left_alone]
        return "\n".join(lines)


@dataclasses.dataclass
class _Patch:
    """State kept on a patched module: its kind, the kernel settings, and the instance forward it had (if any)."""

    kind: str
    backend: str | None
    norms: tuple[_Norm, ...]
    saved_forward: Callable | None
    had_instance_forward: bool
    rope: bool = False
    """DiT block whose forward takes feat_rope and passes it as attn(h, rope=feat_rope) (LightningDiT's)."""

    def original(self, module: nn.Module) -> Callable:
        return self.saved_forward if self.had_instance_forward else type(module).forward.__get__(module)


# ---------------------------------------------------------------------------------------------------
# Norm and structure checks: (plan, None) when the module fits the kernel, else (None, reason)
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Norm:
    """One fused norm: its module's attribute path in the block, "layer" or "rms", eps, whether it has a weight."""

    path: str
    kind: str
    eps: float
    has_weight: bool


def _get(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _is_rms_norm(norm: nn.Module) -> bool:
    return isinstance(norm, getattr(nn, "RMSNorm", ())) or "rmsnorm" in type(norm).__name__.lower()


def _width(norm: nn.Module) -> int | None:
    shape = getattr(norm, "normalized_shape", None)
    if shape is not None:
        return int(tuple(shape)[-1]) if isinstance(shape, (tuple, list, torch.Size)) else int(shape)
    weight = getattr(norm, "weight", None)
    return int(weight.shape[-1]) if isinstance(weight, torch.Tensor) else None


def _norm_plan(block: nn.Module, path: str, D: int) -> tuple[_Norm | None, str | None]:
    """How the kernel computes the norm module at `path` of block, or why it cannot compute the same function."""
    norm = _get(block, path)
    cls = type(norm).__name__
    shape = getattr(norm, "normalized_shape", None)
    if _width(norm) != D or (shape is not None and tuple(shape) != (D,)):
        return None, f"{path} ({cls}) does not normalize over the last dim ({D},)"
    if type(norm) is nn.LayerNorm:  # exact type: subclasses (e.g. FP32LayerNorm) may round differently
        kind, eps = "layer", norm.eps
    elif _is_rms_norm(norm):
        kind, eps = "rms", getattr(norm, "eps", None)
        if not isinstance(eps, float):
            return None, f"{path} ({cls}) has eps={eps!r}, not a float (None: the input dtype's epsilon)"
    else:
        return None, f"{path} is {cls}, not torch.nn.LayerNorm or an RMSNorm"
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        return None, f"{path} has an affine bias (elementwise_affine=True): the kernel has no bias input"
    plan = _Norm(path, kind, float(eps), isinstance(weight, torch.Tensor))
    if kind == "rms" and type(norm) is not getattr(nn, "RMSNorm", None):
        return (None, why) if (why := _probe_rms(norm, plan, D)) else (plan, None)
    return plan, None


def _probe_rms(norm: nn.Module, plan: _Norm, D: int) -> str | None:
    """A hand-written RMSNorm must compute rms_norm(x) * weight (Gemma's (1 + weight), say, does not): checked on
    a random fp32 input; the reason it does not fit, or None."""
    weight = getattr(norm, "weight", None) if plan.has_weight else None
    device = weight.device if weight is not None else torch.device("cpu")
    if device.type == "meta":
        return f"{plan.path} ({type(norm).__name__}) is on the meta device: it cannot be checked"
    with torch.no_grad():
        x = torch.randn(4, D, generator=torch.Generator().manual_seed(0)).to(device)
        want = F.rms_norm(x, (D,), eps=plan.eps) * (1.0 if weight is None else weight.float())
        try:
            got = norm(x).float()
        except Exception as err:  # noqa: BLE001 - any failure means: not a plain RMSNorm
            return f"{plan.path} ({type(norm).__name__}) failed on a probe input ({type(err).__name__})"
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-2, atol=1e-3):
        return f"{plan.path} ({type(norm).__name__}) does not compute rms_norm(x) * weight (checked on a probe)"
    return None


def _norm_kwargs(block: nn.Module, plan: _Norm) -> dict:
    """adaln's keyword arguments for one fused norm (norm and weight only where they differ from the defaults)."""
    kw: dict = {"eps": plan.eps}
    if plan.kind != "layer":
        kw["norm"] = plan.kind
    if plan.has_weight:
        kw["weight"] = _get(block, plan.path).weight
    return kw


def _last_linear(seq: nn.Module) -> nn.Linear | None:
    if isinstance(seq, nn.Linear):
        return seq
    if isinstance(seq, nn.Sequential) and len(seq) and isinstance(seq[-1], nn.Linear):
        return seq[-1]
    return None


def _check_modulation(module: nn.Module, D: int, chunks: int) -> str | None:
    lin = _last_linear(module.adaLN_modulation)
    if lin is None:
        return "adaLN_modulation does not end in an nn.Linear"
    if lin.out_features != chunks * D:
        return (f"adaLN_modulation gives {lin.out_features} = {lin.out_features / D:g} x D outputs, "
                f"DiT's gives {chunks} x D")
    return None


Plan = tuple[tuple[_Norm, ...] | None, str | None]


def _norms_plan(block: nn.Module, paths: tuple[str, ...], D: int) -> Plan:
    plans = []
    for path in paths:
        plan, why = _norm_plan(block, path, D)
        if why:
            return None, why
        plans.append(plan)
    return tuple(plans), None


def _dit_block_plan(block: nn.Module) -> Plan:
    if getattr(block, "wo_shift", False):
        return None, "wo_shift (LightningDiT): modulate without shift, 4 chunks; not DiT's forward"
    D = _width(block.norm1)
    if D is None:
        return None, f"cannot read the width of norm1 ({type(block.norm1).__name__})"
    plans, why = _norms_plan(block, ("norm1", "norm2"), D)
    why = why or _check_modulation(block, D, 6)
    return (None, why) if why else (plans, None)


def _dit_final_plan(layer: nn.Module) -> Plan:
    D = _width(layer.norm_final)
    if D is None:
        return None, f"cannot read the width of norm_final ({type(layer.norm_final).__name__})"
    plans, why = _norms_plan(layer, ("norm_final",), D)
    why = why or _check_modulation(layer, D, 2)
    return (None, why) if why else (plans, None)


def _diffusers_plan(block: nn.Module) -> Plan:
    norm_type = getattr(block, "norm_type", None)
    if norm_type not in ("ada_norm_zero", "ada_norm_single"):
        return None, f"norm_type {norm_type!r}: no adaptive modulation (only ada_norm_zero and ada_norm_single fit)"
    if norm_type == "ada_norm_zero":
        if block.norm1.emb is None:
            return None, "AdaLayerNormZero without its embedding (emb=None) is not called by BasicTransformerBlock"
        return _norms_plan(block, ("norm1.norm", "norm3"), block.dim)
    return _norms_plan(block, ("norm1", "norm2"), block.dim)


def _joint_plan(block: nn.Module) -> Plan:
    """SD3 JointTransformerBlock and Flux FluxTransformerBlock: (norm1, norm2[, norm1_context, norm2_context])."""
    if getattr(block, "use_dual_attention", False):
        return None, ("use_dual_attention (SD3.5): a second gated branch is added before norm2, and norm1 is "
                      "SD35AdaLayerNormZeroX; not patched")
    for name in ("norm1", "norm1_context"):
        mod = getattr(block, name)
        if type(mod).__name__ == "AdaLayerNormZero" and mod.emb is not None:
            return None, f"{name} embeds its own timestep (AdaLayerNormZero with num_embeddings): not a joint block's"
    paths = ("norm1.norm", "norm2")
    if not getattr(block, "context_pre_only", False):  # the context norm1 of the last SD3 block patches on its own
        paths += ("norm1_context.norm", "norm2_context")
    return _norms_plan(block, paths, _width(block.norm2) or -1)


def _norm_module_plan(module: nn.Module) -> Plan:
    """AdaLayerNormZeroSingle and AdaLayerNormContinuous: their inner `norm`."""
    return _norms_plan(module, ("norm",), _width(module.norm) or -1)


# ---------------------------------------------------------------------------------------------------
# The patched forwards (bound to each module; `self` is the block)
# ---------------------------------------------------------------------------------------------------

def _dit_block_forward(self, x_BTD: torch.Tensor, c_BD: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    spec: _Patch = getattr(self, _ATTR)
    rope_only = spec.rope and len(args) + len(kwargs) <= 1 and set(kwargs) <= {"feat_rope"}
    if (args or kwargs) and not rope_only:  # more inputs than DiT's forward takes: not ours to guess
        return spec.original(self)(x_BTD, c_BD, *args, **kwargs)
    feat_rope = args[0] if args else kwargs.get("feat_rope")
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c_BD).chunk(6, dim=1)
    out_dtype = autocast_out_dtype(x_BTD)
    _, h_BTD = adaln(x_BTD, shift_msa, scale_msa, **_norm_kwargs(self, spec.norms[0]), out_dtype=out_dtype,
                     backend=spec.backend)
    attn_out = self.attn(h_BTD, rope=feat_rope) if spec.rope else self.attn(h_BTD)
    x_BTD, h_BTD = adaln(x_BTD, shift_mlp, scale_mlp, y=attn_out, gate=gate_msa,
                         **_norm_kwargs(self, spec.norms[1]), out_dtype=out_dtype, backend=spec.backend)
    return x_BTD + gate_mlp.unsqueeze(1) * self.mlp(h_BTD)


def _dit_final_forward(self, x_BTD: torch.Tensor, c_BD: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    spec: _Patch = getattr(self, _ATTR)
    if args or kwargs:
        return spec.original(self)(x_BTD, c_BD, *args, **kwargs)
    shift, scale = self.adaLN_modulation(c_BD).chunk(2, dim=1)
    _, h_BTD = adaln(x_BTD, shift, scale, **_norm_kwargs(self, spec.norms[0]), out_dtype=autocast_out_dtype(x_BTD),
                     backend=spec.backend)
    return self.linear(h_BTD)


def _diffusers_modulation(self, hidden_states, timestep, class_labels) -> tuple[torch.Tensor, ...]:
    """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each [B, D], as the block computes them."""
    if self.norm_type == "ada_norm_zero":
        emb = self.norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
        return self.norm1.linear(self.norm1.silu(emb)).chunk(6, dim=1)
    B = hidden_states.shape[0]
    mods = (self.scale_shift_table[None] + timestep.reshape(B, 6, -1)).chunk(6, dim=1)  # each [B, 1, D]
    return tuple(m.squeeze(1) for m in mods)


def _diffusers_block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                             encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                             class_labels=None, added_cond_kwargs=None):
    spec: _Patch = getattr(self, _ATTR)
    cak = dict(cross_attention_kwargs) if cross_attention_kwargs is not None else {}
    if self._chunk_size is not None or hidden_states.ndim != 3 or "gligen" in cak or cak.get("scale") is not None:
        return spec.original(self)(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _diffusers_modulation(
        self, hidden_states, timestep, class_labels)
    kw = dict(out_dtype=autocast_out_dtype(hidden_states), backend=spec.backend)
    _, h = adaln(hidden_states, shift_msa, scale_msa, **_norm_kwargs(self, spec.norms[0]), **kw)  # norm1 + modulate
    if self.pos_embed is not None:
        h = self.pos_embed(h)
    attn_output = self.attn1(h, encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                             attention_mask=attention_mask, **cak)
    if self.attn2 is None:  # attn1's gated residual + the feed-forward norm + modulate
        x, h = adaln(hidden_states, shift_mlp, scale_mlp, y=attn_output, gate=gate_msa,
                     **_norm_kwargs(self, spec.norms[1]), **kw)
    else:  # attn1's residual eager; attn2's ungated residual (gate 1: an exact product) + norm + modulate
        x = gate_msa.unsqueeze(1) * attn_output + hidden_states
        if self.norm_type == "ada_norm_zero":
            norm_hidden_states = self.norm2(x)
            if self.pos_embed is not None:
                norm_hidden_states = self.pos_embed(norm_hidden_states)
        else:  # PixArt applies no norm before cross-attention
            norm_hidden_states = x
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=encoder_attention_mask, **cak)
        ones = torch.ones(gate_msa.shape, dtype=attn_output.dtype, device=attn_output.device)
        x, h = adaln(x, shift_mlp, scale_mlp, y=attn_output, gate=ones, **_norm_kwargs(self, spec.norms[1]), **kw)
    return gate_mlp.unsqueeze(1) * self.ff(h) + x


def _joint_block_forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
    """SD3's JointTransformerBlock: both streams' norm1 + modulate, then gated attention residual + norm2 + modulate."""
    spec: _Patch = getattr(self, _ATTR)
    if getattr(self, "_chunk_size", None) is not None:
        return spec.original(self)(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
    kw = dict(out_dtype=autocast_out_dtype(hidden_states), backend=spec.backend)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1.linear(self.norm1.silu(temb)).chunk(
        6, dim=1)
    _, norm_hidden_states = adaln(hidden_states, shift_msa, scale_msa, **_norm_kwargs(self, spec.norms[0]), **kw)
    if self.context_pre_only:
        norm_encoder_hidden_states = self.norm1_context(encoder_hidden_states, temb)
    else:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context.linear(
            self.norm1_context.silu(temb)).chunk(6, dim=1)
        _, norm_encoder_hidden_states = adaln(encoder_hidden_states, c_shift_msa, c_scale_msa,
                                              **_norm_kwargs(self, spec.norms[2]), **kw)
    attn_output, context_attn_output = self.attn(hidden_states=norm_hidden_states,
                                                 encoder_hidden_states=norm_encoder_hidden_states,
                                                 **(joint_attention_kwargs or {}))
    hidden_states, h = adaln(hidden_states, shift_mlp, scale_mlp, y=attn_output, gate=gate_msa,
                             **_norm_kwargs(self, spec.norms[1]), **kw)
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(h)
    if self.context_pre_only:
        return None, hidden_states
    encoder_hidden_states, h = adaln(encoder_hidden_states, c_shift_mlp, c_scale_mlp, y=context_attn_output,
                                     gate=c_gate_msa, **_norm_kwargs(self, spec.norms[3]), **kw)
    return encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(h), hidden_states


def _flux_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                        joint_attention_kwargs=None):
    """Flux's FluxTransformerBlock: as SD3's joint block, with rope, the optional IP-adapter output and fp16 clip."""
    spec: _Patch = getattr(self, _ATTR)
    kw = dict(out_dtype=autocast_out_dtype(hidden_states), backend=spec.backend)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1.linear(self.norm1.silu(temb)).chunk(
        6, dim=1)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context.linear(
        self.norm1_context.silu(temb)).chunk(6, dim=1)
    _, norm_hidden_states = adaln(hidden_states, shift_msa, scale_msa, **_norm_kwargs(self, spec.norms[0]), **kw)
    _, norm_encoder_hidden_states = adaln(encoder_hidden_states, c_shift_msa, c_scale_msa,
                                          **_norm_kwargs(self, spec.norms[2]), **kw)
    attention_outputs = self.attn(hidden_states=norm_hidden_states, encoder_hidden_states=norm_encoder_hidden_states,
                                  image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    attn_output, context_attn_output = attention_outputs[0], attention_outputs[1]
    hidden_states, h = adaln(hidden_states, shift_mlp, scale_mlp, y=attn_output, gate=gate_msa,
                             **_norm_kwargs(self, spec.norms[1]), **kw)
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(h)
    if len(attention_outputs) == 3:
        hidden_states = hidden_states + attention_outputs[2]
    encoder_hidden_states, h = adaln(encoder_hidden_states, c_shift_mlp, c_scale_mlp, y=context_attn_output,
                                     gate=c_gate_msa, **_norm_kwargs(self, spec.norms[3]), **kw)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(h)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _ada_norm_zero_single_forward(self, x, emb=None):
    """AdaLayerNormZeroSingle (Flux's single blocks): (modulate(norm(x), shift, scale), gate)."""
    spec: _Patch = getattr(self, _ATTR)
    shift_msa, scale_msa, gate_msa = self.linear(self.silu(emb)).chunk(3, dim=1)
    _, h = adaln(x, shift_msa, scale_msa, **_norm_kwargs(self, spec.norms[0]), out_dtype=autocast_out_dtype(x),
                 backend=spec.backend)
    return h, gate_msa


def _ada_norm_continuous_forward(self, x, conditioning_embedding):
    """AdaLayerNormContinuous (SD3/Flux norm_out, SD3's last context norm1): note the (scale, shift) order."""
    spec: _Patch = getattr(self, _ATTR)
    scale, shift = self.linear(self.silu(conditioning_embedding).to(x.dtype)).chunk(2, dim=1)
    _, h = adaln(x, shift, scale, **_norm_kwargs(self, spec.norms[0]), out_dtype=autocast_out_dtype(x),
                 backend=spec.backend)
    return h


# ---------------------------------------------------------------------------------------------------
# Recognition, patch, unpatch
# ---------------------------------------------------------------------------------------------------

_DIT_BLOCK_ATTRS = ("norm1", "attn", "norm2", "mlp", "adaLN_modulation")
_DIT_FINAL_ATTRS = ("norm_final", "linear", "adaLN_modulation")
_FORWARDS = {"dit_block": _dit_block_forward, "dit_final_layer": _dit_final_forward,
             "diffusers_ada_norm_zero": _diffusers_block_forward,
             "diffusers_ada_norm_single": _diffusers_block_forward,
             "diffusers_sd3_joint_block": _joint_block_forward, "diffusers_flux_block": _flux_block_forward,
             "diffusers_ada_norm_zero_single": _ada_norm_zero_single_forward,
             "diffusers_ada_norm_continuous": _ada_norm_continuous_forward}
_DIFFUSERS = {"JointTransformerBlock": ("diffusers_sd3_joint_block", _joint_plan),
              "FluxTransformerBlock": ("diffusers_flux_block", _joint_plan),
              "AdaLayerNormZeroSingle": ("diffusers_ada_norm_zero_single", _norm_module_plan),
              "AdaLayerNormContinuous": ("diffusers_ada_norm_continuous", _norm_module_plan)}
_LEFT_ALONE = {
    "FluxSingleTransformerBlock": "Flux single block: only its norm + modulate fits (its AdaLayerNormZeroSingle, "
                                  "patched on its own); the residual follows a concat and proj_out with no norm "
                                  "behind it in the block",
}
_INLINE_FINAL = {"DiTTransformer2DModel", "PixArtTransformer2DModel"}


def _from_diffusers(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "diffusers"


def _classify(module: nn.Module) -> tuple[str | None, tuple[_Norm, ...] | None, str | None]:
    """(kind, plan per fused norm, None) for a block to patch, (kind, None, reason) for one left alone, or
    (None, None, None) for a module not recognised."""
    name = type(module).__name__
    if _from_diffusers(module):
        if name == "BasicTransformerBlock":
            kind = f"diffusers_{module.norm_type}"
            return (kind, *_diffusers_plan(module))
        if name in _DIFFUSERS:
            kind, plan = _DIFFUSERS[name]
            return (kind, *plan(module))
        if name in _LEFT_ALONE:
            return name, None, _LEFT_ALONE[name]
        if name in _INLINE_FINAL:
            return name, None, ("the final norm_out + modulate is written inline in the model's forward (no "
                                "submodule to patch); left eager")
        return None, None, None
    if all(hasattr(module, a) for a in _DIT_BLOCK_ATTRS):
        return ("dit_block", *_dit_block_plan(module))
    if all(hasattr(module, a) for a in _DIT_FINAL_ATTRS):
        return ("dit_final_layer", *_dit_final_plan(module))
    return None, None, None


def is_patched(model: nn.Module) -> bool:
    """Whether any submodule of model carries a patch from this module."""
    return any(hasattr(m, _ATTR) for m in model.modules())


def patch(model: nn.Module, *, backend: str | None = None) -> PatchReport:
    """Replace, in place, the forward of every recognised block of model with the fused one (module docstring).

    backend: the kernels backend of the patched forwards (None: the process default). Returns a PatchReport.
    Raises ValueError if model is already patched, or if nothing in it is recognised.
    """
    if is_patched(model):
        raise ValueError(f"{type(model).__name__} is already patched by repae.kernels.integrations; "
                         "call unpatch(model) first")
    report = PatchReport(model=type(model).__name__)
    counts: Counter[str] = Counter()
    recognised = 0
    for path, module in model.named_modules():
        kind, norms, reason = _classify(module)
        if kind is None:
            continue
        recognised += 1
        if norms is None:
            report.left_alone.append((path, reason))
            continue
        had_instance = "forward" in vars(module)
        setattr(module, _ATTR, _Patch(kind=kind, backend=backend, norms=norms, had_instance_forward=had_instance,
                                      saved_forward=vars(module)["forward"] if had_instance else None))
        if kind == "dit_block":
            getattr(module, _ATTR).rope = "feat_rope" in inspect.signature(type(module).forward).parameters
        module.forward = types.MethodType(_FORWARDS[kind], module)
        counts[kind] += 1
    if not recognised:
        raise ValueError(
            f"repae.kernels.integrations.patch: nothing recognised in {type(model).__name__}. Looked for DiT-style "
            f"blocks (attributes {', '.join(_DIT_BLOCK_ATTRS)}), DiT final layers ({', '.join(_DIT_FINAL_ATTRS)}), "
            f"diffusers BasicTransformerBlock (norm_type ada_norm_zero / ada_norm_single), {', '.join(_DIFFUSERS)}"
        )
    report.patched = dict(counts)
    return report


def unpatch(model: nn.Module) -> int:
    """Restore the original forward of every block patch() changed; returns how many were restored."""
    restored = 0
    for module in model.modules():
        spec = vars(module).get(_ATTR)
        if spec is None:
            continue
        if spec.had_instance_forward:
            module.forward = spec.saved_forward
        else:
            del module.forward
        delattr(module, _ATTR)
        restored += 1
    return restored
