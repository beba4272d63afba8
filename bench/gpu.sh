#!/usr/bin/env bash
# Every GPU-only test and GPU benchmark in one call, about 8 minutes on one H100/H200: see bench/run_gpu.py.
#   bench/gpu.sh [--dry-run] [--only a,b] [--skip a,b] [--deadline-s S]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/run_gpu.py "$@"
