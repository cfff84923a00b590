"""Test harness: on a machine without CUDA the Triton kernels run under the Triton interpreter.

TRITON_INTERPRET is read when each @triton.jit function is defined, so it is set here, before any
test imports a kernel module (repae.kernels imports its Triton modules lazily, on the first call).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

# repae.model makes torchvision (hence timm and lpips) importable beside a CPU-only torch; importing it here, before
# any test module, keeps that independent of the order of a test file's imports (which ruff sorts).
import repae.model  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA (full-size shapes run compiled); skip them with the reason, the marker's own
    (`@pytest.mark.gpu(reason=...)`) where it gives one."""
    if torch.cuda.is_available():
        return
    import pytest

    for item in items:
        if (mark := item.get_closest_marker("gpu")) is not None:
            reason = mark.kwargs.get("reason", "full-size shapes, compiled Triton")
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU ({reason})"))
