"""One rank of one benchmarked system: the real Trainer on synthetic tokens, driven over stdin.

Started by ``bench/throughput.py`` (one process per rank, one world per system/EP/dtype). It builds
``samoe_dist.training.Trainer`` (DeepSpeed engine, ZeRO from the ds_config, the project's
``train_step``) with two substitutions made from outside the package:

- the data: ``build_training_data`` returns :class:`SyntheticData`, a few pre-made batches of
  uniform random tokens (indexing a list costs nothing next to a step);
- for ``dsmoe`` the model: ``build_model`` is ``bench/ds_moe_adapter.build_ds_moe_model``; for
  ``gmoe``/``gmoe-cf`` it is ``bench/grouped_moe_adapter.build_grouped_moe_model``.

Then it runs the warm-up steps, prints ``ready`` and answers JSON commands, one per line:
``{"cmd": "run", "steps": n}`` (times n train_steps; each step's wall time and its phases, see
:class:`PhaseTimer`), ``{"cmd": "profile"}`` (one step under
torch.profiler for the time breakdown, one with ``profile_memory`` for the peak), ``{"cmd":
"quit"}``. Replies go to the ORIGINAL stdout, one JSON line each; everything the libraries print
goes to stderr. The ``peak`` system times a large matmul instead (the machine's matmul peak).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process, each storage counted once (the resting
    state between steps: parameters, gradients, optimizer state and DeepSpeed's flat buffers,
    whichever library holds them)."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.is_meta:
                continue
            st = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - objects that half-look like tensors (proxies, fakes)
            continue
        key = (st.device.type, st.data_ptr())
        if st.data_ptr() and key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


class SyntheticData:
    """``micro_batch`` of the Trainer's data interface over a few fixed random batches per rank."""

    def __init__(self, vocab_size: int, seq_length: int, micro_batch_size: int, rank: int, n_batches: int = 4):
        import torch

        gen = torch.Generator().manual_seed(1000 + rank)
        self.batches = []
        for _ in range(n_batches):
            tokens = torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), generator=gen)
            self.batches.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                                 "loss_mask": torch.ones(micro_batch_size, seq_length)})
        self.calls = 0

    def micro_batch(self, split, consumed_samples, micro_batch_size, dp_rank, dp_size, micro_step):
        self.calls += 1
        return self.batches[self.calls % len(self.batches)]


class PhaseTimer:
    """Wall-clock time of a step's phases, without the profiler (whose per-op cost weighs more on a
    system of many small ops, such as megatron's expert loop): the engine's ``forward``,
    ``backward``, ``allreduce_gradients`` and ``step`` are wrapped on the live engine. Times are
    exclusive: the gradient reduction (inside ``backward`` at the accumulation boundary, or inside
    ``step`` when the engine leaves the boundary to it) counts as "grad_reduce" only; the rest of the
    step is "other". Each phase also counts the minor page faults it caused (``getrusage``). Two
    clock and two rusage reads per call."""

    PHASES = ("forward", "backward", "grad_reduce", "optimizer")

    def __init__(self, engine, barrier=None):
        """``barrier``: a callable run (and timed as phase "skew") before each gradient reduction,
        so that the reduction's time excludes waiting for the slowest rank (bench flag
        ``--phase-barrier``)."""
        self.acc: dict = {}
        self.faults: dict = {}
        self._stack: list = []
        self.phases = self.PHASES + (("skew",) if barrier is not None else ())
        if barrier is not None and hasattr(engine, "allreduce_gradients"):
            reduce, timed_barrier = engine.allreduce_gradients, self._timed(barrier, "skew")

            def reduce_after_barrier(*args, **kwargs):
                timed_barrier()
                return reduce(*args, **kwargs)
            engine.allreduce_gradients = reduce_after_barrier
        for method, phase in (("forward", "forward"), ("backward", "backward"),
                              ("allreduce_gradients", "grad_reduce"), ("step", "optimizer")):
            if hasattr(engine, method):
                setattr(engine, method, self._timed(getattr(engine, method), phase))

    def _timed(self, fn, phase: str):
        def timed(*args, **kwargs):
            self._stack.append(phase)
            t0, f0 = time.perf_counter(), _minor_faults()
            try:
                return fn(*args, **kwargs)
            finally:
                dt, df = time.perf_counter() - t0, _minor_faults() - f0
                self._stack.pop()
                self.acc[phase] = self.acc.get(phase, 0.0) + dt
                self.faults[phase] = self.faults.get(phase, 0) + df
                if self._stack:  # nested: not the enclosing phase's own time
                    outer = self._stack[-1]
                    self.acc[outer] = self.acc.get(outer, 0.0) - dt
                    self.faults[outer] = self.faults.get(outer, 0) - df
        return timed

    def run(self, step_fn) -> tuple:
        """(step_fn's result, step seconds, {phase: seconds}, {phase: minor page faults}) of one call
        of ``step_fn``. The faults (the process's, all threads) show a phase that touches fresh
        memory: a page faulted in costs about a microsecond or more, so tens of thousands of them
        are tens of milliseconds."""
        self.acc, self.faults, self._stack = {}, {}, []
        t0, f0 = time.perf_counter(), _minor_faults()
        result = step_fn()
        total, total_faults = time.perf_counter() - t0, _minor_faults() - f0
        phases = {p: self.acc.get(p, 0.0) for p in self.phases}
        phases["other"] = total - sum(phases.values())
        faults = {p: self.faults.get(p, 0) for p in self.phases}
        faults["other"] = total_faults - sum(faults.values())
        return result, total, phases, faults


