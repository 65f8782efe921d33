"""megatron-core's all-to-all token dispatcher over our expert-parallel groups (real gloo ranks):
dispatch then combine returns the input, values and gradients, for uneven token counts and a rank
that receives no tokens; each rank receives exactly the tokens routed to the experts it owns."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_fn

HIDDEN = 8


def _routing(rank: int, world: int, num_experts: int, topk: int, allowed: list[int], seed: int):
    """Rank ``rank``'s tokens (uneven count per rank), each routed to ``topk`` of ``allowed``."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    num_tokens = 3 + 4 * rank  # uneven: 3, 7, 11, 15
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    for t in range(num_tokens):
        pick = torch.randperm(len(allowed), generator=g)[:topk]
        routing_map[t, torch.tensor(allowed)[pick]] = True
    probs = torch.rand(num_tokens, num_experts, generator=g) * routing_map
    x = torch.randn(num_tokens, 1, HIDDEN, generator=g)
    return routing_map, probs, x


def dispatch_roundtrip(groups, num_experts: int, topk: int, allowed: list[int], seed: int) -> dict:
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    from megatron.core.transformer.transformer_config import TransformerConfig

    from samoe_dist import cpu_compat

    ep = groups.ep_size
    cfg = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=1, num_moe_experts=num_experts,
                            moe_router_topk=topk, moe_router_pre_softmax=True, moe_token_dispatcher_type="alltoall",
                            expert_model_parallel_size=ep, add_bias_linear=False,
                            **cpu_compat.cpu_safe_config_overrides())
    n_local = num_experts // ep
    local = list(range(groups.ep_rank * n_local, (groups.ep_rank + 1) * n_local))
    dispatcher = MoEAlltoAllTokenDispatcher(n_local, local, config=cfg, pg_collection=groups.pg_collection)

    routing_map, probs, x = _routing(groups.rank, groups.world_size, num_experts, topk, allowed, seed)
    x.requires_grad_(True)
    hidden, p = dispatcher.dispatch_preprocess(x, routing_map, probs)
    hidden, p = dispatcher.token_dispatch(hidden, p)
    expert_in, tokens_per_expert, p = dispatcher.dispatch_postprocess(hidden, p)
    out = dispatcher.combine_preprocess(expert_in)  # identity experts
    out = dispatcher.token_combine(out)
    out = dispatcher.combine_postprocess(out)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(groups.rank))
    out.backward(grad_out)

    # Expected received tokens: rebuild every rank of this EP group's routing (same seeds).
    ep_ranks = torch.distributed.get_process_group_ranks(groups.ep_group)
    expected = torch.zeros(n_local, dtype=torch.long)
    for r in ep_ranks:
        rm, _, _ = _routing(r, groups.world_size, num_experts, topk, allowed, seed)
        expected += rm[:, local].sum(dim=0)
    k_per_token = routing_map.sum(dim=1, keepdim=True).unsqueeze(-1).to(x.dtype)  # [T,1,1]
    return {
        "out_err": (out - k_per_token * x.detach()).abs().max().item() if x.numel() else 0.0,
        "grad_err": (x.grad - k_per_token * grad_out).abs().max().item() if x.numel() else 0.0,
        "received": [int(c) for c in torch.as_tensor(tokens_per_expert)],
        "expected": expected.tolist(),
        "num_received": int(expert_in.shape[0]),
    }


@pytest.mark.parametrize("world, ep, topk", [(2, 2, 1), (2, 2, 2), (4, 4, 2), (4, 2, 2)])
def test_dispatch_then_combine_is_identity(tmp_path, world, ep, topk):
    num_experts = 2 * ep
    n_local = num_experts // ep
    # experts of the last EP rank are never chosen: that rank receives no tokens
    allowed = list(range(num_experts - n_local))
    results = run_fn(world, ep, dispatch_roundtrip, (num_experts, topk, allowed, 7), tmp_path)
    for rank, res in enumerate(results):
        assert res["out_err"] < 1e-6, (rank, res)
        assert res["grad_err"] < 1e-6, (rank, res)
        assert res["received"] == res["expected"], (rank, res)
    ep_last = [res for rank, res in enumerate(results) if rank % ep == ep - 1]
    assert all(res["num_received"] == 0 for res in ep_last)
    assert sum(res["num_received"] for res in results) > 0


def group_layouts(groups) -> dict:
    """Both libraries' EP groups on this rank, and the check's verdict on a tampered layout."""
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups

    from samoe_dist.parallel import LayoutMismatchError, check_groups_agree

    name = groups.ds_ep_group_name
    out = {"mcore_ep": dist.get_process_group_ranks(groups.ep_group),
           "ds_ep": list(ds_groups._get_expert_parallel_group_ranks(name)),
           "mcore_edp": dist.get_process_group_ranks(groups.expert_dp_group),
           "ds_edp": list(ds_groups._get_expert_data_parallel_group_ranks(name))}
    saved = ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name]
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(reversed(range(dist.get_world_size())))[:groups.ep_size]
    try:
        check_groups_agree(groups)
        out["tampered"] = "accepted"
    except LayoutMismatchError as exc:
        out["tampered"] = str(exc)
    finally:
        ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = saved
    return out


def test_deepspeed_and_megatron_agree_on_groups(tmp_path):
    results = run_fn(4, 2, group_layouts, (), tmp_path)
    for rank, res in enumerate(results):
        base = rank - rank % 2
        assert sorted(res["mcore_ep"]) == sorted(res["ds_ep"]) == [base, base + 1]  # contiguous EP groups
        assert sorted(res["mcore_edp"]) == sorted(res["ds_edp"]) == [rank % 2, rank % 2 + 2]  # strided
    # a layout the libraries disagree on is refused with a message naming both
    tampered = [res["tampered"] for res in results]
    assert any("megatron-core's expert-parallel group" in t and "differs from DeepSpeed's" in t for t in tampered)


# megatron-core's gloo twins of its data-parallel groups (DATA_PARALLEL_GROUP_GLOO, ...): used only
# by megatron's own distributed optimizer and checkpointing, which DeepSpeed replaces here
MEGATRON_GLOO_GROUPS = {"_DATA_PARALLEL_GROUP_GLOO", "_DATA_PARALLEL_GROUP_WITH_CP_GLOO",
                        "_EXPERT_DATA_PARALLEL_GROUP_GLOO"}


def megatron_group_globals(groups) -> dict:
    """Which of megatron's parallel_state group globals are set on this rank (the gloo ones by name)."""
    from megatron.core import parallel_state as ps

    gloo = {name: getattr(ps, name) is not None for name in vars(ps) if name.startswith("_") and name.endswith("_GLOO")}
    return {"gloo": gloo, "dp": ps._DATA_PARALLEL_GROUP is not None, "edp": ps._EXPERT_DATA_PARALLEL_GROUP is not None}


def test_megatron_creates_no_gloo_groups(tmp_path):
    """samoe_dist.parallel initialises megatron with create_gloo_process_groups=False: its groups exist,
    their unused gloo twins do not (one communicator fewer per group and rank)."""
    for res in run_fn(2, 2, megatron_group_globals, (), tmp_path):
        assert res["dp"] and res["edp"]
        assert MEGATRON_GLOO_GROUPS <= set(res["gloo"]), sorted(res["gloo"])
        assert not any(res["gloo"].values()), res["gloo"]
