#!/usr/bin/env bash
# One-shot check of samoe on one GPU (docs: README "GPU check"): grouped GEMM probe, SaMoE's expert
# function and one-hot pool against their references on the device, host syncs in a SaMoE layer,
# the throughput bench in bf16, and 3+3 steps of ZeRO-2 with recompute through a save and resume.
#   bash scripts/gpu_check.sh [results.json]        (about 5-8 minutes on one GPU)
# Needs the venv (SAMOE_GPU=1 bash scripts/setup.sh) and the default corpus (data/; SAMOE_SKIP_CORPUS
# unset). On a CPU machine it runs the same sections on the CPU (host syncs do not apply).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_results.json}
PY=.venv/bin/python
[ -x "$PY" ] || PY=$(command -v python3)
exec "$PY" tools/gpu_check.py --output "$OUT" ${GPU_CHECK_ARGS:-}
