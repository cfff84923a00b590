#!/usr/bin/env bash
# On a GPU machine: the stages named (default: all, in this order), each a log in bench/results/<gpu>/:
#   hw       the card's ceilings: device-to-device copy GB/s, bf16 8192^3 matmul TFLOP/s -> hw.json
#   parity   the kernel, SiT and EMA tests only (compiled Triton, full-size `gpu` tests) -> parity.log
#   tests    the whole test suite, compiled Triton and the full-size `gpu` tests      -> tests.log
#   kernels  pytest bench/bench_kernels.py (fused kernels vs eager vs torch.compile)  -> bench_kernels.log
#   step     pytest bench/bench_train_step.py (the REPA-E step; needs lpips)          -> bench_step.log
#   loss     the SiT loss pass, fwd+bwd: ours vs the original SiT, eager and compiled -> bench_loss.log
#   models   pytest bench/bench_models.py (SiT-XL block, SiT-XL/2, loss pass, VAE)    -> bench_models.log
#   sampling pytest bench/bench_sampling.py (SiT-XL/2 sampling img/s, Inception; ~1 min) -> bench_sampling.log
#   integrations pytest bench/bench_integrations.py (patched diffusers DiT-XL/2, PixArt; 2-3 min) -> bench_integrations.log
# A stage may carry its own cap in seconds (`kernels:150`); it never runs past the shared deadline.
# then bench/results/<gpu>/REPORT.md. Benchmark rows are appended to the jsonl files as they are measured.
#
# For the lent device machine (one command <= 10 min, a fresh machine per call, only $OUT comes back):
# the stages share a deadline (GPU_REPORT_DEADLINE seconds from the start, default 560) so the command
# ends in time, and when $OUT is set the results folder is packed into $OUT/results_<stages>.tgz.
#   here:   bash scripts/gpu_wheels.sh                       (deepspeed + lpips wheels for the GPU's Python)
#   device: run(carry=[".wheels"], command="bash scripts/gpu_report.sh tests kernels")
#           run(carry=[".wheels"], command="bash scripts/gpu_report.sh models step")
#   here:   for f in <files_at>/results_*.tgz; do tar xzf "$f"; done; python bench/report.py; git add bench/results
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
deadline=${GPU_REPORT_DEADLINE:-560}
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(hw tests kernels step models sampling integrations)
for s in "${stages[@]}"; do
  case "${s%%:*}" in hw|parity|tests|kernels|models|step|loss|sampling|integrations) ;;
    *) echo "unknown stage '$s' (hw, parity, tests, kernels, step, loss, models, sampling, integrations; name[:seconds])" >&2; exit 2 ;; esac
done

# The GPU image's python3 is itself a venv (/opt/torch/.venv): a venv made from it does not see its torch.
# There: no venv; the carried wheels go to /tmp/site and the repo folders are linked as `repae.*`.
PYBIN=.venv/bin/python
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PYBIN=python3
  if [ -d .wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .wheels/*.whl \
      || { echo "[gpu_report] installing .wheels failed" >&2; exit 1; }
  fi
  mkdir -p /tmp/repae_links/repae && for d in kernels model train; do ln -sfn "$PWD/$d" "/tmp/repae_links/repae/$d"; done
  export PYTHONPATH="/tmp/repae_links:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import repae.kernels, repae.train.trainer" || exit 1
else
  bash scripts/install.sh || exit 1
fi
xdist=()
"$PYBIN" -c "import xdist" 2>/dev/null && xdist=(-n 8)
gpu=$("$PYBIN" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
out="bench/results/$gpu"
mkdir -p "$out"

pack() {
  "$PYBIN" bench/report.py > /dev/null
  if [ -n "${OUT:-}" ]; then
    local name
    name="results_$(IFS=_; echo "${stages[*]%%:*}").tgz"
    tar czf "$OUT/$name" "$out" && echo "[gpu_report] packed $out into \$OUT/$name"
  fi
}
trap pack EXIT

rc=0
for stage in "${stages[@]}"; do
  s=${stage%%:*}
  left=$(( deadline - (SECONDS - start) ))
  if [ "$stage" != "$s" ] && [ "${stage#*:}" -lt "$left" ]; then left=${stage#*:}; fi
  if [ "$left" -le 20 ]; then echo "[gpu_report] no time left for stage $s" | tee -a "$out/skipped.log"; rc=1; continue; fi
  py=("$PYBIN" -m pytest -q -rfE -p no:cacheprovider)
  case "$s" in
    hw) log="$out/hw.log"; cmd=("$PYBIN" bench/ceilings.py "$out/hw.json") ;;
    parity) log="$out/parity.log"
      cmd=("${py[@]}" "${xdist[@]}" tests/kernels tests/model/test_sit.py tests/train/test_ema.py
           tests/test_bench_builders.py -k "not compile_check") ;;
    tests) log="$out/tests.log"; cmd=("${py[@]}" tests) ;;
    kernels) log="$out/bench_kernels.log"; cmd=("${py[@]}" bench/bench_kernels.py) ;;
    models) log="$out/bench_models.log"; cmd=("${py[@]}" bench/bench_models.py) ;;
    loss) log="$out/bench_loss.log"; cmd=("${py[@]}" bench/bench_models.py -k "sitxl2_loss and fwd_bwd") ;;
    step) log="$out/bench_step.log"; cmd=("${py[@]}" bench/bench_train_step.py) ;;
    sampling) log="$out/bench_sampling.log"; cmd=("${py[@]}" bench/bench_sampling.py) ;;
    integrations) log="$out/bench_integrations.log"; cmd=("${py[@]}" bench/bench_integrations.py) ;;
  esac
  { echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) stage $s (${left}s left)"; nvidia-smi -L; } > "$log"
  timeout --signal=INT --kill-after=15 "$left" "${cmd[@]}" >> "$log" 2>&1; stage_rc=$?
  [ "$stage_rc" -eq 124 ] && echo "[gpu_report] stage $s stopped at the deadline" | tee -a "$log"
  echo "[gpu_report] stage $s rc=$stage_rc ($(( SECONDS - start ))s)"; tail -4 "$log"
  [ "$stage_rc" -eq 0 ] || rc=1
done
"$PYBIN" bench/report.py | tail -40
exit $rc
