#!/usr/bin/env bash
# Set up (idempotent) and run the main job: a small SaMoE GPT pretrained with 2 processes through
# the deepspeed launcher on the built-in Shakespeare corpus. Extra arguments go to pretrain_samoe.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# glibc: keep large activation buffers instead of mmap-ing and page-faulting them afresh every
# step (SaMoE's grouped expert buffers; see bench/memory_samoe.py). CPU-only tuning.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
run=runs/main
mkdir -p "$run"
exec deepspeed --num_gpus 2 pretrain_samoe.py --ds_config examples/ds_config_cpu.json \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
  --num-experts 8 --moe-router-topk 2 --samoe-pool-size 4 --moe-layer-freq 2 \
  --micro-batch-size 8 --global-batch-size 32 --train-iters 300 \
  --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 20 \
  --log-interval 20 --eval-interval 100 --eval-iters 8 \
  --data-path data/shakespeare_text_document --tokenizer-model data/spm.model \
  --metrics-file "$run/metrics.jsonl" --tensorboard-dir "$run/tensorboard" --save "$run/checkpoints" \
  "$@"
