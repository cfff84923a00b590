"""The functional API of repae.kernels and its backend switch: the public boundary where inputs are validated.

Every op takes `backend=None | "auto" | "triton" | "eager"`:
- "triton": the fused Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).
- "eager":  the PyTorch reference in kernels/<op>_ref.py (any device, any float dtype).
- "auto":   triton where it can run (CUDA, or the CPU interpreter), else eager.
- None:     the process default: `set_backend(...)`, initially $REPAE_KERNELS or "auto".
REPAE_KERNELS=eager forces the eager reference everywhere, whatever a call asks for (debugging).

Each op validates its inputs once (kernels/_checks.py, ValueError naming the argument), resolves the backend
and calls `<op>_triton` (kernels/<op>_triton.py, imported on the first Triton call, so importing this module
needs neither a GPU nor the interpreter flag) or `<op>_ref` (kernels/<op>_ref.py) with the same arguments.
"""

# B batch, T SiT tokens, D SiT hidden width, N encoder tokens, C latent channels (in the REPA loss: the feature
# width of both inputs, the glossary's E), H, W latent height and width (docs/ARCHITECTURE.md#shape-letters)

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import _launch
from ._checks import check_adaln_inputs, check_latent_bn_inputs, check_repa_inputs, check_runnable
from .adaln_ref import adaln_ref
from .latent_bn_ref import StatsHook, latent_bn_denorm_ref, latent_bn_interp_ref, latent_bn_ref
from .repa_loss_ref import repa_loss_ref

BACKENDS = ("auto", "triton", "eager")


