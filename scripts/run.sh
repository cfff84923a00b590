#!/usr/bin/env bash
# Install (if needed), then run the main job: REPA-E training on the tiny CPU config (a few minutes),
# or on CONFIG=<run json> (e.g. CONFIG=configs/sitxl_repae.json; use the deepspeed launcher for several
# GPUs: deepspeed --num_gpus N train/main.py --config ...). Extra arguments go to train/main.py (--set k=v).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python train/main.py --config "${CONFIG:-configs/tiny_cpu.json}" "$@"
