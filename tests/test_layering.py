"""Layering rules (docs/ARCHITECTURE.md#layers), checked on the source: who may import Triton and kernels."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRITON_MODULES = {"adaln_triton.py", "repa_loss_triton.py", "latent_bn_triton.py"}  # the only files that define kernels


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(("." * node.level) + node.module)
    return names


def _all_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(("." * node.level) + node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_only_kernel_files_import_triton_at_module_level(path):
    """`import repae.kernels` must not define @triton.jit functions (TRITON_INTERPRET is read then)."""
    uses_triton = any(n.split(".")[0] == "triton" for n in _top_level_imports(path))
    assert uses_triton == (path.name in TRITON_MODULES), path.name


@pytest.mark.parametrize("folder", ["model", "train", "plan"])
def test_model_and_train_use_only_the_public_kernels_api(folder):
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in _all_imports(path):
            assert name.split(".")[0] != "triton", f"{path.relative_to(ROOT)} imports triton"
            parts = name.split(".")
            assert not (len(parts) > 2 and parts[:2] == ["repae", "kernels"]), (
                f"{path.relative_to(ROOT)} imports {name}: use `from repae.kernels import ...`"
            )