def _minor_faults() -> int:
    """Minor page faults of this process so far (first touches of pages the kernel must map)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _peak_worker(spec, send) -> None:
    """Times ``a @ b`` of n x n matrices (best of ``reps``) per ``run``: GFLOP/s."""
    import torch

    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    n = spec["matmul_size"]
    # On a GPU the peak is the GPU's (the training steps run there): CUDA tensors, and the clock
    # read only after the kernel finished. On the CPU `sync` does nothing.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync()
    send({"event": "ready", "rss_bytes": _rss_bytes()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        best = float("inf")
        for _ in range(spec["matmul_reps"]):
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
        send({"event": "ran", "gflops": 2.0 * n ** 3 / best / 1e9})


def _step_alloc_peaks(prof, exclude_at_least: int) -> tuple[int, int]:
    """(raw, without-buckets) peaks of the bytes allocated above the state when profiling began.

    raw: max of the profiler's "Total Allocated" counter (the step's activations, gradients,
    temporaries, and whatever DeepSpeed allocates). without-buckets: the same running sum with
    every allocation of at least ``exclude_at_least`` bytes left out (and its free): DeepSpeed's
    ZeRO gradient bucket (``reduce_bucket_size`` elements, 5e8 by default: a 2 GB buffer allocated
    and freed in every step, common to all systems and touched only as far as the gradients fill it).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    raw = max((e["args"]["Total Allocated"] for e in mem), default=0)
    running = peak = 0
    excluded = set()
    for e in mem:
        nbytes, addr = e["args"]["Bytes"], e["args"].get("Addr")
        if nbytes >= exclude_at_least:
            excluded.add(addr)
            continue
        if nbytes < 0 and addr in excluded:
            excluded.discard(addr)
            continue
        running += nbytes
        peak = max(peak, running)
    return raw, peak


