#!/usr/bin/env bash
# Everything a lent GPU machine runs in one call: install hcpass (and the wheels carried in
# .whl/, e.g. expecttest and liger-kernel), then the GPU-marked tests and/or a benchmark.
# Logs and benchmarks/results/*.json are copied to OUT.
#
#   HCPASS_COMMIT=<sha> bash benchmarks/gpu_session.sh OUT [tests|mixer|train|all] [ARGS...]
#   bash benchmarks/gpu_session.sh --dry-run OUT [tests|mixer|train|all]
#
# ARGS go to pytest (tests) or to the benchmark script (mixer, train).
#
# --dry-run (CI runs it: tests/project/test_gpu_session.py): the same steps on CPU, in the current
# environment (nothing installed), so the script cannot rot between GPU sessions: the
# GPU-marked tests are collected (without a GPU they would only be skipped), and the
# benchmarks run with --dry-run (tiny shapes, the kernels in Triton's interpreter) and write
# their results to OUT/results, never to benchmarks/results. Their numbers mean nothing.
set -uo pipefail
dry_run=0
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi
out=${1:?usage: gpu_session.sh [--dry-run] OUT [tests|mixer|train|all] [ARGS...]}
what=${2:-all}
shift $(($# < 2 ? $# : 2))
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1  # the repository root, wherever it was called from
export PYTHONUNBUFFERED=1

if ((dry_run)); then
  export TRITON_INTERPRET=1 HCPASS_RESULTS_DIR="$out/results"
  script_args=(--dry-run)
  pytest_args=(--collect-only)
else
  export TORCHINDUCTOR_CACHE_DIR=/tmp/hcpass-inductor
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
  script_args=()
  pytest_args=()
fi

status=0
run() {  # run LOG COMMAND...: tee the output to OUT/LOG, remember a failure
  local log=$1
  shift
  "$@" 2>&1 | tee "$out/$log" || status=1
}
tests() { run gpu-tests.log python3 -m pytest -q -m gpu -p no:cacheprovider ${pytest_args[@]+"${pytest_args[@]}"} "$@"; }
mixer() { run mixer.log python3 benchmarks/mixer.py ${script_args[@]+"${script_args[@]}"} "$@"; }
train() { run train.log python3 benchmarks/train_step.py ${script_args[@]+"${script_args[@]}"} "$@"; }
case $what in
  tests) tests "$@" ;;
  mixer) mixer "$@" ;;
  train) train "$@" ;;
  all)
    tests
    mixer
    train
    ;;
  *) echo "unknown step: $what" >&2; exit 2 ;;
esac
if ((!dry_run)); then
  cp benchmarks/results/*.json "$out"/ 2>/dev/null
fi
exit $status
