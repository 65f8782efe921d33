#!/usr/bin/env bash
# One SaMoE paper configuration on the nodes of a DeepSpeed hostfile (passwordless ssh between them):
#   SIZE=350m KIND=samoe POOL=256 HOSTFILE=examples/hostfile bash examples/pretrain_gpt.sh
#   SIZE=1.3b KIND=moe bash examples/pretrain_gpt.sh          # the standard-MoE twin
# The last complete checkpoint in $RUN_DIR/checkpoints is resumed automatically.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/args_gpt.sh
maybe_dry_run "$@"
mkdir -p "$RUN_DIR"
deepspeed --hostfile "${HOSTFILE:-examples/hostfile}" pretrain_samoe.py "${ARGS[@]}" "$@" \
  2>&1 | tee -a "$RUN_DIR/train.log"
