# Megatron-style grouped flag arrays for the SaMoE paper configurations. Sourced by the launch
# scripts; the choices come from the environment:
#   SIZE=350m|1.3b        dense base model (GPT-3 shapes)
#   KIND=samoe|moe|shared|dense  SaMoE (shared pool), its standard-MoE twin, shared routing (each
#                         MoE layer's router picks among the POOL pool experts directly), or the dense base
#   POOL=<P>              SaMoE pool size (default 256: 12 MoE layers x 128 experts = 1536 -> 6x fewer)
#   EP=<size>             expert-parallel size (default 8)
#   DATA_PATH, TOKENIZER_MODEL, RUN_DIR, DS_CONFIG, TRAIN_ITERS, GLOBAL_BATCH, MICRO_BATCH
SIZE=${SIZE:-350m}
KIND=${KIND:-samoe}
POOL=${POOL-256}
EP=${EP:-8}
RUN_DIR=${RUN_DIR:-runs/${SIZE}_${KIND}${POOL:+_p$POOL}}

case "$SIZE" in
  350m) MODEL_ARGS=(--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --ffn-hidden-size 4096) ;;
  1.3b) MODEL_ARGS=(--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --ffn-hidden-size 8192) ;;
  *) echo "unknown SIZE=$SIZE (350m or 1.3b)" >&2; return 2 2>/dev/null || exit 2 ;;
esac
MODEL_ARGS+=(--seq-length 2048 --max-position-embeddings 2048 --position-embedding-type rope
             --init-method-std 0.014)

# 128 experts in every other layer, top-1 routing (as DeepSpeed-MoE's 350M+MoE-128), capacity 1.0
MOE_ARGS=()
case "$KIND" in
  samoe) MOE_ARGS=(--num-experts 128 --moe-layer-freq 2 --moe-router-topk 1 --moe-aux-loss-coeff 0.01
                   --moe-expert-capacity-factor 1.0 --samoe-pool-size "$POOL" --samoe-init peaked
                   --samoe-init-peak-mass 0.95 --samoe-temperature 1.0) ;;
  shared) MOE_ARGS=(--num-experts "$POOL" --moe-layer-freq 2 --moe-router-topk 1 --moe-aux-loss-coeff 0.01
                   --moe-expert-capacity-factor 1.0 --samoe-pool-size "$POOL" --samoe-route-to-pool) ;;
  moe)   MOE_ARGS=(--num-experts 128 --moe-layer-freq 2 --moe-router-topk 1 --moe-aux-loss-coeff 0.01
                   --moe-expert-capacity-factor 1.0) ;;
  dense) MOE_ARGS=() ;;
  *) echo "unknown KIND=$KIND (samoe, moe, shared or dense)" >&2; return 2 2>/dev/null || exit 2 ;;
esac

PARALLEL_ARGS=()
[ "$KIND" != dense ] && PARALLEL_ARGS=(--expert-model-parallel-size "$EP")

TRAINING_ARGS=(--micro-batch-size "${MICRO_BATCH:-4}" --global-batch-size "${GLOBAL_BATCH:-256}"
               --train-iters "${TRAIN_ITERS:-300000}" --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine
               --lr-warmup-iters 2000 --weight-decay 0.1 --clip-grad 1.0 --bf16 --seed 1234)

DATA_ARGS=(--data-path "${DATA_PATH:-data/pile_text_document}" --split 969,30,1
           --tokenizer-model "${TOKENIZER_MODEL:-data/spm.model}")

LOGGING_ARGS=(--log-interval 10 --eval-interval 1000 --eval-iters 10
              --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --save-interval 1000
              --keep-last-checkpoints 3 --metrics-file "$RUN_DIR/metrics.jsonl"
              --tensorboard-dir "$RUN_DIR/tensorboard")

ARGS=(--ds_config "${DS_CONFIG:-examples/ds_config_gpu_zero1_bf16.json}"
      "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}"
      "${DATA_ARGS[@]}" "${LOGGING_ARGS[@]}")

# DRY_RUN=1: print the argument list, one per line, instead of launching (used by the tests).
maybe_dry_run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%s\n' "${ARGS[@]}" "$@"; exit 0; fi
}
