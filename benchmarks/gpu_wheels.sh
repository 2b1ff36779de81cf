#!/usr/bin/env bash
# The wheels benchmarks/gpu_session.sh installs on a lent GPU machine, which has no network
# and lacks these packages: downloaded here into .whl/ (ignored by git; the device call
# carries it). Both are pure-Python wheels, so this machine's Python and platform do not
# matter. The versions are pinned: mixer.py calls Liger-Kernel's mHC autograd Functions
# with their 0.8.5 signatures.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5 expecttest==0.3.0
ls -l .whl
