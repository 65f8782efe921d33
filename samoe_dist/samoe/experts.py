"""SaMoEExperts: the ``experts`` submodule of megatron-core's MoELayer, built from the shared pool.

megatron's MoELayer (router, token dispatchers, aux losses) is used unchanged; only its experts
are replaced (see :mod:`samoe_dist.samoe.spec`). The forward contract is megatron's
SequentialMLP's: tokens arrive grouped by local expert, ``tokens_per_expert[e]`` rows each, with
the routing prob of each row, and the result is ``(output, None)``.

This layer owns its combination logits ``C_NP`` (all N rows on every rank, a dense replicated
parameter: rows of experts another rank owns simply get zero gradient here, DESIGN.md §4). The
pool is reached through a :class:`~samoe_dist.samoe.pool.PoolRef` and is not a submodule.
Local experts are the global experts ``ep_rank*n_local .. ep_rank*n_local + n_local - 1`` of the
EP group handed in, as megatron's BaseMoELayer numbers them.
"""

from __future__ import annotations


import torch

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from samoe_dist.config import SaMoEConfig
from samoe_dist.samoe.combination import (combination_weights, init_combination_logits, peak_mass,
                                          peaked_pool_index, row_entropy)
from samoe_dist.samoe.expert_ffn import PoolAccess, materialize, materialized_expert_ffn, start_materialize_many
from samoe_dist.samoe.pool import ExpertPool, PoolRef


