#!/usr/bin/env bash
# Everything a lent GPU machine runs, in one call of at most 8 minutes: install hcpass (and
# the wheels carried in .whl/), run the GPU-marked tests and the benchmarks. Each step's log,
# session.log (each step's seconds and exit status) and the results file the session wrote,
# benchmarks/results/<gpu>-<date>.json, are copied to OUT after every step, so a step stopped
# at its limit still brings back what it measured (the benchmarks rewrite their results after
# each configuration). That is 6 files, of the 8 the device tool brings back.
#
#   HCPASS_COMMIT=<sha> bash benchmarks/gpu_session.sh OUT [tests|mixer|attnres|train|all] [ARGS...]
#   bash benchmarks/gpu_session.sh --dry-run OUT [tests|mixer|attnres|train|all]
#
# Before the call, here (the device has no network): `bash benchmarks/gpu_wheels.sh` puts the
# wheels the device lacks (liger-kernel, expecttest) in .whl/ (ignored by git, so the call
# carries it: the device tool's run with carry [".whl"], timeout_s 600 and the command
# `HCPASS_COMMIT=<HEAD's sha, written out: the tree travels without .git> bash
# benchmarks/gpu_session.sh $OUT`). Then copy OUT's <gpu>-<date>.json into benchmarks/results/.
#
# The steps, in the order `all` runs them, at the session's sizes (ARGS, given with one step,
# replace them and take that step past its limit, up to the budget), with the estimated time
# on an H100 machine (16 CPU cores) where nothing is compiled yet:
#
#   step     session sizes                               estimate  limit
#   setup    pip installs, torch import                      20 s
#   tests    -m gpu, 54 tests on 8 xdist workers             70 s   150 s
#   mixer    n = 4, C = 4096, 16 x 2048 tokens               100 s   150 s
#   attnres  C = 4096, 8 blocks, S = 4 and 16, 16 x 2048      60 s   100 s
#   train    gpt-100m (98.4M), 16 x 1024 tokens              160 s   240 s
#   total                                                    410 s (6.8 min)
#
# The session stops at SESSION_BUDGET_S (470 s: a step gets the time left, if less than its
# limit, and none under 20 s). Where the estimates come from -- compiles dominate:
# - a Triton kernel compiles in ~1 s (the generated kernels compile for sm_90 in 0.6-4 s,
#   1.8 s on average, on the 2-core development machine under load); a generated mixer kernel
#   autotunes 4 configs (4 compiles) for each (n, C, dtype);
# - tests: 48 autotuned mixer kernels (8 kernels x n in 2, 4, 8 x 2 dtypes: 192 compiles) and
#   ~10 Attention Residuals kernels over 8 workers, ~25 s; the longest tests, a converted
#   model compiled with backend="hcpass" (an Inductor compile and 32 kernel compiles), ~50 s;
#   startup and collection ~15 s;
# - mixer: hcpass 8 kernels x 4 configs (~35 s with the autotuner's timings), Inductor
#   compiles coeffs, pre and post_res with their backwards (~35 s), Liger ~8 kernels (~8 s),
#   9 phases x 4 columns timed by do_bench (25 ms warmup, 100 ms runs: ~7 s), import ~10 s;
# - attnres: 8 kernels (phase 1 for 1, 4 and 16 queries, merge, backward, the phases'
#   backward for 4 and 16 queries and the merge's: ~8 s), Inductor compiles two_phase forward
#   and backward for S = 4 and 16 (~35 s), 2 x 8 do_bench (~10 s), import ~10 s;
# - train: eager 25 steps (~3 s); Inductor compiles the 12-layer GPT's forward and backward
#   (~45 s); hcpass converts (~10 s), compiles (~50 s) and autotunes its 8 kernels at n = 4,
#   C = 768 (~35 s); 5 warmup + 20 timed steps of ~50 ms per variant; import ~10 s.
#
# --dry-run (CI runs it: tests/project/test_gpu_session.py): the same steps on CPU, in the
# current environment (nothing installed), so the script cannot rot between GPU sessions: the
# GPU-marked tests are collected (without a GPU they would only be skipped), and the
# benchmarks run with --dry-run (tiny shapes, the kernels in Triton's interpreter) and write
# their results to OUT/results, never to benchmarks/results. Their numbers mean nothing.
set -uo pipefail
dry_run=0
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi
out=${1:?usage: gpu_session.sh [--dry-run] OUT [tests|mixer|attnres|train|all] [ARGS...]}
what=${2:-all}
shift $(($# < 2 ? $# : 2))
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1  # the repository root, wherever it was called from
export PYTHONUNBUFFERED=1
started=$(mktemp)  # results files newer than this are the session's
trap 'rm -f "$started"' EXIT

if ((dry_run)); then
  export TRITON_INTERPRET=1 HCPASS_RESULTS_DIR="$out/results"
  budget=${SESSION_BUDGET_S:-3600}  # CI's CPU: minutes per step, and no step may be cut
  declare -A limit=([tests]=900 [mixer]=900 [attnres]=900 [train]=900)
  script_args=(--dry-run)
  pytest_args=(--collect-only)
else
  budget=${SESSION_BUDGET_S:-470}
  declare -A limit=([tests]=150 [mixer]=150 [attnres]=100 [train]=240)
  export TORCHINDUCTOR_CACHE_DIR=/tmp/hcpass-inductor
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    | tee "$out/session.log" || exit 1
  script_args=()
  pytest_args=()
  if python3 -c "import xdist" 2>/dev/null; then
    pytest_args=(-n 8)  # the tests' kernel compiles, in parallel
  fi
fi
echo "setup: ${SECONDS} s" | tee -a "$out/session.log"

status=0
step() {  # step NAME LOG COMMAND...: run within the time left, tee to OUT/LOG, copy the results
  local name=$1 log=$2
  shift 2
  local left=$((budget - SECONDS)) seconds=${limit[$name]}
  [[ $what == all ]] || seconds=$left  # one step asked for: only the budget bounds it
  ((seconds > left)) && seconds=$left
  if ((seconds < 20)); then
    echo "$name: not run, ${left} s of the ${budget} s budget left" | tee -a "$out/session.log"
    status=1
    return
  fi
  local begin=$SECONDS code=0
  timeout -k 10 "$seconds" "$@" 2>&1 | tee "$out/$log" || code=$?
  ((code == 124 || code == 137)) && echo "$name: stopped at its limit of $seconds s" | tee -a "$out/$log"
  ((code)) && status=1
  echo "$name: $((SECONDS - begin)) s, exit $code" | tee -a "$out/session.log"
  if ((!dry_run)); then
    find benchmarks/results -maxdepth 1 -name '*.json' -newer "$started" -exec cp {} "$out"/ \;
  fi
}
# ARGS, if any, replace a benchmark's session sizes
tests() { step tests gpu-tests.log python3 -m pytest -q -m gpu -p no:cacheprovider ${pytest_args[@]+"${pytest_args[@]}"} "$@"; }
mixer() {
  local sizes=(--n 4 --C 4096)
  (($#)) && sizes=("$@")
  step mixer mixer.log python3 benchmarks/mixer.py ${script_args[@]+"${script_args[@]}"} "${sizes[@]}"
}
attnres() {
  local sizes=(--C 4096 --S 4 16)
  (($#)) && sizes=("$@")
  step attnres attnres.log python3 benchmarks/attnres.py ${script_args[@]+"${script_args[@]}"} "${sizes[@]}"
}
train() {
  local sizes=(--preset gpt-100m)
  (($#)) && sizes=("$@")
  step train train.log python3 benchmarks/train_step.py ${script_args[@]+"${script_args[@]}"} "${sizes[@]}"
}
case $what in
  tests) tests "$@" ;;
  mixer) mixer "$@" ;;
  attnres) attnres "$@" ;;
  train) train "$@" ;;
  all)
    tests
    mixer
    attnres
    train
    ;;
  *) echo "unknown step: $what" >&2; exit 2 ;;
esac
echo "session: ${SECONDS} s, exit $status" | tee -a "$out/session.log"
exit $status