def _profile(trainer, steps: int) -> dict:
    """Time breakdown: median over ``steps`` profiled steps (after one discarded profiled step,
    which carries the profiler's one-time costs); then the allocator peak of one more step."""
    import statistics

    from torch.profiler import ProfilerActivity, profile, record_function

    import step_breakdown

    step_breakdown.install_ranges(trainer.engine, trainer.model)
    results = []
    for _ in range(steps + 1):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function(step_breakdown.PREFIX + "step"):
                trainer.train_step()
        results.append(step_breakdown.attribute(prof.events()))
    results = results[1:]
    labels = sorted({k for r in results for k in r["ms"]})
    ms = {k: statistics.median(r["ms"].get(k, 0.0) for r in results) for k in labels}
    fractions = [step_breakdown.summarise(r) for r in results]
    breakdown = {c: statistics.median(f[c] for f in fractions) for c in fractions[0]}
    typical = sorted(results, key=lambda r: r["step_ms"])[len(results) // 2]
    resting = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step()
    bucket = trainer.engine.zero_reduce_bucket_size() if trainer.engine.zero_optimization_stage() else 0
    raw, no_bucket = _step_alloc_peaks(prof, 2 * bucket if bucket else 2 ** 62)
    return {"event": "profiled", "breakdown": breakdown,
            "breakdown_ms": dict(sorted(ms.items(), key=lambda kv: -kv[1])),
            "profiled_step_ms": statistics.median(r["step_ms"] for r in results),
            "top_ops": typical["top_ops"], "peak_step_alloc_bytes": no_bucket,
            "peak_step_alloc_raw_bytes": raw, "zero_reduce_bucket_elements": bucket,
            "resting_bytes": resting, "peak_total_bytes": resting + no_bucket,
            "rss_peak_bytes": _peak_rss_bytes(), "rss_bytes": _rss_bytes()}


def main() -> None:
    spec = json.loads(sys.argv[1])
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the reply channel
    os.dup2(2, 1)  # library prints go to stderr

    def send(obj: dict) -> None:
        proto.write(json.dumps({"rank": spec["rank"], **obj}) + "\n")
        proto.flush()

    os.environ.update(RANK=str(spec["rank"]), WORLD_SIZE=str(spec["world"]), LOCAL_RANK=str(spec["rank"]),
                      LOCAL_SIZE=str(spec["world"]), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["system"] == "peak":
        _peak_worker(spec, send)
        return
    from samoe_dist import cpu_compat

    cpu_compat.apply()
    from samoe_dist import training
    from samoe_dist.arguments import parse_args

    rss_import = _rss_bytes()
    cfg, ds_path = parse_args(spec["argv"])
    training.build_training_data = lambda cfg, groups: SyntheticData(
        cfg.model.vocab_size, cfg.model.seq_length, cfg.training.micro_batch_size, groups.dp_rank)  # TP ranks: one batch
    if spec["system"] == "dsmoe":
        from functools import partial

        from ds_moe_adapter import build_ds_moe_model

        training.build_model = partial(build_ds_moe_model, capacity_factor=spec["capacity_factor"])
    elif spec["system"].startswith("gmoe"):
        from grouped_moe_adapter import build_grouped_moe_model

        training.build_model = build_grouped_moe_model
    trainer = training.Trainer(cfg, ds_path)
    import logging

    logging.getLogger("samoe").setLevel(logging.WARNING)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    barrier = None
    if spec.get("phase_barrier"):
        import torch.distributed as dist

        barrier = dist.barrier
    timer = PhaseTimer(trainer.engine, barrier)
    warm = []
    for _ in range(spec["warmup"]):
        t0 = time.perf_counter()
        losses = trainer.train_step()
        warm.append(time.perf_counter() - t0)
    send({"event": "ready", "params_local": n_params, "param_counts": trainer.param_counts,
          "warmup_s": warm, "losses": losses, "rss_import_bytes": rss_import,
          "rss_bytes": _rss_bytes(), "grouped_mm": _grouped_mm_used(spec)})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "run":
            times, phases, faults = [], [], []
            for _ in range(cmd["steps"]):
                losses, total, parts, part_faults = timer.run(trainer.train_step)
                times.append(total)
                phases.append(parts)
                faults.append(part_faults)
            send({"event": "ran", "step_s": times, "phase_s": phases, "phase_faults": faults,
                  "rss_bytes": _rss_bytes(), "lm_loss": losses.get("lm_loss")})
        elif cmd["cmd"] == "profile":
            send(_profile(trainer, cmd["steps"]))


def _grouped_mm_used(spec) -> bool | None:
    """Whether SaMoE's (and gmoe's) experts run torch's grouped GEMM here (False: the per-expert loop)."""
    if not spec["system"].startswith(("samoe", "gmoe")):
        return None
    import torch

    from samoe_dist.samoe import grouped_gemm

    x = torch.empty(1, dtype=torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32)
    h, f = spec["hidden_size"], spec["ffn_hidden_size"]
    return bool(grouped_gemm._use_grouped(x, h, f) and grouped_gemm._use_grouped(x, f, h))


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
