"""FLOPs counted on the meta device, and the tensor-core peaks that MFU is measured against.

    flops = count_flops(lambda: sit(z, y, t, noise))        # build the model and inputs under torch.device("meta")
    peak = peak_bf16_tflops(torch.cuda.get_device_name())    # 989.0 on an H100 / H200, None when unknown

Used by the trainer's MFU estimate and by bench/. Holds no model or timing code.
"""

from __future__ import annotations

from collections.abc import Callable

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 tensor-core peaks (spec sheets, SXM parts) by a substring of torch.cuda.get_device_name()."""


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the named GPU, None when the table does not know it (no MFU is reported then)."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of fn (matmuls, convolutions, attention) as torch's FlopCounterMode counts them; run it
    on meta tensors so that nothing is computed."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()
