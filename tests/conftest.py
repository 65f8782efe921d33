"""Shared fixtures: a one-process gloo world with megatron-core's parallel state initialised."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from samoe_dist import cpu_compat, ports

cpu_compat.apply()

# Hugging Face models loaded with trust_remote_code copy their modeling code into HF_MODULES_CACHE
# (default ~/.cache/huggingface/modules). The tests keep it in a directory of their own, removed at
# exit, so a test run writes nothing to the user's home (subprocesses inherit it). Set before any
# test imports transformers, which reads it at import.
HF_MODULES_CACHE = os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="samoe-tests-hf-modules-")
atexit.register(shutil.rmtree, HF_MODULES_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def single_process_world():
    """torch.distributed (gloo, world size 1) and megatron-core parallel_state with EP=1.

    Session-scoped: megatron's parallel state is process-global. Tests that need several ranks
    spawn their own processes (tests/distributed).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(ports.free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1, create_gloo_process_groups=False)
    yield
    # left initialised for the rest of the session


@pytest.fixture
def seeded(single_process_world):
    """Seed torch and megatron's RNG tracker before a test builds modules."""
    cpu_compat.seed_model_parallel(1234)
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """(jsonl, tokenizer model) of a small templated corpus, made once per session."""
    from tests.helpers import make_tiny_corpus

    return make_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"))
