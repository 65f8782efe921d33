"""Run configuration: one dataclass per concern, each field documented and validated.

Every field maps to the Megatron-spelled flag of the same name (``num_layers`` -> ``--num-layers``);
SaMoE's own fields share the ``samoe_`` prefix. Configs hold numbers and names only, never process
groups or devices. Validation that needs the world size (:func:`validate_layout`) runs before any
process group is created, so an impossible layout fails with one message and no stack of ranks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional


# Default weight of the peak pool expert in each row of A_l at initialisation (--samoe-init-peak-mass).
DEFAULT_PEAK_MASS = 0.95


class ConfigError(ValueError):
    """A bad flag value or an impossible combination; the message names the field and the fix."""


def doc(text: str, **kwargs):
    """A dataclass field with its help text (the field's docstring, shown by ``--help``)."""
    return field(metadata={"help": text}, **kwargs)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value is not None and value > 0, f"--{name.replace('_', '-')} must be > 0, got {value}")


@dataclass
class ModelConfig:
    """Shape of the GPT model (megatron-core GPTModel with the local layer spec)."""

    num_layers: int = doc("Number of transformer layers.", default=4)
    hidden_size: int = doc("Transformer hidden size h.", default=128)
    num_attention_heads: int = doc("Attention heads; must divide --hidden-size.", default=4)
    ffn_hidden_size: Optional[int] = doc("FFN hidden size f of dense layers and experts (default 4*h).", default=None)
    seq_length: int = doc("Tokens per training sample.", default=128)
    max_position_embeddings: Optional[int] = doc("Longest sequence the position embedding supports (default --seq-length).", default=None)
    vocab_size: Optional[int] = doc("Vocabulary size; must equal the tokenizer's (default: read from --tokenizer-model).", default=None)
    position_embedding_type: str = doc("'rope' or 'learned_absolute'.", default="rope")
    normalization: str = doc("'LayerNorm' or 'RMSNorm'.", default="LayerNorm")
    swiglu: bool = doc("Use a SwiGLU (gated) FFN in dense layers and experts.", default=False)
    attention_dropout: float = doc("Dropout on attention probabilities.", default=0.0)
    hidden_dropout: float = doc("Dropout on residual branches.", default=0.0)
    init_method_std: float = doc("Std of the normal weight initialisation.", default=0.02)
    untie_embeddings_and_output_weights: bool = doc("Separate output layer instead of reusing the input embedding.", default=False)

    def __post_init__(self) -> None:
        _positive(self, "num_layers", "hidden_size", "num_attention_heads", "seq_length")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        _positive(self, "ffn_hidden_size", "max_position_embeddings")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                 f"{self.num_attention_heads}")
        _require(self.seq_length <= self.max_position_embeddings,
                 f"--seq-length {self.seq_length} exceeds --max-position-embeddings "
                 f"{self.max_position_embeddings}")
        _require(self.position_embedding_type in ("rope", "learned_absolute"),
                 f"--position-embedding-type must be 'rope' or 'learned_absolute', got "
                 f"{self.position_embedding_type!r}")
        _require(self.normalization in ("LayerNorm", "RMSNorm"),
                 f"--normalization must be 'LayerNorm' or 'RMSNorm', got {self.normalization!r}")
        if self.vocab_size is not None:
            _positive(self, "vocab_size")
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"--{name.replace('_', '-')} must be in [0, 1), got {value}")


