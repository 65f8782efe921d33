"""Imported once by a fork server that CPU ranks are started from: the distributed tests' harness
(tests/distributed/harness.py) and bench/comm_volume.py.

Every rank would otherwise import torch, DeepSpeed and megatron-core itself (5-10 s of CPU each,
up to 4 ranks on 2 cores). The fork server imports them once, after the CPU patches, and each rank
is a fork of it. Only imports happen here: no process group, no thread pool, no RNG draw, so a
fork starts from the same state a fresh interpreter would.
"""

from samoe_dist import cpu_compat

cpu_compat.apply()

import samoe_dist.training  # noqa: E402,F401  (megatron-core, DeepSpeed, the model and the trainer)
import samoe_dist.parallel  # noqa: E402,F401
