"""With one expert-parallel rank the MoE layers (standard and SaMoE, both dispatchers) never call a
collective: tokens stay on the rank and no communication happens."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from samoe_dist.arguments import parse_args
from samoe_dist.config import validate_layout


class _NoCollectives:
    NAMES = ("all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor", "all_reduce",
             "reduce_scatter_tensor", "broadcast", "_all_gather_base", "_reduce_scatter_base")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            if hasattr(dist, name):
                monkeypatch.setattr(dist, name, self._recorder(name))

    def _recorder(self, name):
        def record(*args, **kwargs):
            self.calls.append(name)
            raise AssertionError(f"torch.distributed.{name} called with EP=1")
        return record


@pytest.mark.parametrize("kind", ["moe", "samoe"])
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_moe_layers_do_not_communicate_at_ep1(seeded, monkeypatch, kind, dispatcher):
    from samoe_dist.model import build_model
    from samoe_dist.parallel import init_distributed

    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--vocab-size", "64", "--num-experts", "4", "--moe-token-dispatcher-type", dispatcher]
    if kind == "samoe":
        argv += ["--samoe-pool-size", "2"]
    cfg, _ = parse_args(argv)
    validate_layout(cfg, 1)
    from megatron.core.transformer.moe.moe_layer import MoELayer

    model = build_model(cfg, init_distributed(1))
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(layers) == 2
    guard = _NoCollectives(monkeypatch)
    for layer in layers:
        x = torch.randn(16, 2, 32, requires_grad=True)  # [s, b, h]
        out, _ = layer(x)
        out.square().sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert guard.calls == []