@dataclass
class MoEConfig:
    """Mixture-of-Experts layers. Dense when --num-experts is not given."""

    num_experts: Optional[int] = doc("Experts per MoE layer N (standard MoE; with --samoe-pool-size, SaMoE).", default=None)
    moe_router_topk: int = doc("Experts each token is routed to (k).", default=2)
    moe_aux_loss_coeff: float = doc("Switch load-balancing loss coefficient.", default=0.01)
    moe_z_loss_coeff: Optional[float] = doc("Router z-loss coefficient (off when not given).", default=None)
    moe_expert_capacity_factor: Optional[float] = doc("Capacity factor; tokens over capacity are dropped (dropless when not given).", default=None)
    moe_pad_expert_input_to_capacity: bool = doc(
        "Pad every expert's tokens to its capacity with zero-weight tokens (DeepSpeed's and GShard's "
        "policy; needs --moe-expert-capacity-factor): fixed shapes, no token-count exchange, one batched "
        "GEMM per expert product; the same tokens are kept and the same result computed.", default=False)
    moe_layer_freq: int = doc("Every k-th transformer layer is an MoE layer (1: all).", default=1)
    moe_ffn_hidden_size: Optional[int] = doc("Expert FFN size (default --ffn-hidden-size).", default=None)
    moe_token_dispatcher_type: str = doc("megatron-core token dispatcher: 'alltoall' or 'allgather'.", default="alltoall")
    moe_router_pre_softmax: bool = doc("Softmax over all experts before top-k (Switch/GShard); otherwise over the top-k logits.", default=True)

    @property
    def enabled(self) -> bool:
        return self.num_experts is not None

    def __post_init__(self) -> None:
        if self.num_experts is None:
            return
        _positive(self, "num_experts", "moe_router_topk", "moe_layer_freq")
        _require(self.moe_router_topk <= self.num_experts,
                 f"--moe-router-topk {self.moe_router_topk} exceeds --num-experts {self.num_experts}")
        _require(self.moe_router_topk > 1 or self.moe_router_pre_softmax,
                 "--moe-router-topk 1 needs --moe-router-pre-softmax (a softmax over one chosen logit is "
                 "always 1 and the router would get no gradient from the output)")
        _require(self.moe_aux_loss_coeff >= 0, f"--moe-aux-loss-coeff must be >= 0, got {self.moe_aux_loss_coeff}")
        if self.moe_z_loss_coeff is not None:
            _require(self.moe_z_loss_coeff >= 0, f"--moe-z-loss-coeff must be >= 0, got {self.moe_z_loss_coeff}")
        if self.moe_expert_capacity_factor is not None:
            _require(self.moe_expert_capacity_factor > 0,
                     f"--moe-expert-capacity-factor must be > 0, got {self.moe_expert_capacity_factor}")
        _require(not self.moe_pad_expert_input_to_capacity or self.moe_expert_capacity_factor is not None,
                 "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor (the capacity to pad "
                 "to); give one, or drop the padding flag for dropless routing")
        _require(self.moe_token_dispatcher_type in ("alltoall", "allgather"),
                 f"--moe-token-dispatcher-type must be 'alltoall' or 'allgather', got "
                 f"{self.moe_token_dispatcher_type!r}")


def flag_name(field: str) -> str:
    """The command-line flag of a config field: ``foo_bar`` -> ``--foo-bar`` (Megatron's spelling)."""
    return "--" + field.replace("_", "-")


POOL_SHARDING_CHOICES = ("replicated", "sharded")


