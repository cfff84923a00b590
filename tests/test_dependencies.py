"""`repae.kernels` needs torch and triton only: a DiT codebase that imports our kernels must not pull the trainer's
packages. A fresh interpreter with the trainer's and the test tools' packages made unimportable imports the kernels
and runs each op (eager, and Triton under the interpreter on CPU). pyproject.toml lists the same split."""

from __future__ import annotations

import os
import subprocess
import sys

BLOCKED = ("deepspeed", "lpips", "timm", "pytest", "tensorboard", "tqdm", "PIL", "safetensors", "diffusers",
           "matplotlib", "psutil", "repae.model", "repae.train")

SCRIPT = r"""
import sys
BLOCKED = {blocked!r}
for name in BLOCKED:  # None in sys.modules: `import name` raises ImportError, importlib.util.find_spec says absent
    sys.modules[name] = None
import torch
import repae.kernels as K

x = torch.randn(2, 5, 24)
shift, scale = 0.1 * torch.randn(2, 24), 0.1 * torch.randn(2, 24)
z = torch.randn(3, 4, 2, 2)
for backend in ("eager", "triton"):
    K.adaln(x, shift, scale, backend=backend)
    K.repa_loss(torch.randn(2, 5, 8), torch.randn(2, 5, 8), backend=backend)
    K.LatentBatchNorm(4)(z)
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None
                and any(m == b or m.startswith(b + ".") for b in BLOCKED))
assert not loaded, loaded
print("ok")
"""


def test_kernels_import_and_run_without_the_trainer_packages():
    env = {**{k: v for k, v in os.environ.items() if k != "REPAE_KERNELS"}, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(blocked=BLOCKED)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_the_blocker_blocks():
    """The check above can fail: under the same blocker (our own packages allowed), the DINOv2 encoder module, which
    needs timm, does not import."""
    allowed = tuple(b for b in BLOCKED if not b.startswith("repae."))
    script = SCRIPT.format(blocked=allowed).split("import torch")[0] + "import repae.model.encoders\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "import of timm halted" in proc.stderr, proc.stderr[-2000:]
