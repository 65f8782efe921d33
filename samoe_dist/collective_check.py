"""A debug check that every collective's tensors live on the engine's device.

NCCL rejects host tensors (and gloo accepts device tensors only where the build has them), so a
collective on a tensor left on the CPU works in the CPU test suite and crashes the first GPU run.
With ``SAMOE_CHECK_COLLECTIVE_DEVICES=1`` in the environment, :func:`install` (called by the
trainer once the engine exists) wraps torch.distributed's collectives so that each call first
checks the device type of every tensor it is given against the engine's, and raises naming the
collective and the tensor. DeepSpeed's ``deepspeed.comm`` calls the same torch functions, so its
collectives are checked too. The distributed tests turn it on; ``scripts/gpu_check.sh`` runs it on
a GPU, where a mismatch is possible. Off by default: it adds a Python check to every call.

``*_object`` collectives (pickled Python objects) are not wrapped: torch places their buffers itself.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist

ENV = "SAMOE_CHECK_COLLECTIVE_DEVICES"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all", "all_to_all_single", "broadcast",
               "reduce", "gather", "scatter", "send", "recv", "isend", "irecv")
_INSTALLED: dict = {}


class CollectiveDeviceError(RuntimeError):
    """A collective was given a tensor on another device than the engine's."""


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def check_args(name: str, device_type: str, args: tuple, kwargs: dict) -> None:
    """Raise CollectiveDeviceError if a tensor among ``args``/``kwargs`` is not on ``device_type``."""
    for i, value in enumerate(list(args) + list(kwargs.values())):
        for t in _tensors(value):
            if t.device.type != device_type:
                raise CollectiveDeviceError(
                    f"torch.distributed.{name}: argument {i} is a {tuple(t.shape)} {t.dtype} tensor on {t.device}, "
                    f"the engine's device is {device_type}; create it on the engine's device (NCCL rejects host "
                    f"tensors)")


def install(device: torch.device, force: bool = False) -> bool:
    """Wrap the collectives (once per process) when ENV is set or ``force``; True if active."""
    if not (force or os.environ.get(ENV) == "1"):
        return False
    device_type = torch.device(device).type
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None or name in _INSTALLED:
            continue

        @functools.wraps(fn)
        def checked(*args, __fn=fn, __name=name, **kwargs):
            check_args(__name, device_type, args, kwargs)
            return __fn(*args, **kwargs)

        _INSTALLED[name] = fn
        setattr(dist, name, checked)
    return True


def uninstall() -> None:
    for name, fn in _INSTALLED.items():
        setattr(dist, name, fn)
    _INSTALLED.clear()
