"""A TCP port for a rendezvous store (torch.distributed's MASTER_PORT) that nothing else takes first.

The usual trick, binding port 0 and closing the socket, returns a port from the kernel's ephemeral
range, the same range every outgoing connection takes its local port from: gloo connects each pair
of ranks, so a world that is starting up can take, for one of its own connections, the port just
picked for another world whose rank 0 has not bound its store yet (and the second world then fails
with "address in use" or a reset connection). :func:`free_port` picks below that range, where only
listeners bind, checks the port is free now, and never hands the same port out twice in one
process. Used by the test suite and the benchmarks, which start several worlds side by side.
"""

from __future__ import annotations

import os
import random
import socket

_GIVEN: set = set()
_LOWEST = 10000  # below this, well-known and registered services


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux); the usual Linux default where it cannot be read."""
    try:
        with open(path) as f:
            lo, hi = (int(v) for v in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port free now on ``host``, below the ephemeral range, not returned before by this process."""
    lo, _ = ephemeral_range()
    rng = random.Random(int.from_bytes(os.urandom(8), "little"))
    if lo - _LOWEST >= 1000:
        for _ in range(tries):
            port = rng.randrange(_LOWEST, lo)
            if port not in _GIVEN and _bindable(port, host):
                _GIVEN.add(port)
                return port
    while True:  # a machine whose ephemeral range starts low: the kernel's pick, still never repeated
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
