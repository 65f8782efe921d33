"""The collective device check rejects a tensor on another device than the engine's, naming the
collective and the tensor, before the collective runs (on a CPU machine the distributed tests can
only exercise the passing side, so the failing side is checked here against a 'meta' engine)."""

from __future__ import annotations

import pytest
import torch

from samoe_dist import collective_check


def test_a_tensor_off_the_engine_device_is_named():
    with pytest.raises(collective_check.CollectiveDeviceError, match=r"all_reduce: argument 0 is a \(3,\) "
                       r"torch.float64 tensor on cpu, the engine's device is meta"):
        collective_check.check_args("all_reduce", "meta", (torch.zeros(3, dtype=torch.float64),), {})
    # lists of tensors (all_gather's output list) and keyword tensors are checked too
    with pytest.raises(collective_check.CollectiveDeviceError, match="argument 1"):
        collective_check.check_args("all_gather", "meta", ([torch.empty(2, device="meta")], torch.zeros(2)), {})
    collective_check.check_args("all_reduce", "cpu", (torch.zeros(3),), {"group": None})  # fine


def test_install_wraps_only_when_asked(monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv(collective_check.ENV, raising=False)
    original = dist.all_reduce
    assert not collective_check.install(torch.device("meta"))
    assert dist.all_reduce is original
    try:
        assert collective_check.install(torch.device("meta"), force=True)
        with pytest.raises(collective_check.CollectiveDeviceError):
            dist.all_reduce(torch.zeros(1))  # refused before torch (no process group needed)
    finally:
        collective_check.uninstall()
    assert dist.all_reduce is original
