#!/usr/bin/env bash
# Everything a lent GPU machine runs in one call: install hcpass (and the wheels carried in
# .whl/, e.g. expecttest and liger-kernel), then the GPU-marked tests and/or a benchmark.
# Logs and benchmarks/results/*.json are copied to OUT.
#
#   HCPASS_COMMIT=<sha> bash benchmarks/gpu_session.sh OUT [tests|mixer|train|all] [ARGS...]
#
# ARGS go to pytest (tests) or to the benchmark script (mixer, train).
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT [tests|mixer|train|all] [ARGS...]}
what=${2:-all}
shift $(($# < 2 ? $# : 2))
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/hcpass-inductor
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"

status=0
run() {  # run LOG COMMAND...: tee the output to OUT/LOG, remember a failure
  local log=$1
  shift
  "$@" 2>&1 | tee "$out/$log" || status=1
}
case $what in
  tests) run gpu-tests.log python3 -m pytest -q -m gpu -p no:cacheprovider "$@" ;;
  mixer) run mixer.log python3 benchmarks/mixer.py "$@" ;;
  train) run train.log python3 benchmarks/train_step.py "$@" ;;
  all)
    run gpu-tests.log python3 -m pytest -q -m gpu -p no:cacheprovider
    run mixer.log python3 benchmarks/mixer.py
    run train.log python3 benchmarks/train_step.py
    ;;
  *) echo "unknown step: $what" >&2; exit 2 ;;
esac
cp benchmarks/results/*.json "$out"/ 2>/dev/null
exit $status