def _validate_backend(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name


_default_backend = _validate_backend(os.environ.get("REPAE_KERNELS", "auto"), "REPAE_KERNELS")


def set_backend(name: str) -> None:
    """Set the process-wide default backend ("auto", "triton" or "eager")."""
    global _default_backend
    _default_backend = _validate_backend(name, "backend")


def get_backend() -> str:
    """The process-wide default backend."""
    return _default_backend


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend ("triton" or "eager") that a call with these arguments runs.

    Raises ValueError for "triton" on a device it cannot run on, before any Triton module is imported
    (a kernel module imported without the interpreter flag could not run on CPU later).
    """
    if os.environ.get("REPAE_KERNELS") == "eager":
        return "eager"
    name = _validate_backend(_default_backend if backend is None else backend, "backend")
    if name == "auto":
        return "triton" if device.type == "cuda" or (device.type == "cpu" and _launch.interpreter_on()) else "eager"
    if name == "triton":
        check_runnable(device)
    return name


def autocast_out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a block's normalised h should have: the autocast dtype under autocast (the next Linear casts to it
    anyway, so storing it narrower saves bytes and changes nothing), else x's dtype. Pass it as adaln's out_dtype."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):  # (meta has no autocast)
        return torch.get_autocast_dtype(kind)
    return x.dtype


def adaln(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, y: torch.Tensor | None = None,
          gate: torch.Tensor | None = None, eps: float = 1e-6, norm: str = "layer", weight: torch.Tensor | None = None,
          out_dtype: torch.dtype | None = None, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated residual + LayerNorm or RMSNorm (optional elementwise weight) + modulate; returns (x_new, h).

    x_new = x + gate[:, None] * y (x itself when y and gate are omitted, e.g. a block's first norm);
    h = Norm(x_new) * weight * (1 + scale[:, None]) + shift[:, None], in out_dtype (default x.dtype), Norm the
    LayerNorm (norm="layer", no mean subtraction for norm="rms") without affine, weight [D] or None (= 1).
    x, y: [B, T, D]; shift, scale, gate: [B, D] (strided rows allowed, as from `chunk(6, dim=1)`).
    Gradients: x, y, and (when they require grad) gate, shift, scale, weight. See kernels/adaln_triton.py.
    """
    check_adaln_inputs(x, shift, scale, y, gate, norm, weight)
    if resolve_backend(backend, x.device) == "triton":
        from .adaln_triton import adaln_triton as impl
    else:
        impl = adaln_ref
    return impl(x, shift, scale, y=y, gate=gate, eps=eps, norm=norm, weight=weight, out_dtype=out_dtype)


def repa_loss(zs_tilde: torch.Tensor | Sequence[torch.Tensor], zs: torch.Tensor | Sequence[torch.Tensor], *,
              eps: float = 1e-12, backend: str | None = None) -> torch.Tensor:
    """REPA alignment loss -mean_{b,n} cos(zs_tilde[b, n], zs[b, n]) as a 0-d fp32 tensor.

    zs_tilde (projector outputs) and zs (encoder features) are [B, N, C] tensors, or equal-length lists
    of them (one per encoder): the per-encoder losses are then averaged, as REPA-E divides by n_enc.
    """
    if isinstance(zs_tilde, torch.Tensor) != isinstance(zs, torch.Tensor):
        raise ValueError("repa_loss: zs_tilde and zs must both be tensors or both be lists of tensors")
    if isinstance(zs_tilde, torch.Tensor):
        zs_tilde, zs = [zs_tilde], [zs]
    if len(zs_tilde) != len(zs) or not zs_tilde:
        raise ValueError(f"repa_loss: got {len(zs_tilde)} projector outputs for {len(zs)} encoders")
    losses = []
    for a, b in zip(zs_tilde, zs):
        check_repa_inputs(a, b)
        if resolve_backend(backend, b.device) == "triton":
            from .repa_loss_triton import repa_loss_triton as impl
        else:
            impl = repa_loss_ref
        losses.append(impl(a, b, eps=eps))
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def latent_bn(z: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
              num_batches_tracked: torch.Tensor | None = None, *, use_batch_stats: bool, momentum: float | None = 0.1,
              eps: float = 1e-4, stats_hook: StatsHook | None = None, backend: str | None = None) -> torch.Tensor:
    """BatchNorm2d(affine=False) of latents z [B, C, H, W].

    use_batch_stats=True: normalise with the batch statistics (made global across ranks by `stats_hook`,
    called twice per forward: see kernels/latent_bn_ref.py) and update the running statistics in place
    (unbiased variance, momentum); False: normalise with the running statistics. Gradients flow to z
    in both modes.
    """
    check_latent_bn_inputs(z, running_mean, running_var, num_batches_tracked, use_batch_stats=use_batch_stats,
                           momentum=momentum)
    if resolve_backend(backend, z.device) == "triton":
        from .latent_bn_triton import latent_bn_triton as impl
    else:
        impl = latent_bn_ref
    return impl(z, running_mean, running_var, num_batches_tracked, use_batch_stats=use_batch_stats, momentum=momentum,
                eps=eps, stats_hook=stats_hook)


def latent_bn_interp(z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, running_mean: torch.Tensor,
                     running_var: torch.Tensor, num_batches_tracked: torch.Tensor | None = None, *,
                     use_batch_stats: bool, path: str = "linear", momentum: float | None = 0.1, eps: float = 1e-4,
                     stats_hook: StatsHook | None = None,
                     backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 = latent_bn(z), then (x_t, v*) = (alpha_t x0 + sigma_t noise, alpha'_t x0 + sigma'_t noise).

    t: one time per sample (B elements), treated as a constant (ValueError if it requires grad);
    noise: like z (gets a gradient if it requires one). path: "linear" or "cosine".
    """
    check_latent_bn_inputs(z, running_mean, running_var, num_batches_tracked, use_batch_stats=use_batch_stats,
                           momentum=momentum, t_B=t, noise_BCHW=noise, path=path)
    if resolve_backend(backend, z.device) == "triton":
        from .latent_bn_triton import latent_bn_interp_triton as impl
    else:
        impl = latent_bn_interp_ref
    return impl(z, t, noise, running_mean, running_var, num_batches_tracked, use_batch_stats=use_batch_stats,
                path=path, momentum=momentum, eps=eps, stats_hook=stats_hook)


def latent_bn_denorm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, *,
                     backend: str | None = None) -> torch.Tensor:
    """Latents for the VAE decoder from normalised x: x / rsqrt(running_var) + running_mean (no eps)."""
    check_latent_bn_inputs(x, running_mean, running_var, None)
    if resolve_backend(backend, x.device) == "triton":
        from .latent_bn_triton import latent_bn_denorm_triton as impl
    else:
        impl = latent_bn_denorm_ref
    return impl(x, running_mean, running_var)
