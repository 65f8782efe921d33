"""The analytic communication model (bench/scaling_model.py) against the bytes the real engine moves.

bench/comm_volume.py counts every torch.distributed collective of a 4-process, EP=2 training step
(two micro-batches) of the standard MoE, of SaMoE with a replicated pool and of SaMoE with a
sharded pool, per micro-batch or materialised once per step. The model is derived on paper (ring
collectives, DeepSpeed's ZeRO-1 gradient all-reduce plus parameter all-gather once per step; the
sharded pool's all-gathers and reduce-scatters once per layer and micro-batch, or its all-gathers
once per layer and step); the measured bytes of the expert weights must
equal it up to a few scalars, and the all-to-all up to the routing's imbalance (the model assumes
tokens spread evenly over the ranks). The expected values come from ``scaling_model.per_gpu``
evaluated here at the run's shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from scaling_model import Shape, per_gpu  # noqa: E402

GB = 1e9


def _model_at(config: dict) -> dict:
    shape = Shape("small", layers=config["num_layers"], hidden=config["hidden_size"], ffn=config["ffn_hidden_size"],
                  experts=config["num_experts"], moe_every=config["moe_layer_freq"], topk=config["topk"],
                  seq=config["seq_length"], pool=config["pool"], ep=config["ep"],
                  global_batch=config["micro_batch_size"] * config["world"] * config["grad_accum"],
                  micro_batch=config["micro_batch_size"])
    return per_gpu(shape, config["world"], act_bytes=4, weight_bytes=4)  # fp32 run


def _close(measured: float, expected: float, scalars: int = 16) -> bool:
    """Equal up to a few loss / norm scalars (4 bytes each) riding on the same groups."""
    return abs(measured - expected) <= 4 * scalars


def test_measured_communication_matches_the_analytic_model(tmp_path):
    out = tmp_path / "comm.json"
    cmd = [sys.executable, str(REPO / "bench" / "comm_volume.py"), "--world", "4", "--ep", "2", "--steps", "1",
           "--grad-accum", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--seq-length", "32",
           "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    cfg = res["config"]
    model = _model_at(cfg)
    assert model["grad_accum"] == 2
    c = res["comparison"]

    # Standard MoE and replicated SaMoE: synced once per step (ZeRO-1), whatever the micro-batches.
    for key, model_key in (("expert_grad_sync_bytes_per_gpu_moe", "expert_sync_GB_per_gpu_moe"),
                           ("expert_grad_sync_bytes_per_gpu_samoe", "expert_sync_GB_per_gpu_samoe")):
        assert c[key]["measured"] > 0
        assert _close(c[key]["measured"], model[model_key] * GB), (key, c[key], model[model_key])

    # Sharded SaMoE, group by group: per micro-batch on the EDP group, per step on the EP group and the world.
    sharded = {
        "samoe_sharded_weight_all_gather_bytes_per_gpu (EDP group)": "expert_gather_GB_per_gpu_samoe_sharded",
        "samoe_sharded_dW_reduce_scatter_bytes_per_gpu (EDP group)": "samoe_sharded_reduce_scatter_GB_per_gpu",
        "samoe_sharded_pool_sync_bytes_per_gpu (EP group)": "samoe_sharded_pool_ep_sync_GB_per_gpu",
        "samoe_sharded_combination_sync_bytes_per_gpu (world share)":
            "samoe_sharded_combination_world_sync_GB_per_gpu",
        "expert_grad_sync_bytes_per_gpu_samoe_sharded": "expert_sync_GB_per_gpu_samoe_sharded",
    }
    for key, model_key in sharded.items():
        assert c[key]["measured"] > 0, (key, c[key])
        assert _close(c[key]["measured"], model[model_key] * GB), (key, c[key], model[model_key])
    # The pool's own collectives carry no scalars: exact.
    for key in list(sharded)[:2]:
        assert c[key]["measured"] == pytest.approx(c[key]["model"], rel=1e-12), (key, c[key])

    # The EDP group carries only the sharded pool's collectives: per MoE layer call (layer and
    # micro-batch), one all-gather of all its pool tensors (w1, w2) in forward, one in backward and
    # one reduce-scatter of their gradients (DESIGN.md section 6); the bytes are checked above.
    sh = res["samoe_sharded"]["per_step_rank0_by_op"]
    edp = {k: v for k, v in sh.items() if k.endswith("over expert-data-parallel group")}
    assert set(edp) == {"all-gather over expert-data-parallel group",
                        "reduce-scatter over expert-data-parallel group"}, sorted(edp)
    per_call = (cfg["num_layers"] // cfg["moe_layer_freq"]) * cfg["grad_accum"]
    assert edp["all-gather over expert-data-parallel group"]["calls"] == 2 * per_call
    assert edp["reduce-scatter over expert-data-parallel group"]["calls"] == per_call

    # Materialised once per step: one all-gather per MoE layer and STEP (not two per layer and
    # micro-batch), the reduce-scatter still per layer call; bytes exactly the model's.
    for key in ("samoe_sharded_once_weight_all_gather_bytes_per_gpu (EDP group)",
                "samoe_sharded_once_dW_reduce_scatter_bytes_per_gpu (EDP group)"):
        assert c[key]["measured"] > 0 and c[key]["measured"] == pytest.approx(c[key]["model"], rel=1e-12), (key, c[key])
    once = res["samoe_sharded_once"]["per_step_rank0_by_op"]
    assert once["all-gather over expert-data-parallel group"]["calls"] == cfg["num_layers"] // cfg["moe_layer_freq"]
    assert once["reduce-scatter over expert-data-parallel group"]["calls"] == per_call
    assert c["samoe_sharded_once_weight_all_gather_bytes_per_gpu (EDP group)"]["measured"] == pytest.approx(
        c["samoe_sharded_weight_all_gather_bytes_per_gpu (EDP group)"]["measured"] / (2 * cfg["grad_accum"]), rel=1e-12)

    a2a = c["all_to_all_bytes_per_gpu"]
    assert a2a["model"] == pytest.approx(model["all_to_all_GB_per_gpu"] * GB)
    for key in ("measured_moe", "measured_samoe", "measured_samoe_sharded", "measured_samoe_sharded_once"):
        assert abs(a2a[key] - a2a["model"]) <= 0.2 * a2a["model"], a2a

    # SaMoE syncs its pool once per step, not once per layer that uses it: the replicated pool's
    # world-group bytes are those of the replicated parameters, each counted once; the sharded
    # pool's slice moves, over the EP group, the same per-parameter bytes at n = EP.
    def per_param(n):  # fp32: ring all-reduce + all-gather over n ranks
        return 4 * (2 * (n - 1) / n + (n - 1) / n)

    for system in ("samoe", "samoe_sharded"):
        out_sys = res[system]
        world_bytes = out_sys["per_step_rank0"]["gradient / parameter sync over world (data parallel)"]["moved_bytes"]
        assert abs(world_bytes - per_param(4) * out_sys["params_rank0"]["replicated"]) < 1e-3 * world_bytes
    sh_params = res["samoe_sharded"]["params_rank0"]
    ep_bytes = res["samoe_sharded"]["per_step_rank0"]["gradient / parameter sync over expert-parallel group"]
    assert _close(ep_bytes["moved_bytes"], per_param(2) * sh_params["pool"])


def test_sharded_model_reduces_to_replicated_and_scales_with_micro_batches():
    """Pure-model identities of the sharded pool (no processes)."""
    shape = Shape("350M+128e", layers=24, hidden=1024, ffn=4096)
    # EDP = 1 (world = EP): nothing to shard; the sharded pool is the replicated one.
    one = per_gpu(shape, 8)
    assert one["expert_dp"] == 1
    for suffix in ("expert_sync_GB_per_gpu_samoe", "expert_memory_GB_per_gpu_samoe"):
        assert one[suffix + "_sharded"] == pytest.approx(one[suffix])
    assert one["expert_gather_GB_per_gpu_samoe_sharded"] == 0
    assert one["materialisation_flops_vs_step_flops_sharded"] == pytest.approx(one["materialisation_flops_vs_step_flops"])
    # Gradient accumulation: per-micro-batch terms scale with GA, the once-per-step syncs do not.
    ga1, ga4 = per_gpu(shape, 64), per_gpu(dataclasses.replace(shape, micro_batch=1), 64)
    assert (ga1["grad_accum"], ga4["grad_accum"]) == (1, 4)
    for key in ("samoe_sharded_reduce_scatter_GB_per_gpu", "expert_gather_GB_per_gpu_samoe_sharded",
                "materialisation_flops_vs_step_flops", "materialisation_flops_vs_step_flops_sharded"):
        assert ga4[key] == pytest.approx(4 * ga1[key])
    for key in ("expert_sync_GB_per_gpu_moe", "expert_sync_GB_per_gpu_samoe", "samoe_sharded_pool_ep_sync_GB_per_gpu",
                "samoe_sharded_combination_world_sync_GB_per_gpu", "all_to_all_GB_per_gpu",
                "expert_memory_GB_per_gpu_samoe_sharded"):
        assert ga4[key] == pytest.approx(ga1[key])
    # Materialised once per step: one gather per layer and step (half of GA = 1's two), the forward
    # GEMM once and dpool, dA per micro-batch: (1 + 2 GA) of the default's 4 GA GEMMs.
    for r in (ga1, ga4):
        assert r["expert_gather_GB_per_gpu_samoe_sharded_once"] == pytest.approx(
            ga1["expert_gather_GB_per_gpu_samoe_sharded"] / 2)
        for suffix in ("", "_sharded"):
            assert r["materialisation_flops_vs_step_flops" + suffix + "_once"] == pytest.approx(
                r["materialisation_flops_vs_step_flops" + suffix] * (1 + 2 * r["grad_accum"]) / (4 * r["grad_accum"]))
    # The break-even GA is where the sharded sync equals the standard MoE's.
    ga = ga1["sharded_sync_break_even_ga"]
    at = ga1["samoe_sharded_reduce_scatter_GB_per_gpu"] * ga + ga1["samoe_sharded_pool_ep_sync_GB_per_gpu"] \
        + ga1["samoe_sharded_combination_world_sync_GB_per_gpu"]
    assert at == pytest.approx(ga1["expert_sync_GB_per_gpu_moe"])