@dataclass
class SaMoEConfig:
    """The shared expert pool: each MoE layer's experts are a learned soft combination of it."""

    samoe_pool_size: Optional[int] = doc("Pool size P; turns the MoE layers into SaMoE layers (needs --num-experts).", default=None)
    samoe_route_to_pool: bool = doc(
        "Shared routing: each MoE layer's router chooses among the P pool experts directly (needs "
        "--num-experts equal to --samoe-pool-size); no combination weights, no materialisation.", default=False)
    samoe_combination: str = doc(
        "How a layer's experts combine the pool: 'softmax' (A_l = softmax(C_l / tau), rows on the simplex) or "
        "'linear' (A_l = C_l, signed, rows initialised one-hot).", default="softmax")
    samoe_temperature: float = doc("Temperature tau of A_l = softmax(C_l / tau).", default=1.0)
    samoe_top_m: int = doc("Keep the top-m entries of each combination row and renormalise (0: dense, all P).", default=0)
    samoe_init: str = doc("Initialisation of C_l: 'peaked' (distinct pool expert per layer expert), 'uniform' or 'random'.", default="peaked")
    samoe_init_peak_mass: Optional[float] = doc(
        "Peaked init as the weight m in (1/P, 1) that each row of A_l puts on its peak pool expert at step 0 "
        f"(logit offset tau * ln(m (P-1) / (1-m))); default {DEFAULT_PEAK_MASS} unless --samoe-init-peak is given.",
        default=None)
    samoe_init_peak: Optional[float] = doc(
        "Peaked init as a raw logit offset beta (its mass e^beta / (e^beta + P - 1) softens as P grows; "
        "exclusive with --samoe-init-peak-mass).", default=None)
    samoe_init_noise: float = doc("Std of the noise added to C_l at initialisation.", default=0.01)
    samoe_combination_lr_mult: float = doc(
        "Learning-rate multiplier of the combination logits C_l (their own optimizer group; the schedule "
        "scales it like --lr).", default=1.0)
    samoe_pool_sharding: str = doc(
        "Where the pool lives: 'replicated' (every rank holds all of it, reduced over the world) or 'sharded' "
        "(its columns split over the expert-data-parallel group: each rank materialises its columns and "
        "all-gathers the rest, and the pool's memory, gradient and materialisation shrink with that group; "
        "see docs/DESIGN.md section 6).", default="replicated")
    samoe_materialize_once_per_step: bool = doc(
        "Materialise (and, sharded, all-gather) each layer's experts once per optimizer step and reuse them in "
        "every micro-batch's forward and backward, instead of once in each forward and again in each backward. "
        "Costs the materialised experts' memory for the whole step (every MoE layer's n local experts, as much "
        "as a standard MoE's expert weights); the gradients are unchanged (docs/DESIGN.md section 6).",
        default=False)
    samoe_prefetch_gather: bool = doc(
        "Sharded pool: each SaMoE layer starts the next layer's all-gather of its experts (asynchronously) "
        "before it runs its own, so the collective can overlap this layer's compute; costs one more layer's "
        "local experts of memory in forward. The result is unchanged (docs/DESIGN.md section 6).",
        default=False)

    @property
    def enabled(self) -> bool:
        return self.samoe_pool_size is not None

    def __post_init__(self) -> None:
        _require(self.samoe_temperature > 0, f"--samoe-temperature must be > 0, got {self.samoe_temperature}")
        _require(self.samoe_init in ("peaked", "uniform", "random"),
                 f"--samoe-init must be 'peaked', 'uniform' or 'random', got {self.samoe_init!r}")
        _require(self.samoe_combination in ("softmax", "linear"),
                 f"--samoe-combination must be 'softmax' or 'linear', got {self.samoe_combination!r}")
        _require(self.samoe_top_m >= 0, f"--samoe-top-m must be >= 0, got {self.samoe_top_m}")
        _require(self.samoe_init_noise >= 0, f"--samoe-init-noise must be >= 0, got {self.samoe_init_noise}")
        _require(self.samoe_combination_lr_mult > 0,
                 f"--samoe-combination-lr-mult must be > 0, got {self.samoe_combination_lr_mult}")
        _require(self.samoe_pool_sharding in POOL_SHARDING_CHOICES,
                 f"--samoe-pool-sharding must be one of {', '.join(POOL_SHARDING_CHOICES)}, got "
                 f"{self.samoe_pool_sharding!r}")
        _require(self.samoe_init_peak is None or self.samoe_init_peak_mass is None,
                 "--samoe-init-peak and --samoe-init-peak-mass both set the peaked init: give one of them")
        if self.samoe_init_peak_mass is not None:
            _require(0.0 < self.samoe_init_peak_mass < 1.0,
                     f"--samoe-init-peak-mass must be in (0, 1), got {self.samoe_init_peak_mass}")
        if self.samoe_combination == "linear":
            _require(self.samoe_top_m == 0 and self.samoe_temperature == 1.0,
                     "--samoe-combination linear has no softmax: drop --samoe-top-m and --samoe-temperature")
            _require(self.samoe_init == "peaked" and self.samoe_init_peak is None and self.samoe_init_peak_mass is None,
                     "--samoe-combination linear starts its rows one-hot: drop --samoe-init, --samoe-init-peak "
                     "and --samoe-init-peak-mass")
        if self.samoe_route_to_pool:
            _require(self.samoe_pool_size is not None, "--samoe-route-to-pool needs --samoe-pool-size P")
            _require(self.samoe_combination == "softmax" and self.samoe_top_m == 0 and self.samoe_temperature == 1.0
                     and self.samoe_init == "peaked" and self.samoe_init_peak is None
                     and self.samoe_init_peak_mass is None and self.samoe_combination_lr_mult == 1.0,
                     "--samoe-route-to-pool has no combination weights: drop --samoe-combination, --samoe-top-m, "
                     "--samoe-temperature, --samoe-init*, --samoe-combination-lr-mult")
        if self.samoe_materialize_once_per_step:
            _require(self.samoe_pool_size is not None, "--samoe-materialize-once-per-step needs --samoe-pool-size P")
            _require(not self.samoe_route_to_pool,
                     "--samoe-route-to-pool uses the pool experts as they are, nothing is materialised: drop "
                     "--samoe-materialize-once-per-step")
        if self.samoe_prefetch_gather:
            _require(self.samoe_pool_size is not None and self.samoe_pool_sharding == "sharded",
                     "--samoe-prefetch-gather starts the sharded pool's all-gathers early: it needs "
                     "--samoe-pool-size P and --samoe-pool-sharding sharded")
            _require(not self.samoe_materialize_once_per_step,
                     "--samoe-materialize-once-per-step gathers each layer once per step, before any "
                     "prefetch could: drop --samoe-prefetch-gather")
        if self.samoe_pool_size is not None:
            _positive(self, "samoe_pool_size")
            _require(self.samoe_top_m <= self.samoe_pool_size,
                     f"--samoe-top-m {self.samoe_top_m} exceeds --samoe-pool-size {self.samoe_pool_size}")
            if self.samoe_init_peak_mass is not None:
                _require(self.samoe_init_peak_mass > 1.0 / self.samoe_pool_size,
                         f"--samoe-init-peak-mass {self.samoe_init_peak_mass} is not above the uniform weight "
                         f"1/P = {1.0 / self.samoe_pool_size:.4g}: it would not peak")

    def init_peak_logit(self) -> float:
        """The logit offset of the peaked init: ``--samoe-init-peak`` as given, or the offset that
        gives the peak the mass ``m`` (``--samoe-init-peak-mass``, default DEFAULT_PEAK_MASS) in
        ``softmax(C / tau)``: ``tau * ln(m (P - 1) / (1 - m))``."""
        if self.samoe_init_peak is not None:
            return self.samoe_init_peak
        return peak_logit_for_mass(
            DEFAULT_PEAK_MASS if self.samoe_init_peak_mass is None else self.samoe_init_peak_mass,
            self.samoe_pool_size, self.samoe_temperature)


