#!/usr/bin/env bash
# On a GPU machine: the full test suite (compiled Triton, full-size `gpu` tests), then `pytest bench/`,
# then bench/results/<gpu>/REPORT.md. Logs go to bench/results/<gpu>/ too, ready to commit.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || exit 1
gpu=$(.venv/bin/python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
out="bench/results/$gpu"
mkdir -p "$out"
{ echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)"; nvidia-smi -L; } > "$out/tests.log"
.venv/bin/python -m pytest tests -q -rfE >> "$out/tests.log" 2>&1; tests_rc=$?
.venv/bin/python -m pytest bench -q > "$out/bench.log" 2>&1; bench_rc=$?
.venv/bin/python bench/report.py
tail -3 "$out/tests.log"; tail -3 "$out/bench.log"
echo "tests rc=$tests_rc bench rc=$bench_rc; results in $out"
exit $(( tests_rc || bench_rc ))
