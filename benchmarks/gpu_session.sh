#!/usr/bin/env bash
# Everything a lent GPU machine runs in one call: install hcpass (and wheels carried in
# .whl/), the GPU-marked tests, then the benchmarks. Results land in benchmarks/results/
# and are copied to $1 (default: ./gpu-out).
#   HCPASS_COMMIT=<sha> bash benchmarks/gpu_session.sh OUTDIR [tests|mixer|train|all] [ARGS...]
set -uo pipefail
out=${1:-gpu-out}; what=${2:-all}; shift 2 || true
mkdir -p "$out" /tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/inductor-cache/triton
src=.
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
status=0
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -m gpu -p no:cacheprovider "$@" 2>&1 | tee "$out/gpu-tests.log" || status=1
fi
if [[ $what == mixer || $what == all ]]; then
  python3 "$src/benchmarks/mixer.py" "$@" 2>&1 | tee "$out/mixer.log" || status=1
fi
if [[ $what == train || $what == all ]]; then
  python3 "$src/benchmarks/train_step.py" "$@" 2>&1 | tee "$out/train.log" || status=1
fi
cp "$src"/benchmarks/results/*.json "$out"/ 2>/dev/null
exit $status