def peak_logit_for_mass(mass: float, pool_size: int, temperature: float = 1.0) -> float:
    """Logit offset tau*beta with softmax weight ``mass`` on one of ``pool_size`` entries, the rest 0.

    m = e^beta / (e^beta + P - 1)  <=>  beta = ln(m (P - 1) / (1 - m)). With P = 1 the one entry
    has weight 1 whatever the offset: 0 is returned.
    """
    if pool_size == 1:
        return 0.0
    return temperature * math.log(mass * (pool_size - 1) / (1.0 - mass))


@dataclass
class ParallelConfig:
    """How the world is split (megatron-core's layout, PP = 1; docs/DESIGN.md section 7):
    attention, dense MLP, embedding and output over world = TP x DP; experts, whole on a rank
    (expert TP = 1), over world = EP x EDP, with EP groups of consecutive ranks."""

    expert_model_parallel_size: int = doc("Expert-parallel size EP: each EP group holds all N experts of a layer.", default=1)
    tensor_model_parallel_size: int = doc("Tensor-parallel size TP: attention, dense MLP, vocabulary embedding and output split over TP consecutive ranks (megatron-core's); experts stay whole.", default=1)
    sequence_parallel: bool = doc("Megatron sequence parallelism (needs TP > 1): norms, dropout and MoE layers each work on 1/TP of the sequence.", default=False)

    def __post_init__(self) -> None:
        _positive(self, "expert_model_parallel_size")
        _positive(self, "tensor_model_parallel_size")
        _require(not self.sequence_parallel or self.tensor_model_parallel_size > 1,
                 "--sequence-parallel splits the sequence over the tensor-parallel group: it needs "
                 "--tensor-model-parallel-size > 1")


