#!/usr/bin/env bash
# Build .wheels/ on the CPU machine (it reaches PyPI; the lent GPU machine reaches nothing): deepspeed,
# lpips, torch-fidelity (the Inception of bench/bench_sampling.py), matplotlib, diffusers (the models patched by
# bench/bench_integrations.py) and the dependencies the GPU machine's Python 3.12 lacks, as wheels for cp312
# manylinux x86_64 (~35 MB). Never torch or anything CUDA:
# deepspeed, lpips and torch-fidelity come without their dependencies, the rest are resolved on their own (none
# of them needs torch).
#   bash scripts/gpu_wheels.sh        then   run(carry=[".wheels"], command="bash scripts/gpu_report.sh ...")
# scripts/install.sh installs every wheel in .wheels/ when it finds that folder on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PYV="${GPU_PYTHON_VERSION:-3.12}"
rm -rf .wheels && mkdir -p .wheels
platform=(--python-version "$PYV" --implementation cp --only-binary=:all: --platform manylinux2014_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
.venv/bin/pip download -q --dest .wheels "${platform[@]}" \
  hjson msgpack ninja psutil py-cpuinfo "pydantic>=2" nvidia-ml-py einops tqdm packaging
.venv/bin/pip download -q --no-deps --dest .wheels "${platform[@]}" "lpips==0.1.4" "torch-fidelity==0.4.0"
# matplotlib (the loss plot) without its numpy/pillow requirement: the GPU image's own numpy and pillow stay.
.venv/bin/pip download -q --no-deps --dest .wheels "${platform[@]}" \
  matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six
# diffusers and huggingface-hub at this venv's versions, and their dependencies by name, all without resolving:
# torch's own (filelock, fsspec, typing-extensions), numpy and pillow stay the GPU image's.
hf_versions=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('diffusers'), m.version('huggingface-hub'))")
read -r diffusers_version hub_version <<< "$hf_versions"
.venv/bin/pip download -q --no-deps --dest .wheels "${platform[@]}" "diffusers==$diffusers_version" \
  "huggingface-hub==$hub_version" safetensors regex importlib_metadata zipp lazy-importer click hf-xet httpx2 httpcore2 \
  h11 anyio idna truststore requests charset-normalizer urllib3 certifi pyyaml
ds_version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('deepspeed'))")
.venv/bin/pip wheel -q --no-deps --wheel-dir .wheels "deepspeed==$ds_version"
if ls .wheels | grep -Eiq '^(torch|torchvision|triton)-|^nvidia_(cu|nccl|nvjitlink|nvtx)'; then
  echo "[gpu_wheels] refusing: a torch/CUDA wheel got in" >&2; exit 1
fi
du -sh .wheels; ls .wheels
