#!/usr/bin/env bash
# Install (if needed), lint, then run the test suite (CPU: Triton kernels under the interpreter; GPU: compiled,
# plus the full-size `gpu` tests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if .venv/bin/python -c "import ruff" 2>/dev/null; then
  # Lint rules: pyproject.toml [tool.ruff]. `ruff check --fix .` sorts imports; the rest is by hand.
  .venv/bin/python -m ruff check --quiet . || { echo "[test] lint failed: ruff check . (see above)" >&2; exit 1; }
else  # a GPU machine without registry access may not have it: lint runs on the CPU machines and CI
  echo "[test] ruff is not installed here: lint skipped"
fi
exec .venv/bin/python -m pytest tests "$@"
