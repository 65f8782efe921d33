"""The training loop: DeepSpeed engine around megatron-core's GPTModel.

One optimizer step consumes ``--global-batch-size`` samples: each data-parallel rank runs
``gradient_accumulation_steps`` micro-batches of ``--micro-batch-size``, and DeepSpeed's engine
scales, accumulates, reduces, clips and steps. Reported losses are means over the whole global
batch (all micro-batches of all ranks), so a 1-process and an N-process run of the same global
batch report the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from samoe_dist import checkpoint, collective_check, cpu_compat
from samoe_dist.config import RunConfig, gradient_accumulation_steps, validate_layout
from samoe_dist.data_adapter import TrainingData, build_training_data
from samoe_dist.ds_config import build_ds_config, load_ds_config
from samoe_dist.metrics import MetricsWriter, iteration_line, setup_logging
from samoe_dist.model import build_model, is_expert_parallel, is_pool_shard
from samoe_dist.optim import make_scheduler, param_groups
from samoe_dist.parallel import (ParallelGroups, check_groups_agree, deepspeed_mpu, init_distributed,
                                launcher_world_size)
from samoe_dist.params import count_parameters, format_counts
from samoe_dist.tensor_parallel import is_tp_sharded

logger = logging.getLogger("samoe")


def _mean_over_world(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Average each value over all ranks (each rank contributes the mean of its micro-batches).

    ``values`` are 0-d tensors kept on the device through the step (no host sync per micro-batch);
    they are stacked, all-reduced on ``device`` (the engine's: NCCL rejects a CPU tensor), and read
    back with one host sync per step."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([values[k].to(device=device, dtype=torch.float64) for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _key(name: str) -> str:
    return name.replace(" ", "_")


class Trainer:
    """Owns the engine, the data and the counters of one run."""

    def __init__(self, cfg: RunConfig, ds_config_path: Optional[str]):
        self.cfg = cfg
        world_size = launcher_world_size()  # torchrun/deepspeed, or mpirun before MPI discovery
        self.dp = validate_layout(cfg, world_size)  # fails before any process group exists
        user_ds = load_ds_config(ds_config_path)
        checkpoint.check_save_dir(cfg)  # before any process group: another run's checkpoints stay untouched
        self.groups: ParallelGroups = init_distributed(cfg.parallel.expert_model_parallel_size,
                                                       tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size)
        setup_logging(self.groups.rank)
        cpu_compat.seed_model_parallel(cfg.training.seed)
        self.data: TrainingData = build_training_data(cfg, self.groups)
        self.gas = gradient_accumulation_steps(cfg, self.dp)
        self.ds_config = build_ds_config(cfg, user_ds, self.dp)
        slow_bf16 = cpu_compat.bf16_cpu_warning(cfg.training.bf16)
        if slow_bf16 and self.groups.rank == 0:
            logger.warning(slow_bf16)
        self.model = build_model(cfg, self.groups)
        self.param_counts = count_parameters(self.model, cfg)
        logger.info("model: %s | %s", cfg.kind, format_counts(self.param_counts))
        import deepspeed

        tr = cfg.training
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model,
            model_parameters=param_groups(self.model, tr.weight_decay, tr.lr, cfg.samoe.samoe_combination_lr_mult),
            config=self.ds_config,
            lr_scheduler=lambda opt: make_scheduler(opt, tr),
            mpu=deepspeed_mpu(self.groups),  # TP > 1: megatron's tensor- and data-parallel groups
        )
        check_groups_agree(self.groups)  # again, now with DeepSpeed's data-parallel group
        # No ZeRO: this step's global gradient norm, set by train_step after the last micro-batch's
        # backward, before the engine.step() that clips by it.
        self._step_norm: Optional[torch.Tensor] = None
        self._own_norm = self._own_norm_applies()
        if self._own_norm:
            # DeepSpeed's own norm here is not the global one (docs/DESIGN.md section 4, "Gradient
            # norm and clipping"): clip (and report) by the global norm instead.
            if self.engine.bfloat16_enabled():
                self._clip_by_own_norm_in(self.engine.optimizer)
            elif tr.clip_grad > 0:
                self.engine.clip_fp32_gradients = self._clip_fp32_gradients
        collective_check.install(self.engine.device)  # SAMOE_CHECK_COLLECTIVE_DEVICES=1 (the tests set it)
        self.iteration = 0
        self.consumed_samples = 0
        self.last_grad_norm = float("nan")
        self._grad_flow: dict = {}  # per-expert gradient norms of the step being logged
        self._start_time = time.time()
        self._sigterm = SigtermFlag()
        self.metrics = MetricsWriter(self.groups.is_main, tr.metrics_file, tr.tensorboard_dir)
        if tr.save:
            checkpoint.check_shared_filesystem(tr.save, "--save")
        if tr.load:
            checkpoint.check_shared_filesystem(tr.load, "--load", create=False)
            if tr.load == tr.save and not os.path.isfile(os.path.join(tr.load, "latest")):
                # --save DIR --load DIR is the resume-or-start pattern of preemptible jobs
                logger.info("no checkpoint in %s yet: starting from scratch", tr.load)
            else:
                self.load_checkpoint(tr.load)

    # -- steps -------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.engine.device) for k, v in batch.items()}

    def train_step(self) -> dict[str, float]:
        """One optimizer step over one global batch; returns world-averaged losses."""
        tr = self.cfg.training
        sums: dict[str, torch.Tensor] = {}
        # --samoe-materialize-once-per-step: the layers' materialised experts are kept from their first
        # use to the last micro-batch's backward, and dropped before the optimizer updates the weights.
        with contextlib.ExitStack() as step_cache:
            pool = getattr(self.model.gpt, "samoe_pool", None)
            if pool is not None and self.cfg.samoe.samoe_materialize_once_per_step:
                step_cache.enter_context(pool.step_cache())
            for micro_step in range(self.gas):
                batch = self._to_device(self.data.micro_batch(
                    "train", self.consumed_samples, tr.micro_batch_size, self.groups.dp_rank, self.dp, micro_step))
                loss, parts = self.engine(batch["tokens"], batch["labels"], batch["loss_mask"])
                self.engine.backward(loss)
                if micro_step == self.gas - 1:
                    step_cache.close()  # the cached experts go before engine.step() changes the weights
                    self._step_norm = self._reduced_grad_norm()
                    if self._is_log_iteration(self.iteration + 1):
                        self._grad_flow = self._expert_grad_norms()
                self.engine.step()
                self._add_parts(sums, parts)
        self.consumed_samples += tr.global_batch_size
        self.iteration += 1
        engine_norm = self.engine.get_global_grad_norm()
        if engine_norm is None or not math.isfinite(float(engine_norm)):
            engine_norm = self._step_norm
        self.last_grad_norm = float(engine_norm) if engine_norm is not None else float("nan")
        return _mean_over_world(sums, self.engine.device)

    def _add_parts(self, sums: dict, parts: dict) -> None:
        """Add one micro-batch's loss parts (tensors: no host sync per micro-batch) into ``sums``."""
        for name, value in parts.items():
            part = value.detach().to(torch.float64) / self.gas
            if name != "lm loss":  # an aux loss is this TP rank's share: MoE layers split tokens over TP
                part = part * self.groups.tp_size
            sums[_key(name)] = sums[_key(name)] + part if _key(name) in sums else part

    def _own_norm_applies(self) -> bool:
        """No ZeRO: DeepSpeed keeps the reduced gradients in ``.grad``, and its norm is not the
        global one. In fp32 the engine reports none and clips by ``clip_grad_norm_``, which averages
        each rank's local norm over the data-parallel group (wrong once ranks hold different experts
        or pool slices). In bf16 its unfused optimizer (any optimizer but FusedAdam, so every one on
        the CPU) reads the tensor-parallel marks on gradient tensors, which carry none, and leaves
        expert gradients out: under TP it counts only TP rank 0's shards, and no expert at all."""
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        if self.engine.zero_optimization_stage() != 0 or self.engine.fp16_enabled():
            return False
        return not self.engine.bfloat16_enabled() or isinstance(self.engine.optimizer, FP16_UnfusedOptimizer)

    def _clip_by_own_norm_in(self, optimizer) -> None:
        """Make DeepSpeed's unfused bf16 optimizer clip by, and report, the global norm computed
        before its step (bf16 has no loss scale, so the norm is that of the gradients it clips)."""
        own_clip = optimizer.unscale_and_clip_grads

        def unscale_and_clip_grads(total_norm, apply_scale=True):
            norm = float(self._step_norm)  # that optimizer works on host floats (its own norm is .item()'d)
            optimizer._global_grad_norm = norm
            return own_clip(norm, apply_scale)

        optimizer.unscale_and_clip_grads = unscale_and_clip_grads

    @torch.no_grad()
    def _clip_fp32_gradients(self) -> None:
        """The engine's gradient clipping (no ZeRO, fp32), by the global norm: DeepSpeed's
        coefficient ``min(1, clip / (norm + 1e-6))``, applied on the device (no host sync)."""
        coef = (self.cfg.training.clip_grad / (self._step_norm + 1e-6)).clamp(max=1.0)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))

    def _reduced_grad_norm(self) -> Optional[torch.Tensor]:
        """Global gradient norm (a float64 device tensor) from the reduced ``.grad`` of the
        parameters where :meth:`_own_norm_applies` (no ZeRO); None otherwise.

        Dense parameters are replicas (their norm is counted once); expert-parallel parameters
        differ between the ranks of an EP group, so their squares are summed over it, and a sharded
        pool's slices differ over the expert-data-parallel group, so theirs are summed over that.
        """
        if not self._own_norm:
            return None
        device = self.engine.device
        dense = torch.zeros((), dtype=torch.float64, device=device)
        tp_sharded = torch.zeros((), dtype=torch.float64, device=device)  # differs over the TP group
        expert = torch.zeros((), dtype=torch.float64, device=device)  # differs over the EP group
        pool = torch.zeros((), dtype=torch.float64, device=device)  # sharded pool: differs over EDP
        for p in self.model.parameters():
            if p.grad is None:
                continue
            sq = p.grad.detach().double().pow(2).sum()
            if is_pool_shard(p):
                pool += sq
            elif is_expert_parallel(p):
                expert += sq
            elif is_tp_sharded(p) and self.groups.tp_size > 1:
                tp_sharded += sq
            else:
                dense += sq
        if self.groups.tp_size > 1:
            dist.all_reduce(tp_sharded, group=self.groups.tp_group)
        if self.groups.ep_size > 1:
            dist.all_reduce(expert, group=self.groups.ep_group)
        if self.groups.edp_size > 1:
            dist.all_reduce(pool, group=self.groups.expert_dp_group)
        return (dense + tp_sharded + expert + pool).sqrt()

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> float:
        """Mean lm loss over --eval-iters global batches (Megatron's meaning of eval-iters), so the
        samples evaluated do not depend on the number of processes."""
        tr = self.cfg.training
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        for i in range(tr.eval_iters):
            for micro_step in range(self.gas):
                batch = self._to_device(self.data.micro_batch(
                    split, i * tr.global_batch_size, tr.micro_batch_size, self.groups.dp_rank, self.dp, micro_step))
                _, parts = self.engine(batch["tokens"], batch["labels"], batch["loss_mask"])
                total += parts["lm loss"].detach().to(torch.float64)
        self.engine.train()
        return _mean_over_world({"loss": total / (tr.eval_iters * self.gas)}, self.engine.device)["loss"]

    # -- loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, tr = self.cfg, self.cfg.training
        self.metrics.write({"type": "config", "iteration": self.iteration, "kind": cfg.kind,
                            "config": cfg.to_dict(), "params": self.param_counts,
                            "world_size": self.groups.world_size})
        tokens_per_step = tr.global_batch_size * cfg.model.seq_length
        first_loss = None
        window: list[dict] = []
        t_last = time.time()
        while self.iteration < tr.train_iters:
            lr = self.engine.get_lr()[0]
            t0 = time.time()
            losses = self.train_step()
            elapsed = time.time() - t0
            grad_norm = self.last_grad_norm
            rec = {"type": "train", "iteration": self.iteration, "consumed_samples": self.consumed_samples,
                   "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "ms_per_iter": elapsed * 1000.0, "tokens_per_sec": tokens_per_step / max(elapsed, 1e-9),
                   **losses}
            if first_loss is None:
                first_loss = rec["lm_loss"]
            if not math.isfinite(rec["lm_loss"]):
                raise FloatingPointError(f"lm loss is {rec['lm_loss']} at iteration {self.iteration}: "
                                         f"lower --lr or check the data; the last checkpoint is untouched")
            if self._is_log_iteration(self.iteration):
                rec.update(self._expert_load())
                rec.update(self._grad_flow)
                self._grad_flow = {}
                entropies = self.model.combination_entropies()
                if entropies:
                    rec["combination_entropy_per_layer"] = entropies
                    rec["combination_entropy"] = sum(entropies) / len(entropies)
                    rec["combination_peak_mass_per_layer"] = self.model.combination_peak_masses()
                    rec["combination_peak_mass"] = sum(rec["combination_peak_mass_per_layer"]) / len(entropies)
            self.metrics.write(rec)
            window.append(rec)
            if self._is_log_iteration(self.iteration):
                self._log_window(window, time.time() - t_last, tokens_per_step)
                window, t_last = [], time.time()
            if tr.eval_interval and self.iteration % tr.eval_interval == 0 and self.iteration < tr.train_iters:
                self._log_validation(self.evaluate())
            saved = bool(tr.save and tr.save_interval and self.iteration % tr.save_interval == 0)
            if saved:
                self.save_checkpoint(tr.save)
            reason = self._stop_reason()
            if reason and self.iteration < tr.train_iters:
                logger.info("stopping at iteration %d: %s", self.iteration, reason)
                if tr.save and not saved:
                    self.save_checkpoint(tr.save)
                self.metrics.write({"type": "exit", "iteration": self.iteration, "reason": reason})
                self.metrics.close()
                return {"type": "exit", "iteration": self.iteration, "reason": reason}
        final_valid = self.evaluate()
        self._log_validation(final_valid, final=True)
        if tr.save and (not tr.save_interval or self.iteration % tr.save_interval != 0):
            self.save_checkpoint(tr.save)
        summary = {"type": "final", "iteration": self.iteration, "consumed_samples": self.consumed_samples,
                   "first_train_loss": first_loss, "final_valid_loss": final_valid,
                   "final_valid_ppl": math.exp(min(final_valid, 50.0)), "params": self.param_counts}
        self.metrics.write(summary)
        self.metrics.close()
        return summary

    def _log_window(self, window: list[dict], seconds: float, tokens_per_step: int) -> None:
        rec = window[-1]
        logger.info(iteration_line(_window_mean(window, seconds, tokens_per_step), self.cfg.training.train_iters))
        for j, (frac, per_rank) in enumerate(zip(rec.get("expert_load", []),
                                                 zip(*rec.get("expert_tokens_per_rank", [])))):
            ranks = " ".join(f"r{r}={[int(c) for c in counts]}" for r, counts in enumerate(per_rank))
            logger.info("   expert load, MoE layer %d: fraction %s | tokens per rank %s",
                        j, "[" + " ".join(f"{x:.3f}" for x in frac) + "]", ranks)

    def _stop_reason(self) -> Optional[str]:
        """Why to stop now, agreed by all ranks: SIGTERM on any rank, --exit-duration-in-mins,
        --exit-interval (None: go on)."""
        tr = self.cfg.training
        flags = torch.tensor([float(self._sigterm.received),
                              float(bool(tr.exit_duration_in_mins)
                                    and time.time() - self._start_time >= 60.0 * tr.exit_duration_in_mins)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = flags.to(self.engine.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return "SIGTERM received"
        if flags[1] > 0:
            return f"--exit-duration-in-mins {tr.exit_duration_in_mins} reached"
        if tr.exit_interval and self.iteration % tr.exit_interval == 0:
            return f"--exit-interval {tr.exit_interval}"
        return None

    def _is_log_iteration(self, iteration: int) -> bool:
        tr = self.cfg.training
        return iteration % tr.log_interval == 0 or iteration == tr.train_iters

    def _expert_offset(self) -> int:
        return self.groups.ep_rank * (self.cfg.moe.num_experts // self.groups.ep_size)

    def _expert_grad_norms(self) -> dict:
        """Per-expert gradient norms of the step being taken (samoe_dist.gradient_flow), read after
        the last backward and before the optimizer step. A collective: all ranks call it."""
        from samoe_dist import gradient_flow

        out = {}
        gpt = self.model.gpt
        if getattr(gpt, "samoe_pool", None) is not None:
            norms = gradient_flow.pool_grad_norms(gpt.samoe_pool)
            if norms is not None:
                out["pool_grad_norm"] = norms.cpu().tolist()
        elif self.model.moe_layers:
            device = self.engine.device
            sq = gradient_flow.expert_grad_sq_norms(self.model.moe_layers, self.cfg.moe.num_experts,
                                                    self._expert_offset(), device)
            if self.groups.ep_size > 1:
                dist.all_reduce(sq, group=self.groups.ep_group)  # each EP rank fills its own experts
            out["expert_grad_norm"] = sq.sqrt().cpu().tolist()
        return out

    def _expert_load(self) -> dict:
        """Tokens routed to each expert since the last log, per rank and as global fractions; tokens
        each layer expert (and pool expert) received (samoe_dist.gradient_flow).

        A collective (all ranks call it at the same iterations); empty for a dense model.
        """
        local, received_local = self.model.expert_loads()  # [L_moe, N], [L_moe, n_local] float64
        if local.numel() == 0:
            return {}
        received = torch.zeros_like(local)  # [L_moe, N]: this rank's experts at their global index
        lo = self._expert_offset()
        received[:, lo:lo + received_local.shape[1]] = received_local
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = self.engine.device
            gathered = [torch.zeros_like(local, device=device) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, local.to(device))
            per_rank = torch.stack(gathered).cpu()  # [W, L_moe, N]
            received = received.to(device)
            dist.all_reduce(received)
            received = received.cpu()
        else:
            per_rank = local.unsqueeze(0)
        total = per_rank.sum(0)
        frac = total / total.sum(-1, keepdim=True).clamp(min=1.0)
        out = {"expert_load": frac.tolist(), "expert_tokens_per_rank": per_rank.tolist(),
               "expert_tokens_received": received.tolist()}
        if self.model.samoe_experts:
            from samoe_dist.gradient_flow import pool_tokens

            out["pool_tokens"] = pool_tokens(self.model.samoe_experts, received).cpu().tolist()
        return out

    def _log_validation(self, loss: float, final: bool = False) -> None:
        ppl = math.exp(min(loss, 50.0))
        what = "validation loss at the end" if final else "validation loss"
        logger.info("-" * 100)
        logger.info(" %s (iteration %d) | lm loss value: %.6E | lm loss PPL: %.6E", what, self.iteration, loss, ppl)
        logger.info("-" * 100)
        self.metrics.write({"type": "valid", "iteration": self.iteration, "lm_loss": loss, "ppl": ppl})

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str) -> None:
        tag = checkpoint.save(self, save_dir, keep=self.cfg.training.keep_last_checkpoints)
        logger.info("saved checkpoint %s/%s", save_dir, tag)

    def load_checkpoint(self, load_dir: str) -> None:
        checkpoint.load(self, load_dir)


class SigtermFlag:
    """Records SIGTERM (what SLURM sends before preemption) so the loop can save and exit cleanly."""

    def __init__(self) -> None:
        self.received = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (embedded use): no handler
            pass

    def _handle(self, signum, frame) -> None:
        self.received = True
        logger.warning("SIGTERM received: saving a checkpoint after this step, then exiting")


def _window_mean(window: list[dict], seconds: float, tokens_per_step: int) -> dict:
    """Mean of the records since the last log line, timed over the whole window."""
    out = dict(window[-1])
    for key in window[-1]:
        if key.endswith("loss") or key == "grad_norm":
            out[key] = sum(r[key] for r in window) / len(window)
    out["ms_per_iter"] = 1000.0 * seconds / len(window)
    out["tokens_per_sec"] = tokens_per_step * len(window) / max(seconds, 1e-9)
    return out


def pretrain(cfg: RunConfig, ds_config_path: Optional[str]) -> dict:
    """Run a whole pretraining job; returns the final summary record."""
    return Trainer(cfg, ds_config_path).train()

