#!/usr/bin/env bash
# The pool-size sweep of one base size, with its standard-MoE twin and the dense base:
#   SIZE=350m bash examples/sweep_pool.sh           (runs one after another on the hostfile's nodes)
#   SIZE=350m SUBMIT=sbatch bash examples/sweep_pool.sh   (one SLURM job each)
set -euo pipefail
cd "$(dirname "$0")/.."
POOLS=${POOLS:-"128 256 512"}
run() {
  if [ "${SUBMIT:-}" = sbatch ]; then
    env "$@" sbatch examples/slurm/pretrain_deepspeed.sbatch
  else
    env "$@" bash examples/pretrain_gpt.sh
  fi
}
for pool in $POOLS; do run KIND=samoe POOL="$pool"; done
run KIND=moe POOL=
run KIND=dense POOL=
