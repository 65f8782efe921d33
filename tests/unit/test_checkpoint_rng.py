"""A checkpoint's RNG states: every generator a step draws from comes back as it was saved."""

from __future__ import annotations

import random

import numpy as np
import torch

from samoe_dist.checkpoint import rng_state, set_rng_state


def _draw() -> tuple:
    from megatron.core import tensor_parallel

    return (torch.rand(3).tolist(), random.random(), float(np.random.rand()),
            {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()})


def test_rng_states_round_trip_with_megatrons_tracker():
    from megatron.core.tensor_parallel import random as mp_random

    mp_random.initialize_rng_tracker(force_reset=True)  # megatron's training tracker (holds named states)
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.set_states({"model-parallel-rng": torch.ByteTensor(list(range(16)))})
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    saved = rng_state()
    first = _draw()
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    tracker.set_states({"model-parallel-rng": torch.ByteTensor([7] * 16)})
    assert _draw()[:3] != first[:3]
    set_rng_state(saved)
    again = _draw()
    assert again[:3] == first[:3]
    assert torch.equal(again[3]["model-parallel-rng"], first[3]["model-parallel-rng"])
    mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)  # as on CPU runs


def test_a_bare_cpu_state_from_older_checkpoints_still_loads():
    torch.manual_seed(3)
    saved = torch.get_rng_state()
    want = torch.rand(2)
    torch.manual_seed(4)
    set_rng_state(saved)
    assert torch.equal(torch.rand(2), want)