class SaMoEExperts(MegatronModule):
    """The N experts of one MoE layer as ``A = softmax(C / tau)`` (top-m optional; or ``A = C``)
    times the pool; with shared routing (``--samoe-route-to-pool``) the N = P pool experts as they are."""

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        submodules=None,
        pg_collection=None,
        *,
        pool_ref: PoolRef,
        moe_layer_index: int,
        samoe: SaMoEConfig,
    ):
        super().__init__(config=config)
        if pg_collection is None or getattr(pg_collection, "ep", None) is None:
            raise ValueError("SaMoEExperts needs the pg_collection (with its EP group) MoELayer passes in")
        _check_supported(config, pg_collection)
        if samoe.samoe_pool_size is None:
            raise ValueError("SaMoEExperts needs --samoe-pool-size (SaMoEConfig.samoe_pool_size)")
        self.pool_ref = pool_ref
        self.moe_layer_index = moe_layer_index
        self.samoe = samoe
        self.num_experts = config.num_moe_experts
        self.num_local_experts = num_local_experts
        self.pool_size = samoe.samoe_pool_size
        ep_rank = pg_collection.ep.rank()
        if num_local_experts * pg_collection.ep.size() != self.num_experts:
            raise ValueError(
                f"{num_local_experts} local experts x EP size {pg_collection.ep.size()} != "
                f"--num-experts {self.num_experts}"
            )
        self.local_expert_offset = ep_rank * num_local_experts
        if pool_ref.pool is not None:
            self._check_pool(pool_ref.pool)

        self.route_to_pool = samoe.samoe_route_to_pool
        if self.route_to_pool:
            # Shared routing: layer expert e IS pool expert e (N = P); nothing to learn or draw.
            if self.num_experts != self.pool_size:
                raise ValueError(f"--samoe-route-to-pool needs --num-experts ({self.num_experts}) equal to "
                                 f"--samoe-pool-size ({self.pool_size})")
            self.combination_logits = None
            return
        # C_NP, drawn from its own generator seeded off torch's RNG: a seeded model is reproducible.
        linear = samoe.samoe_combination == "linear"
        seed = int(torch.randint(0, 2**62, (1,)).item())
        logits_NP = init_combination_logits(
            self.num_experts,
            self.pool_size,
            moe_layer_index,
            init=samoe.samoe_init,
            peak=1.0 if linear else samoe.init_peak_logit(),
            noise=samoe.samoe_init_noise,
            generator=torch.Generator().manual_seed(seed),
            dtype=config.params_dtype,
        )
        if linear:  # one-hot rows: no offset on top of the noise elsewhere
            logits_NP = logits_NP.float()
            logits_NP[torch.arange(self.num_experts), peaked_pool_index(self.num_experts, self.pool_size,
                                                                        moe_layer_index)] = 1.0
            logits_NP = logits_NP.to(config.params_dtype)
        device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        self.combination_logits = torch.nn.Parameter(logits_NP.to(device))

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def pool(self) -> ExpertPool:
        pool = self.pool_ref.pool
        if pool is None:
            raise RuntimeError("SaMoEExperts: the PoolRef holds no pool (attach the pool before forward)")
        return pool

    def _check_pool(self, pool: ExpertPool) -> None:
        cfg = self.config
        expected = (self.pool_size, cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.gated_linear_unit)
        got = (pool.pool_size, pool.hidden_size, pool.ffn_hidden_size, pool.gated)
        if expected != got:
            raise ValueError(
                "SaMoE pool shape (pool_size, hidden_size, moe_ffn_hidden_size, gated) is "
                f"{got}, the layer expects {expected}"
            )

    def combination_weights(self) -> torch.Tensor:
        """A_NP for all N layer experts (differentiable in the combination logits; the identity,
        a constant, under shared routing).

        The softmax runs in fp32 when the logits are bf16/fp16 (as megatron's router does).
        """
        if self.route_to_pool:
            return torch.eye(self.num_experts, device=self.pool.w1.device)
        logits_NP = self.combination_logits
        if logits_NP.dtype in (torch.float16, torch.bfloat16):
            logits_NP = logits_NP.float()
        s = self.samoe
        return combination_weights(logits_NP, s.samoe_temperature, s.samoe_top_m, s.samoe_combination)

    @torch.no_grad()
    def combination_entropy(self) -> torch.Tensor:
        """Mean row entropy of A (0: hard one-to-one sharing, log P: uniform mix), for logging."""
        return row_entropy(self.combination_weights())

    @torch.no_grad()
    def combination_peak_mass(self) -> torch.Tensor:
        """Mean share of each row of A on the pool expert it started peaked on (1: not moved)."""
        peak_N = peaked_pool_index(self.num_experts, self.pool_size, self.moe_layer_index)
        return peak_mass(self.combination_weights(), peak_N)

    @torch.no_grad()
    def materialized_experts(self) -> tuple:
        """(W1_NHF, W2_NFH[, W3_NHF]) of all N layer experts, detached (tests and export; a
        collective over the shard group when the pool is sharded)."""
        full = [w for w in self.pool.full_tensors() if w is not None]
        if self.route_to_pool:
            return tuple(w.clone() for w in full)
        A_NP = self.combination_weights()
        return tuple(materialize(A_NP.to(w.dtype), w) for w in full)

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert,
        permuted_probs: torch.Tensor,
    ):
        """Run the local experts on tokens grouped by expert; returns ``(output_TH, None)``."""
        x_TH, probs_T = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:  # as SequentialMLP: scale inputs, not outputs
            x_TH = (probs_T.unsqueeze(-1) * x_TH).to(x_TH.dtype)
            probs_T = torch.ones_like(probs_T)
        counts = tokens_per_expert.tolist() if hasattr(tokens_per_expert, "tolist") else list(tokens_per_expert)
        pool = self.pool
        (w1, w2, w3), sink = pool.live_tensors()
        if x_TH.dtype != w1.dtype:
            raise TypeError(
                f"SaMoE experts got {x_TH.dtype} tokens but the pool is {w1.dtype}: convert the "
                "pool with the model (register it with attach_pool before any .to()/bf16 wrapping)"
            )
        # --samoe-prefetch-gather: this layer's gather if the previous layer started it; starts the next's
        prefetched = pool.layer_prefetch(id(self), self._start_gather)
        access = self._access(pool, sink=sink, prefetched=prefetched,
                              cache=None if self.route_to_pool else pool.cached_weights(id(self)))
        y_TH = materialized_expert_ffn(x_TH, probs_T, counts, self._own_combination(w1.dtype), w1, w2, w3,
                                       self.config.activation_func, access)
        return y_TH, None

    def _access(self, pool: ExpertPool, **more) -> PoolAccess:
        """How this layer's local experts come from the pool (``more``: sink, cache, prefetched)."""
        lo, hi = self.local_expert_offset, self.local_expert_offset + self.num_local_experts
        return PoolAccess(rows=(lo, hi) if self.route_to_pool else None, shard=pool.shard,
                          shapes=pool.expert_shapes(), **more)

    def _own_combination(self, dtype: torch.dtype):
        """A_own [n, P], the combination rows of the local experts; None under shared routing (the
        owned pool experts themselves, A = I: no materialisation)."""
        if self.route_to_pool:
            return None
        lo = self.local_expert_offset
        return self.combination_weights()[lo:lo + self.num_local_experts].to(dtype)

    @torch.no_grad()
    def _start_gather(self):
        """Start the sharded all-gather of this layer's local experts for its next forward
        (:meth:`ExpertPool.layer_prefetch`): the same weights its forward would gather."""
        pool = self.pool
        tensors = pool.tensors()
        indices = [i for i, w in enumerate(tensors) if w is not None]
        return start_materialize_many(self._own_combination(tensors[0].dtype), [tensors[i] for i in indices],
                                      self._access(pool), indices)

    def backward_dw(self):
        """No delayed weight-gradient pass: gradients are computed in backward (MoELayer API)."""


def _check_supported(config: TransformerConfig, pg_collection) -> None:
    """Fail early, naming the flag, on megatron options this expert implementation does not do."""
    problems = []
    if config.add_bias_linear:
        problems.append("add_bias_linear=True (SaMoE experts have no biases; set --disable-bias-linear)")
    if getattr(config, "glu_linear_offset", 0.0) not in (0, 0.0):
        problems.append(f"glu_linear_offset={config.glu_linear_offset}")
    if getattr(config, "activation_func_clamp_value", None) is not None:
        problems.append(f"activation_func_clamp_value={config.activation_func_clamp_value}")
    if getattr(config, "moe_latent_size", None):
        problems.append(f"moe_latent_size={config.moe_latent_size}")
    if config.fp8 or getattr(config, "fp4", None):
        problems.append("fp8/fp4 experts")
    if getattr(config, "use_te_activation_func", False):
        problems.append("use_te_activation_func=True")
    expt_tp = getattr(pg_collection, "expt_tp", None)
    if expt_tp is not None and expt_tp.size() != 1:
        problems.append(f"expert tensor parallel size {expt_tp.size()} (only 1 is supported)")
    if problems:
        raise NotImplementedError("SaMoEExperts does not support: " + "; ".join(problems))
