#!/usr/bin/env bash
# Install (if needed), then run the test suite (CPU: Triton kernels under the interpreter; GPU: compiled,
# plus the full-size `gpu` tests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest tests "$@"
