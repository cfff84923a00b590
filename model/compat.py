"""Make `import torchvision` (hence timm, lpips) work beside a CPU-only torch.

PyPI's torchvision wheels are built against CUDA torch: next to the CPU torch of the CPU machines its
`_C.so` does not load, and `import torchvision` then dies with "operator torchvision::nms does not
exist" (its fake-tensor registrations need the op schemas). When, and only when, that library fails to
load, the two schemas are defined here so the import succeeds; models (VGG16, ViT) work, detection ops
stay unavailable. On a GPU machine the library loads and this does nothing.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_done = False
_LIB = None  # the schema registration, kept alive for the process


def ensure_torchvision_importable() -> None:
    """Idempotent; call before the first `import torchvision` / `timm` / `lpips`."""
    global _done, _LIB
    if _done:
        return
    _done = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    library = os.path.join(os.path.dirname(spec.origin), "_C.so")
    if not os.path.exists(library):
        return
    try:
        torch.ops.load_library(library)
    except OSError:
        _LIB = torch.library.Library("torchvision", "DEF")
        _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
