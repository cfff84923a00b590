"""EMA of a model's parameters and buffers (docs/METHOD.md#the-training-step), updated with foreach ops over lists
collected once.

    ema = EMA(sit)                          # fp32 deep copy in ema.module: eval, requires_grad False
    ema.update(sit, decay=0.9999)           # every step, after the SiT optimizer step
    ckpt["ema"] = ema.state_dict()          # key-for-key the model's state dict

Holds the EMA copy and its update/copy/state-dict methods. Must not hold optimizer, checkpoint-file or
sampling code, nor any host sync (no .item(), no tensor comparisons in update).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from repae.model.weights import load_state_dict_checked


def _is_float(t: torch.Tensor) -> bool:
    """Averaged (float params and buffers) or copied (integer buffers such as num_batches_tracked)."""
    return t.is_floating_point()


class EMA:
    """fp32 exponential moving average of all named parameters and float buffers; integer buffers are copied."""

    def __init__(self, model: nn.Module):
        # PARITY: the original deep-copies the model and freezes it (requires_grad False); the copy here is
        # also put in eval, has no grads, and every floating tensor is fp32 (the original's EMA is fp32 because
        # its model is), so a bf16-cast source still averages into fp32.
        module = copy.deepcopy(model)
        module.requires_grad_(False)
        for p in module.parameters():
            p.grad = None
        module.float()  # floating params and buffers -> fp32; integer buffers untouched
        self.module = module.eval()
        self._collect()

    def _collect(self) -> None:
        """Tensor lists of the EMA module, in named_parameters then named_buffers order (the state-dict tensors)."""
        params = list(self.module.named_parameters())
        buffers = list(self.module.named_buffers())
        # Everything averaged: all parameters (frozen pos_embed included) and float buffers (BN running stats).
        self._avg_names = [n for n, _ in params] + [n for n, b in buffers if _is_float(b)]
        # The Parameter objects themselves (not .data aliases): Module.to() keeps them and swaps their storage.
        self._avg = [p for _, p in params] + [b for _, b in buffers if _is_float(b)]
        # Copied as is: integer buffers (num_batches_tracked).
        self._copy_names = [n for n, b in buffers if not _is_float(b)]
        self._copy = [b for _, b in buffers if not _is_float(b)]
        self._buffer_ids = [id(b) for _, b in buffers]
        self._by_name = dict(zip(self._avg_names + self._copy_names, self._avg + self._copy))
        self._param_names = tuple(n for n, _ in params)
        self._buffer_names = tuple(n for n, _ in buffers)

    def to(self, *args, **kwargs) -> EMA:
        """Move the EMA module (nn.Module.to arguments; it stays fp32) and re-collect its tensor lists."""
        self.module.to(*args, **kwargs)
        self.module.float()
        self._collect()
        return self

    # -----------------------------------------------------------------------------------------------
    # Source tensors, checked against the EMA's
    # -----------------------------------------------------------------------------------------------

    def _source_tensors(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(tensors to average, tensors to copy) of `model`, in the EMA's order; ValueError on any mismatch.

        Collected on every call (a cheap Python walk, ~300 tensors for SiT-XL): .to()/.float() replace a
        source module's buffer objects, so lists cached from the source could go stale silently.
        """
        # Module.to()/.double() on ema.module replaces buffer objects (parameters keep theirs): refuse stale lists.
        if [id(b) for b in self.module.buffers()] != self._buffer_ids:
            raise RuntimeError("EMA: the EMA module's buffers were replaced (ema.module.to(...)?); move it with "
                               "ema.to(...) so the tensor lists are re-collected")
        params = list(model.named_parameters())
        buffers = list(model.named_buffers())
        for kind, ema_names, src in (("parameter", self._param_names, params), ("buffer", self._buffer_names, buffers)):
            src_names = tuple(n for n, _ in src)
            if src_names != ema_names:
                self._name_mismatch(kind, ema_names, src_names)
        avg_src = [p for _, p in params]  # read under no_grad: no graph, no .data aliases to build
        copy_src = []
        for name, t in params + buffers:
            e = self._by_name[name]
            if t.shape != e.shape:
                raise ValueError(f"EMA: {name!r} has shape {tuple(t.shape)} in the source model, {tuple(e.shape)} in "
                                 "the EMA")
            if t.device != e.device:
                raise ValueError(f"EMA: {name!r} is on {t.device} in the source model, {e.device} in the EMA")
            if _is_float(e) != _is_float(t) or (not _is_float(e) and t.dtype != e.dtype):
                # float tensors may differ in precision (a bf16 engine's params average into fp32, as add_ does);
                # integer buffers are copied and must match exactly.
                raise ValueError(f"EMA: {name!r} is {t.dtype} in the source model, {e.dtype} in the EMA")
        for _, b in buffers:
            (avg_src if _is_float(b) else copy_src).append(b)
        return avg_src, copy_src

    @staticmethod
    def _name_mismatch(kind: str, ema_names: tuple[str, ...], src_names: tuple[str, ...]) -> None:
        """ValueError naming the first key where the source's names and the EMA's part ways."""
        for i in range(max(len(ema_names), len(src_names))):
            e = ema_names[i] if i < len(ema_names) else None
            s = src_names[i] if i < len(src_names) else None
            if e == s:
                continue
            if s is not None and s not in ema_names:
                hint = " (a torch.compile wrapper? pass its _orig_mod)" if s.startswith("_orig_mod.") else ""
                raise ValueError(f"EMA: source {kind} {s!r} is not in the EMA{hint}")
            if e is not None and e not in src_names:
                raise ValueError(f"EMA: {kind} {e!r} is missing from the source model")
            raise ValueError(f"EMA: {kind} #{i} is {s!r} in the source model but {e!r} in the EMA (order differs)")
        raise AssertionError("names differ but no differing key was found")

    # -----------------------------------------------------------------------------------------------
    # Updates
    # -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float = 0.9999) -> None:
        """ema = ema * decay + src * (1 - decay) for params and float buffers; integer buffers copied.

        Bit-identical to the original's per-tensor `ema.mul_(decay).add_(src, alpha=1 - decay)` loop: foreach
        runs the same two elementwise ops per tensor (torch.lerp would not be bit-identical).
        """
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA.update: decay must be a float in [0, 1], got {decay!r}")
        avg_src, copy_src = self._source_tensors(model)
        # PERF: two multi-tensor launches per step instead of 2 x ~300 per-tensor kernels.
        torch._foreach_mul_(self._avg, decay)
        torch._foreach_add_(self._avg, avg_src, alpha=1.0 - decay)
        for e, s in zip(self._copy, copy_src):  # one num_batches_tracked per BN
            e.copy_(s)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """ema = src for every tensor (the original's update_ema(ema, model, decay=0) at setup).

        Written as a copy, so it equals update(decay=0) for finite EMA values and also clears a NaN/inf EMA
        (0 * nan would keep it).
        """
        avg_src, copy_src = self._source_tensors(model)
        for e, s in zip(self._avg + self._copy, avg_src + copy_src):
            e.copy_(s)

    # -----------------------------------------------------------------------------------------------
    # State
    # -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA module's state dict: same keys as the model's (what checkpoints store as `ema`)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load strictly (ValueError naming missing/unexpected/mis-shaped keys), in place: copy_ into the
        existing tensors, so the collected lists stay valid and the values become fp32."""
        load_state_dict_checked(self.module, state_dict, strict=True, source="EMA state dict")
        assert [id(b) for b in self.module.buffers()] == self._buffer_ids
