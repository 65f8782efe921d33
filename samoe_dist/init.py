"""Layout-independent initialisation: every weight drawn from its own seed, keyed by its name.

megatron-core initialises weights from the default RNG while it builds the model. On CPU its
expert-parallel RNG stream does not exist, so with EP > 1 every rank draws the SAME weights for
its local experts (expert e and e + N/EP start identical), and the number of local experts changes
how much randomness later layers see, so a model's initial weights depend on the EP size.

Here the model is built with ``perform_initialization=False`` and each matrix is then drawn with
megatron's own init methods (``config.init_method``; ``config.output_layer_init_method`` for the
output projections ``linear_proj`` and ``linear_fc2``) from a generator seeded by
``(seed, canonical name)``, where a local expert's name carries its GLOBAL expert index. The same
seed gives the same model for every data- and expert-parallel layout, on CPU and GPU. Norm weights
and biases keep their constructor values (ones, zeros); the SaMoE pool and combination logits keep
their own layout-independent initialisation.
"""

from __future__ import annotations

import hashlib
import re

import torch

_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def canonical_name(name: str, expert_offset: int) -> str:
    """``...local_experts.<i>.`` -> ``...experts.<expert_offset + i>.`` (the global expert index);
    activation-checkpoint wrappers are left out of the name."""
    name = name.replace("_checkpoint_wrapped_module.", "")
    return _LOCAL_EXPERT.sub(lambda m: f".experts.{expert_offset + int(m.group(1))}.", name)


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def skip(name: str, param: torch.Tensor) -> bool:
    """Parameters that keep the value they were constructed with."""
    return param.ndim < 2 or "samoe_pool." in name or name.endswith("combination_logits")


@torch.no_grad()
def initialize_parameters(model: torch.nn.Module, config, seed: int, expert_offset: int, tp_rank: int = 0,
                          tp_size: int = 1) -> int:
    """Draw every weight matrix of ``model`` from its name's seed; returns how many were drawn.

    ``config`` is the megatron TransformerConfig (its init methods); ``expert_offset`` is this
    rank's first global expert index (EP rank x local experts). A tensor-parallel weight is drawn
    whole and this TP rank keeps its block (samoe_dist.tensor_parallel), so TP does not change the
    model either. Mark expert weights (``samoe_expert``) first: they are whole on a rank.
    """
    from samoe_dist.tensor_parallel import full_shape, tp_shard

    count = 0
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen or skip(name, param):
            continue
        seen.add(id(param))
        init = config.output_layer_init_method if name.endswith(_OUTPUT_PROJECTIONS) else config.init_method
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_for(seed, canonical_name(name, expert_offset)))
            value = torch.empty(full_shape(name, param, tp_size), dtype=torch.float32)
            init(value)
        value = tp_shard(value, name, param, tp_rank, tp_size, config.gated_linear_unit)
        param.copy_(value.to(device=param.device, dtype=param.dtype))
        count += 1
    return count
