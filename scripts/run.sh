#!/usr/bin/env bash
# Install (if needed), then run the main job. Until the trainer lands this is the kernel self-check and
# quick benchmark on whatever device is present; extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m repae.kernels.selfcheck "$@"