@dataclass
class TrainingConfig:
    """Optimisation, schedule, logging and checkpointing."""

    micro_batch_size: int = doc("Samples per rank per forward/backward.", default=4)
    global_batch_size: Optional[int] = doc("Samples per optimizer step over all ranks (default micro x data-parallel size).", default=None)
    train_iters: int = doc("Optimizer steps to train.", default=100)
    lr: float = doc("Peak learning rate.", default=1e-3)
    min_lr: float = doc("Learning rate at the end of the decay.", default=1e-4)
    lr_decay_style: str = doc("'cosine', 'linear' or 'constant' after warmup.", default="cosine")
    lr_warmup_iters: int = doc("Linear warmup steps from 0 to --lr.", default=10)
    lr_decay_iters: Optional[int] = doc("Steps over which the lr decays (default --train-iters).", default=None)
    weight_decay: float = doc("AdamW weight decay (not applied to biases and norms).", default=0.1)
    adam_beta1: float = doc("AdamW beta1.", default=0.9)
    adam_beta2: float = doc("AdamW beta2.", default=0.95)
    adam_eps: float = doc("AdamW epsilon.", default=1e-8)
    clip_grad: float = doc("Gradient clipping by global norm (0: off).", default=1.0)
    bf16: bool = doc("Train in bf16 (DeepSpeed bf16 with fp32 master weights).", default=False)
    seed: int = doc("Random seed of initialisation, data order and dropout.", default=1234)
    log_interval: int = doc("Steps between iteration log lines.", default=10)
    eval_interval: int = doc("Steps between validation runs (0: only at the end).", default=50)
    eval_iters: int = doc("Global batches of validation data per evaluation.", default=10)
    save: Optional[str] = doc("Directory to save checkpoints to.", default=None)
    load: Optional[str] = doc("Directory to load a checkpoint from.", default=None)
    save_interval: Optional[int] = doc("Steps between checkpoints (default: only at the end when --save is set).", default=None)
    keep_last_checkpoints: Optional[int] = doc("Keep only the newest K checkpoints in --save (default: all).", default=None)
    exit_duration_in_mins: Optional[float] = doc("Save (when --save is set) and stop once the run has lasted this long.", default=None)
    recompute_granularity: Optional[str] = doc("'full': recompute each transformer layer in backward (non-reentrant activation checkpointing).", default=None)
    exit_interval: Optional[int] = doc("Stop (after saving, when --save is set) once the iteration is a multiple of this.", default=None)
    override_opt_param_scheduler: bool = doc(
        "On --load, apply this command line's learning-rate schedule and optimizer settings (--lr, --min-lr, "
        "--lr-*, --weight-decay, --adam-*, --samoe-combination-lr-mult) where they differ from the checkpoint's.",
        default=False)
    use_checkpoint_opt_param_scheduler: bool = doc(
        "On --load, keep the checkpoint's learning-rate schedule and optimizer settings where this command line "
        "differs (without either flag a difference is an error).", default=False)
    allow_data_change: bool = doc(
        "On --load, continue on data that differs from the checkpoint's (data prefixes and their sizes, split, "
        "seed, sequence length, tokenizer); without it a difference is an error.", default=False)
    overwrite_checkpoints: bool = doc(
        "Let --save write into a directory holding another run's checkpoints (one this run did not --load), "
        "replacing its 'latest'; without it that is an error.", default=False)
    tensorboard_dir: Optional[str] = doc("Write TensorBoard events here.", default=None)
    metrics_file: Optional[str] = doc("Write JSON-lines metrics here (rank 0).", default=None)

    def __post_init__(self) -> None:
        _positive(self, "micro_batch_size", "train_iters", "lr", "log_interval", "eval_iters")
        if self.global_batch_size is not None:
            _positive(self, "global_batch_size")
        _require(0 <= self.min_lr <= self.lr, f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        _require(self.lr_decay_style in ("cosine", "linear", "constant"),
                 f"--lr-decay-style must be 'cosine', 'linear' or 'constant', got {self.lr_decay_style!r}")
        _require(0 <= self.lr_warmup_iters <= self.train_iters,
                 f"--lr-warmup-iters {self.lr_warmup_iters} must be in [0, --train-iters {self.train_iters}]")
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.train_iters
        _require(self.lr_decay_iters >= self.lr_warmup_iters,
                 f"--lr-decay-iters {self.lr_decay_iters} must be >= --lr-warmup-iters {self.lr_warmup_iters}")
        _require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        _require(self.clip_grad >= 0, f"--clip-grad must be >= 0, got {self.clip_grad}")
        _require(self.eval_interval >= 0, f"--eval-interval must be >= 0, got {self.eval_interval}")
        _require(self.recompute_granularity in (None, "full"),
                 f"--recompute-granularity must be 'full' (whole layers), got {self.recompute_granularity!r}")
        for name in ("save_interval", "exit_interval", "keep_last_checkpoints", "exit_duration_in_mins"):
            if getattr(self, name) is not None:
                _positive(self, name)
        _require(not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
                 "--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other: "
                 "choose the command line's values or the checkpoint's")


@dataclass
class DataConfig:
    """Training data and tokenizer (Megatron's data flags; samoe_dist/data has the pipeline)."""

    data_path: Optional[list] = doc("Megatron indexed dataset: one prefix (PREFIX.bin/.idx from tools/preprocess_data.py) or a weighted blend 'W1 PREFIX1 W2 PREFIX2 ...'; a .jsonl or text file is also accepted and preprocessed once into --data-cache-path.", default=None)
    split: str = doc("Train/valid/test proportions of each dataset's documents, Megatron style ('969,30,1').", default="969,30,1")
    tokenizer_type: Optional[str] = doc("'SentencePieceTokenizer' or 'GPT2BPETokenizer' (default: SentencePiece with --tokenizer-model, GPT-2 BPE with --vocab-file).", default=None)
    tokenizer_model: Optional[str] = doc("SentencePiece model file (tools/train_tokenizer.py makes one).", default=None)
    vocab_file: Optional[str] = doc("GPT-2 BPE vocab.json (GPT2BPETokenizer, with --merge-file).", default=None)
    merge_file: Optional[str] = doc("GPT-2 BPE merges.txt (GPT2BPETokenizer, with --vocab-file).", default=None)
    data_cache_path: Optional[str] = doc("Folder for the dataset index caches and for .jsonl corpora preprocessed on the fly (default: index_cache/ next to the first dataset; the .jsonl's own folder).", default=None)
    eod_mask_loss: bool = doc("Leave end-of-document tokens out of the loss (loss_mask 0 there).", default=False)

    def __post_init__(self) -> None:
        parts = self.split.replace("/", ",").split(",")
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--split must be comma-separated numbers like '969,30,1', got {self.split!r}") from None
        _require(len(weights) <= 3 and all(w >= 0 for w in weights) and sum(weights) > 0,
                 f"--split must be up to 3 non-negative numbers with a positive sum, got {self.split!r}")
        from samoe_dist.data.tokenizers import TokenizerSpec

        TokenizerSpec(self.tokenizer_type, self.tokenizer_model, self.vocab_file, self.merge_file).check()
        self.blend()

    def blend(self) -> tuple[list, Optional[list]]:
        """--data-path as (paths, weights): weights is None for one path or an unweighted list."""
        paths = list(self.data_path or [])
        numbers = [self._number(p) for p in paths]
        if len(paths) >= 2 and len(paths) % 2 == 0 and all(n is not None for n in numbers[0::2]):
            weights = numbers[0::2]
            _require(all(0 < w < float("inf") for w in weights),
                     f"--data-path weights must be positive numbers, got {paths[0::2]}")
            _require(all(n is None for n in numbers[1::2]),
                     f"--data-path {' '.join(paths)}: expected 'W1 PREFIX1 W2 PREFIX2 ...' with prefixes after "
                     f"the weights")
            return paths[1::2], weights
        _require(all(n is None for n in numbers),
                 f"--data-path {' '.join(paths)}: a weight must be followed by its prefix "
                 f"('W1 PREFIX1 W2 PREFIX2 ...'), or give prefixes only")
        return paths, None

    @staticmethod
    def _number(text: str) -> Optional[float]:
        try:
            return float(text)
        except ValueError:
            return None


@dataclass
class RunConfig:
    """Everything a run needs, grouped by concern."""

    model: ModelConfig
    moe: MoEConfig
    samoe: SaMoEConfig
    parallel: ParallelConfig
    training: TrainingConfig
    data: DataConfig

    def __post_init__(self) -> None:
        if self.samoe.enabled:
            _require(self.moe.enabled, "--samoe-pool-size needs --num-experts (the experts per SaMoE layer)")
            if self.samoe.samoe_route_to_pool:
                _require(self.moe.num_experts == self.samoe.samoe_pool_size,
                         f"--samoe-route-to-pool routes each layer's tokens to the pool's experts directly: "
                         f"--num-experts {self.moe.num_experts} must equal --samoe-pool-size "
                         f"{self.samoe.samoe_pool_size}")
        if self.moe.enabled:
            _require(self.moe.moe_layer_freq <= self.model.num_layers,
                     f"--moe-layer-freq {self.moe.moe_layer_freq} exceeds --num-layers "
                     f"{self.model.num_layers}: no layer would be an MoE layer")
            if self.moe.moe_ffn_hidden_size is None:
                self.moe.moe_ffn_hidden_size = self.model.ffn_hidden_size
        else:
            _require(self.parallel.expert_model_parallel_size == 1,
                     "--expert-model-parallel-size > 1 needs --num-experts (a dense model has no experts to shard)")
        tp = self.parallel.tensor_model_parallel_size
        if tp > 1:
            m = self.model
            _require(m.num_attention_heads % tp == 0,
                     f"--num-attention-heads {m.num_attention_heads} is not divisible by --tensor-model-parallel-size "
                     f"{tp} (each TP rank holds whole heads)")
            _require(m.ffn_hidden_size % tp == 0,
                     f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
            _require(m.vocab_size is None or m.vocab_size % tp == 0,
                     f"--vocab-size {m.vocab_size} is not divisible by --tensor-model-parallel-size {tp} (the "
                     f"embedding and output are split by vocabulary rows)")
            _require(not self.parallel.sequence_parallel or m.seq_length % tp == 0,
                     f"--sequence-parallel splits --seq-length {m.seq_length} over {tp} ranks: it must divide")
            ep = self.parallel.expert_model_parallel_size
            _require(ep == 1 or ep % tp == 0,
                     f"--expert-model-parallel-size {ep} with --tensor-model-parallel-size {tp}: use EP 1 (every rank "
                     f"holds every expert) or a multiple of TP (each EP group spans whole TP groups)")

    @property
    def kind(self) -> str:
        """'dense', 'moe' (standard MoE) or 'samoe'."""
        if self.samoe.enabled:
            return "samoe"
        return "moe" if self.moe.enabled else "dense"

    def moe_layer_indices(self) -> list[int]:
        """0-based indices of the MoE layers (every --moe-layer-freq-th layer, starting at 0)."""
        if not self.moe.enabled:
            return []
        return [i for i in range(self.model.num_layers) if i % self.moe.moe_layer_freq == 0]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate_layout(cfg: RunConfig, world_size: int) -> int:
    """Check the parallel layout against the world size; returns the data-parallel size.

    Runs before any process group exists, from the launcher's WORLD_SIZE.
    """
    ep, tp = cfg.parallel.expert_model_parallel_size, cfg.parallel.tensor_model_parallel_size
    _require(world_size % tp == 0,
             f"--tensor-model-parallel-size {tp} does not divide the world size {world_size} (processes launched); "
             f"use a divisor of {world_size}")
    _require(world_size % ep == 0,
             f"--expert-model-parallel-size {ep} does not divide the world size {world_size} "
             f"(processes launched); use a divisor of {world_size}")
    if cfg.moe.enabled:
        _require(cfg.moe.num_experts % ep == 0,
                 f"--num-experts {cfg.moe.num_experts} is not divisible by --expert-model-parallel-size {ep}")
    if cfg.samoe.enabled and cfg.samoe.samoe_pool_sharding == "sharded":
        edp = world_size // ep
        h, f = cfg.model.hidden_size, cfg.moe.moe_ffn_hidden_size or cfg.model.ffn_hidden_size
        _require((h * f) % edp == 0,
                 f"--samoe-pool-sharding sharded splits each pool expert's {h} x {f} = {h * f} weights over the "
                 f"expert-data-parallel group of {edp} ranks (world {world_size} / EP {ep}), which does not "
                 f"divide them: choose --hidden-size and --moe-ffn-hidden-size whose product divides by {edp}, "
                 f"or use --samoe-pool-sharding replicated")
    dp = world_size // tp  # the TP ranks of one data-parallel replica see the same micro-batch (PP = 1)
    tr = cfg.training
    if tr.global_batch_size is None:
        tr.global_batch_size = tr.micro_batch_size * dp
    per_step = tr.micro_batch_size * dp
    _require(tr.global_batch_size % per_step == 0,
             f"--global-batch-size {tr.global_batch_size} is not divisible by --micro-batch-size "
             f"{tr.micro_batch_size} x data-parallel size {dp} = {per_step}")
    return dp


def gradient_accumulation_steps(cfg: RunConfig, dp: int) -> int:
    tr = cfg.training
    return tr.global_batch_size // (tr.micro_batch_size * dp)
