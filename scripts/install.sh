#!/usr/bin/env bash
# Create .venv and install repae with everything it needs; safe to run again (does nothing if current).
# - CPU machine: torch is pinned to the local CPU wheel (2.13.0) through constraints-cpu.txt, so no
#   install ever pulls a CUDA torch.
# - GPU machine whose Python already has CUDA torch + triton (and maybe no registry access): the venv
#   sees those site packages and only repae itself is installed (deps that are missing are listed),
#   plus the wheels of .wheels/ when present (built here by scripts/gpu_wheels.sh, carried there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=.venv
stamp_src="$( (cat pyproject.toml constraints-cpu.txt scripts/install.sh; ls .wheels 2>/dev/null || true) | sha1sum | cut -c1-12)"
stamp="$VENV/.installed-$stamp_src"
if [ -f "$stamp" ]; then exit 0; fi

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[install] CUDA torch found in $PY: reusing its packages (no torch download)"
  [ -d "$VENV" ] || "$PY" -m venv --system-site-packages "$VENV"
  # When $PY is itself a venv (e.g. /opt/torch/.venv), --system-site-packages sees only the BASE interpreter's
  # packages, not the torch of $PY: a .pth file adds $PY's own site folders.
  site_dir=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$PY" -c "import site; print('\n'.join(site.getsitepackages()))" > "$site_dir/outer_python.pth"
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . \
    || { echo "[install] editable install failed" >&2; exit 1; }
  if [ -d .wheels ]; then  # carried from the CPU machine (scripts/gpu_wheels.sh): deepspeed, lpips and deps
    echo "[install] installing the carried wheels in .wheels/ (no registry needed)"
    "$VENV/bin/pip" install -q --no-index --no-deps .wheels/*.whl || { echo "[install] .wheels install failed" >&2; exit 1; }
  fi
  "$VENV/bin/python" - <<'PYEOF'
import importlib.util
missing = [m for m in ("triton", "timm", "lpips", "deepspeed", "safetensors", "tqdm", "pytest", "tensorboard", "PIL", "matplotlib", "h5py")
           if importlib.util.find_spec(m) is None]
if missing:
    print(f"[install] not installed here (install them if you need them): {', '.join(missing)}")
PYEOF
else
  echo "[install] CPU machine: torch pinned to the local CPU wheel via constraints-cpu.txt"
  [ -d "$VENV" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints-cpu.txt torch==2.13.0 -e ".[test]" 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, repae.kernels; assert '+cpu' in torch.__version__ or not torch.version.cuda, torch.__version__" \
    || { echo "[install] failed: repae or torch does not import" >&2; exit 1; }
fi
rm -f "$VENV"/.installed-*
touch "$stamp"
