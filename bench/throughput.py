"""Training-step throughput and peak memory: dense, three standard MoEs and SaMoE.

All are megatron-core GPTs trained by the project's Trainer (DeepSpeed engine, the ds_config's
ZeRO stage, ``train_step``) on synthetic random tokens, at the SAME active compute: same h, L, seq,
micro batch; the MoEs have N experts of size f, top-k, in every layer; SaMoE builds them from a
pool of P; the dense model's FFN is k*f wide (its FLOPs per token are the MoEs' minus the router).

- ``moe``: megatron-core ``MoELayer`` (alltoall dispatcher, dropless, SequentialMLP experts)
- ``gmoe``: the same MoELayer with its experts on SaMoE's grouped-GEMM code, weights per layer, no
  pool (``bench/grouped_moe_adapter.py``): the same-kernel peer, dropless
- ``dsmoe``: ``deepspeed.moe.layer.MoE`` in the MLP slot (``bench/ds_moe_adapter.py``; capacity
  factor ``--capacity-factor``, 1 by default: its padded experts run k*tokens rows)
- ``samoe``: megatron's MoELayer with SaMoE experts (``samoe_dist.samoe``), pool replicated, dropless
- ``samoe-sharded``: the same with the pool's columns sharded over the expert-data-parallel group
  (``--samoe-pool-sharding sharded``); identical to ``samoe`` where that group has one rank
- ``samoe-once``, ``samoe-sharded-once``: ``samoe`` and ``samoe-sharded`` with
  ``--samoe-materialize-once-per-step`` (each layer's experts materialised, and gathered, once per
  optimizer step and kept for every micro-batch's forward and backward); compare at
  ``--grad-accum`` above 1, where it saves more than backward's rematerialisation
- ``samoe-sharded-prefetch``: ``samoe-sharded`` with ``--samoe-prefetch-gather`` (each layer starts
  the next layer's all-gather before it runs its own experts); paired with ``samoe-sharded``
- ``gmoe-cf``, ``samoe-cf``, ``samoe-sharded-cf``: ``gmoe``, ``samoe`` and ``samoe-sharded`` with megatron's capacity factor
  ``--capacity-factor``, tokens over capacity dropped and every expert's input padded to its
  capacity (``--moe-pad-expert-input-to-capacity``): DeepSpeed MoE's token policy, the same rows
  computed (``--no-pad-to-capacity``: dropped, not padded)
- ``dense``: megatron's MLP, f_dense = k*f
- ``dense-tp2``, ``samoe-tp2``: ``dense`` and ``samoe`` with ``--tensor-model-parallel-size 2
  --sequence-parallel`` on the same processes (half the data-parallel replicas, the same global
  batch), reported as a ``ratio`` record over the TP1 system.

Token policies: ``moe``, ``gmoe``, ``samoe``, ``samoe-sharded`` (and the ``-once`` and ``-prefetch`` variants) are
dropless; ``dsmoe``, ``gmoe-cf``, ``samoe-cf``, ``samoe-sharded-cf`` are capacity-bounded. Ratios are reported within a policy (``policy_ratio`` records: each
SaMoE over each peer of its policy, and over the fastest of them in the run).

Method: for each layout EP x EDP (``--layouts``, world = EP x EDP gloo processes, each with
cores / world threads, at least 1; micro-batch per rank fixed, so the tokens per step grow with the
world; ``--grad-accum`` micro-batches per optimizer step) and dtype, every system is one long-lived world, started
together and warmed up; then ``--rounds`` rounds, each running ``--steps-per-round`` timed steps of
every system in turn (the order rotates each round). Step times are reported as median, min, max
and quartiles over all timed steps; the ratios are per-round paired (``median step of moe in round
r / median step of X in round r``), median and range over rounds, so machine-load drift cancels;
``median_ci95`` is a distribution-free 95% confidence interval of that median (the sign test's
order statistics; 6 rounds or more), so a target inside it is neither met nor missed by the run;
``best_step_ratio`` (fastest moe step / fastest X step) is the estimate least affected by other
processes on the machine, which only ever add time.
A ``peak`` world in the same rounds times an n x n matmul with all cores: the MFU denominator.

FLOPs per token (model FLOPs, PaLM's formula): 6 x active matmul parameters (attention 4h^2, the
k active experts 2hf each, router hN, LM head hV; per layer) + 12 L h s (attention scores, not
discounted for causality). SaMoE's materialisation is extra (hardware) work and not counted;
``materialise_flops_fraction`` says how large it is: 8 (N/EP) P |E| per layer per step per rank.

Memory, per system (max over ranks): ``peak_step_alloc_bytes`` is torch.profiler's allocator
account of one train_step (``profile_memory``): the peak of the bytes allocated above the state at
its start (activations, gradients, temporaries; the resting parameters and optimizer state are not
in it), leaving out DeepSpeed's ZeRO gradient bucket (``reduce_bucket_size`` elements, 5e8 by
default: a 2 GB buffer allocated and freed in every step by every system, mostly never touched),
which ``peak_step_alloc_raw_bytes`` includes. ``resting_bytes`` is what is alive between steps
(every live tensor storage counted once: parameters, gradients, optimizer state, flat buffers) and
``peak_total_bytes`` = resting + step peak: what a rank must hold at its peak. ``rss_peak_bytes`` is the process's peak RSS
(ru_maxrss: imports, parameters, optimizer state, allocator caching included);
``rss_import_bytes`` the RSS after importing torch, megatron and DeepSpeed.

Time breakdown: after the timed rounds, ``--profile-steps`` more steps per system under
torch.profiler, with ranges added around the model's parts from outside the package
(``bench/step_breakdown.py`` lists them and how time is attributed); medians over those steps.
``breakdown_ms`` is rank 0's, ``breakdown_ms_by_rank`` every rank's: a rank that waits longer in
the all-to-all than the others is waiting for their work, which their own rows show.
The timed steps themselves also carry their phases by wall clock, without the profiler
(``phase_ms`` of a result: forward, backward, gradient reduction, optimizer, other; medians over
the steps of each phase's mean over ranks), and each ``policy_ratio`` gives SaMoE's phase times
minus the peer's (``phase_ms_delta``): where a ratio's difference lies, at no profiler cost.
``phase_minor_faults`` gives each phase's minor page faults the same way (median over steps, mean
over ranks): a phase whose memory is fresh each step pays for it there. ``memory`` also carries the
largest rank's RSS after the warm-up and after the last timed round, and its growth per timed step.

Output: JSON lines on stdout (and ``--output``): ``config``; per (EP, dtype) ``peak``, one
``result`` per system, ``ratio`` records (every system over moe; ``headline`` marks samoe/moe);
``summary``; a ``-once`` system is also paired with its per-call twin (``ratio``). ``--markdown``
writes the report (bench/throughput_report.py), which ``--report-from`` re-renders from an earlier
run's JSON lines; a file of several runs appended one after another renders each run's report in
turn.

glibc: every world gets ``MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=4294967296`` (large
buffers, SaMoE's one [T*k, f] buffer per layer in particular, are otherwise mmap'ed and page-faulted
afresh every step, see bench/memory_samoe.py); with ``--malloc-compare`` (default) the first
(EP, dtype) group also runs moe and samoe without it, so the effect on the ratio is visible.

    .venv/bin/python bench/throughput.py [--quick] [--systems dense,moe,gmoe,dsmoe,samoe,...] [--layouts 1x1,2x1,2x2]
        [--dtypes fp32,bf16] [--rounds R] [--output results.jsonl] [--markdown results.md]
    .venv/bin/python bench/throughput.py --report-from results.jsonl --markdown results.md
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from throughput_report import markdown, report as records_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from samoe_dist import ports  # noqa: E402  (the repository on the path first)

WORKER = os.path.join(REPO, "bench", "throughput_worker.py")
SYSTEMS = ("dense", "moe", "gmoe", "dsmoe", "samoe", "samoe-sharded", "samoe-once", "samoe-sharded-once",
           "samoe-sharded-prefetch", "gmoe-cf", "samoe-cf", "samoe-sharded-cf",
           "dense-tp2", "samoe-tp2")
# "<system>-tp2": the same model and global batch with --tensor-model-parallel-size 2 --sequence-parallel
# (half the data-parallel replicas, each split over 2 ranks): reported as a ratio to the TP1 system.
TP2 = "-tp2"
DROPLESS = ("moe", "gmoe", "samoe", "samoe-sharded", "samoe-once", "samoe-sharded-once", "samoe-sharded-prefetch")
CAPACITY = ("dsmoe", "gmoe-cf", "samoe-cf", "samoe-sharded-cf")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
# shape and schedule: default mode (~10-15 min on 2 cores) and --quick (< 3 min)
PRESETS = {
    "default": dict(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024, num_experts=8,
                    moe_router_topk=2, samoe_pool_size=16, seq_length=256, micro_batch_size=8, vocab_size=2048,
                    rounds=6, steps_per_round=3, warmup=4, matmul_size=2048, profile_steps=2),
    "quick": dict(num_layers=2, hidden_size=64, num_attention_heads=2, ffn_hidden_size=128, num_experts=4,
                  moe_router_topk=2, samoe_pool_size=4, seq_length=64, micro_batch_size=4, vocab_size=512,
                  rounds=2, steps_per_round=2, warmup=2, matmul_size=512, profile_steps=1),
}
log = logging.getLogger("bench.throughput")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps (< 3 min)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    p.add_argument("--layouts", default="1x1,2x1,2x2",
                   help="EPxEDP layouts to run (world = EP x EDP processes), e.g. 1x1,2x1,2x2")
    p.add_argument("--dtypes", default="fp32,bf16")
    for name in PRESETS["default"]:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {PRESETS['default'][name]}, --quick {PRESETS['quick'][name]}")
    p.add_argument("--ds-config", default=os.path.join(REPO, "examples", "ds_config_cpu.json"))
    p.add_argument("--capacity-factor", type=float, default=1.0, help="DeepSpeed MoE's capacity factor")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (the global batch is micro-batch x world x this)")
    p.add_argument("--no-pad-to-capacity", dest="pad_to_capacity", action="store_false",
                   help="the megatron capacity systems (*-cf) drop over-capacity tokens without padding the "
                        "experts' inputs to capacity (by default they pad, as DeepSpeed's MoE does)")
    p.add_argument("--matmul-reps", type=int, default=3, help="matmuls per peak measurement (best is kept)")
    p.add_argument("--malloc-compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also run moe and samoe without the glibc malloc settings (first group)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="profiled steps for the time breakdown and the allocator peak")
    p.add_argument("--phase-barrier", action="store_true",
                   help="a barrier before each gradient reduction, timed as phase 'skew', so the reduction's "
                        "phase time excludes waiting for the slowest rank (adds a collective: for attribution, "
                        "not for the throughput ratios)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for one reply of a worker")
    p.add_argument("--output", help="also write the JSON lines here")
    p.add_argument("--markdown", help="write a Markdown report here")
    p.add_argument("--report-from", metavar="JSONL", help="only re-render the Markdown (--markdown) from the "
                   "JSON lines of earlier runs (one report per run in the file)")
    a = p.parse_args(argv)
    preset = PRESETS["quick" if a.quick else "default"]
    for name, value in preset.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    a.systems = [s for s in a.systems.split(",") if s]
    a.dtype_list = [d for d in a.dtypes.split(",") if d]
    try:
        a.layout_list = [tuple(int(v) for v in lay.split("x")) for lay in a.layouts.split(",") if lay]
    except ValueError:
        a.layout_list = []
    bad = [s for s in a.systems if s not in SYSTEMS] + [d for d in a.dtype_list if d not in ("fp32", "bf16")]
    if bad or not a.systems or not a.layout_list or any(len(lay) != 2 or min(lay) < 1 for lay in a.layout_list):
        p.error(f"unknown system/dtype {bad} or bad --layouts {a.layouts!r}: --systems from {SYSTEMS}, "
                f"--dtypes from fp32,bf16, --layouts as EPxEDP,... (e.g. 1x1,2x1,2x2)")
    if a.warmup < 1 or a.rounds < 1 or a.steps_per_round < 1 or a.grad_accum < 1:
        p.error("--warmup, --rounds, --steps-per-round and --grad-accum must be >= 1")
    if any(a.num_experts % ep for ep, _ in a.layout_list) or a.samoe_pool_size < 1:
        p.error(f"--num-experts {a.num_experts} must be divisible by every EP size {[e for e, _ in a.layout_list]}")
    return a


def cpu_info() -> dict:
    """The CPU model and the instruction sets that decide its bf16 speed (results differ between
    machines of the same kind: record which one gave each number)."""
    info = {"model": "unknown", "bf16_isa": []}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name") and info["model"] == "unknown":
            info["model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["bf16_isa"] = sorted(flags & {"avx512_bf16", "amx_bf16", "avx512_fp16", "avx2"})
            break
    return info


def emit_record(rec: dict, output=None) -> dict:
    """Print a bench's one-record result as a JSON line, and write that line to ``output`` too
    when given (the single-record benches: pool_ops.py, expert_ffn.py)."""
    line = json.dumps(rec)
    print(line)
    if output:
        with open(output, "w") as f:
            f.write(line + "\n")
    return rec


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def trainer_argv(a, system: str, ep: int, world: int, dtype: str) -> list[str]:
    """The project's own flags for this system (pretrain_samoe.py's command line)."""
    tp2 = system.endswith(TP2)
    system = system.removesuffix(TP2)
    argv = ["--num-layers", a.num_layers, "--hidden-size", a.hidden_size,
            "--num-attention-heads", a.num_attention_heads, "--seq-length", a.seq_length,
            "--micro-batch-size", a.micro_batch_size, "--global-batch-size", a.micro_batch_size * world * a.grad_accum,
            "--train-iters", 10 ** 6, "--vocab-size", a.vocab_size, "--ds_config", a.ds_config]
    if system == "dense":
        argv += ["--ffn-hidden-size", a.moe_router_topk * a.ffn_hidden_size]
    else:
        argv += ["--ffn-hidden-size", a.ffn_hidden_size, "--num-experts", a.num_experts,
                 "--moe-router-topk", a.moe_router_topk, "--expert-model-parallel-size", ep]
    if system.startswith("samoe"):
        argv += ["--samoe-pool-size", a.samoe_pool_size]
    if system.startswith("samoe-sharded"):
        argv += ["--samoe-pool-sharding", "sharded"]
    if system.endswith("-once"):
        argv.append("--samoe-materialize-once-per-step")
    if system.endswith("-prefetch"):
        argv.append("--samoe-prefetch-gather")
    if system in CAPACITY and system != "dsmoe":
        argv += ["--moe-expert-capacity-factor", a.capacity_factor]
        if a.pad_to_capacity:
            argv.append("--moe-pad-expert-input-to-capacity")
    if dtype == "bf16":
        argv.append("--bf16")
    if tp2:
        argv += ["--tensor-model-parallel-size", 2, "--sequence-parallel"]
    return [str(x) for x in argv]


class World:
    """The processes of one benchmarked (system, EP, dtype), answering JSON commands."""

    def __init__(self, a, name: str, system: str, ep: int, edp: int, dtype: str, malloc_env: bool, log_dir: str):
        self.name, self.system, self.ep, self.dtype, self.malloc_env = name, system, ep, dtype, malloc_env
        self.size = 1 if system == "peak" else ep * edp
        self.timeout = a.timeout
        threads = _cores() if system == "peak" else max(1, _cores() // self.size)
        self.threads = threads
        env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
        env.update(PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "bench"), env.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        if malloc_env:
            env.update(MALLOC_ENV)
        port = ports.free_port()  # below the ephemeral range: the worlds starting beside it cannot take it
        self.procs, self.logs, self.queues = [], [], []
        for rank in range(self.size):
            spec = dict(system=system, rank=rank, world=self.size, port=port, threads=threads, dtype=dtype,
                        argv=trainer_argv(a, system, ep, self.size, dtype), warmup=a.warmup,
                        capacity_factor=a.capacity_factor, hidden_size=a.hidden_size,
                        ffn_hidden_size=a.ffn_hidden_size, matmul_size=a.matmul_size, matmul_reps=a.matmul_reps,
                        phase_barrier=a.phase_barrier)
            path = os.path.join(log_dir, f"{name.replace('/', '_')}_ep{ep}x{edp}_{dtype}_rank{rank}.log")
            logf = open(path, "w")
            proc = subprocess.Popen([sys.executable, WORKER, json.dumps(spec)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=logf, text=True, env=env, cwd=REPO)
            q: queue.Queue = queue.Queue()
            threading.Thread(target=_pump, args=(proc.stdout, q), daemon=True).start()
            self.procs.append(proc)
            self.logs.append(path)
            self.queues.append(q)

    def send(self, cmd: dict) -> None:
        for proc in self.procs:
            proc.stdin.write(json.dumps(cmd) + "\n")
            proc.stdin.flush()

    def recv(self) -> list[dict]:
        """One reply from every rank (rank order); a dead or silent worker raises with its log."""
        replies = []
        for rank, q in enumerate(self.queues):
            try:
                line = q.get(timeout=self.timeout)
            except queue.Empty:
                line = None
            if not line:
                raise RuntimeError(f"{self.name} EP={self.ep} {self.dtype} rank {rank} gave no reply "
                                   f"(exit code {self.procs[rank].poll()}); end of its log "
                                   f"{self.logs[rank]}:\n{_tail(self.logs[rank])}")
            replies.append(json.loads(line))
        return replies

    def ask(self, cmd: dict) -> list[dict]:
        self.send(cmd)
        return self.recv()

    def close(self) -> None:
        for proc in self.procs:
            try:
                if proc.poll() is None:
                    proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                    proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _pump(stream, q: queue.Queue) -> None:
    for line in stream:
        if line.startswith("{"):
            q.put(line)
    q.put("")  # end of stream: the worker exited


def _tail(path: str, n: int = 30) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


# -- statistics and FLOPs ------------------------------------------------------------------------
def spread(values: list[float]) -> dict:
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q[0], "q3": q[2], "n": len(v)}


def flops_per_token(a, system: str) -> float:
    """Model FLOPs per token, forward + backward (see module docstring)."""
    h, L = a.hidden_size, a.num_layers
    expert = 2 * h * a.ffn_hidden_size
    mlp = a.moe_router_topk * expert + (0 if system.removesuffix(TP2) == "dense" else h * a.num_experts)
    return 6.0 * (L * (4 * h * h + mlp) + h * a.vocab_size) + 12.0 * L * h * a.seq_length


def materialise_flops_per_step(a, ep: int, shards: int = 1, once: bool = False) -> float:
    """SaMoE's extra FLOPs per step and rank, in GEMMs of (N/EP) x P x h*f per layer: for each of W1, W2
    and each micro-batch, the forward materialisation, backward's recomputation, dW -> dW_pool and dA
    (8 per micro-batch); materialised once per step (``once``), 2 per step plus the 4 gradient
    mappings per micro-batch. A sharded pool does 1/EDP of them."""
    gemms = 2 + 4 * a.grad_accum if once else 8 * a.grad_accum
    gemm = 2.0 * (a.num_experts // ep) * a.samoe_pool_size * a.hidden_size * a.ffn_hidden_size
    return gemms * gemm * a.num_layers / shards


# -- one (EP, dtype) group -----------------------------------------------------------------------
def run_group(a, ep: int, edp: int, dtype: str, with_malloc_compare: bool, log_dir: str, emit) -> dict:
    specs = [(s, s, True) for s in a.systems] + [("peak", "peak", True)]
    if with_malloc_compare:
        specs += [(f"{s}/no-malloc-env", s, False) for s in ("moe", "samoe") if s in a.systems]
    log.info("EP=%d x EDP=%d %s: starting %s", ep, edp, dtype, ", ".join(n for n, _, _ in specs))
    worlds = {}
    try:
        for name, system, malloc in specs:
            worlds[name] = World(a, name, system, ep, edp, dtype, malloc, log_dir)
        ready = {name: w.recv() for name, w in worlds.items()}
        names = list(worlds)
        per_round: dict[str, list[list[float]]] = {n: [] for n in names}
        per_phase: dict[str, list[dict]] = {n: [] for n in names}  # every timed step's phases
        per_faults: dict[str, list[dict]] = {n: [] for n in names}  # and their minor page faults
        per_rss: dict[str, list[int]] = {n: [] for n in names}  # the largest rank's RSS after each round
        for r in range(a.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                w = worlds[name]
                if w.system == "peak":
                    per_round[name].append([w.ask({"cmd": "run"})[0]["gflops"]])
                    continue
                replies = w.ask({"cmd": "run", "steps": a.steps_per_round})
                per_round[name].append([max(ts) for ts in zip(*(rep["step_s"] for rep in replies))])
                per_phase[name] += [{k: statistics.fmean(p[k] for p in ps) for k in ps[0]}  # mean over ranks
                                    for ps in zip(*(rep["phase_s"] for rep in replies))]
                per_faults[name] += [{k: statistics.fmean(p[k] for p in ps) for k in ps[0]}
                                     for ps in zip(*(rep["phase_faults"] for rep in replies))]
                per_rss[name].append(max(rep["rss_bytes"] for rep in replies))
            log.info("EP=%d x EDP=%d %s: round %d/%d done", ep, edp, dtype, r + 1, a.rounds)
        profiles = {}
        if a.profile:
            for name, w in worlds.items():
                if w.system != "peak":
                    profiles[name] = w.ask({"cmd": "profile", "steps": a.profile_steps})
    finally:
        for w in worlds.values():
            w.close()
    return summarise_group(a, ep, edp, dtype, worlds, ready, per_round, profiles, emit, per_phase, per_faults,
                           per_rss)


def median_ci(values: list[float], level: float = 0.95) -> tuple | None:
    """A distribution-free confidence interval of the median of ``values`` (independent draws of one
    distribution, e.g. per-round paired ratios): the order statistics (x_(k), x_(n+1-k)) with the
    largest k whose coverage 1 - 2 P(Binomial(n, 1/2) < k) is at least ``level`` (the sign test's
    interval). Returns (low, high, coverage), or None when even (min, max) covers less (n < 6 at
    0.95)."""
    n = len(values)
    v = sorted(values)
    best = None
    below = 0.0  # P(Binomial(n, 1/2) <= k - 1)
    for k in range(1, n // 2 + 1):
        below += math.comb(n, k - 1) / 2 ** n
        coverage = 1.0 - 2.0 * below
        if coverage < level:
            break
        best = (v[k - 1], v[n - k], coverage)
    return best


def _paired(per_round, base: str, other: str) -> dict:
    """tokens/s of ``other`` over ``base``, paired per round (median step of base / of other): the
    spread over rounds, each round's ratio, and a 95% confidence interval of their median
    (:func:`median_ci`; None below 6 rounds)."""
    ratios = [statistics.median(b) / statistics.median(o) for b, o in zip(per_round[base], per_round[other])]
    ci = median_ci(ratios)
    return {**spread(ratios), "rounds": ratios, "median_ci95": None if ci is None else list(ci[:2]),
            "median_ci_coverage": None if ci is None else ci[2]}


def _phase_medians(steps: list[dict], scale: float = 1.0) -> dict:
    """Median of each phase over the timed steps (each step's phases: mean over ranks), times
    ``scale`` (1e3: seconds to milliseconds)."""
    return {k: scale * statistics.median(s[k] for s in steps) for k in steps[0]} if steps else {}


def _rss_growth(rss_ready: int, rss: list[int], steps_per_round: int) -> dict:
    """The largest rank's RSS after the warm-up and after the last timed round, and its growth per
    timed step in between (a process that keeps taking fresh memory, e.g. a cache growing by
    shape, shows here)."""
    if not rss:
        return {}
    return {"rss_ready_bytes": rss_ready, "rss_last_round_bytes": rss[-1],
            "rss_growth_bytes_per_step": (rss[-1] - rss_ready) / (len(rss) * steps_per_round)}


def summarise_group(a, ep, edp, dtype, worlds, ready, per_round, profiles, emit, per_phase=None,
                    per_faults=None, per_rss=None) -> dict:
    layout = f"{ep}x{edp}"
    peak_gflops = spread([x for rnd in per_round["peak"] for x in rnd])
    emit({"type": "peak", "ep": ep, "edp": edp, "layout": layout, "dtype": dtype, "matmul_size": a.matmul_size,
          "threads": worlds["peak"].threads, "gflops": peak_gflops})
    results = {}
    for name, w in worlds.items():
        if w.system == "peak":
            continue
        steps = [t for rnd in per_round[name] for t in rnd]
        st = spread(steps)
        tokens = a.micro_batch_size * a.seq_length * w.size * a.grad_accum
        fpt = flops_per_token(a, w.system)
        rec = {"type": "result", "system": w.system, "name": name, "ep": ep, "edp": edp, "layout": layout,
               "dtype": dtype,
               "processes": w.size, "threads_per_process": w.threads, "malloc_env": w.malloc_env,
               "tokens_per_step": tokens, "step_s": st,
               "tokens_per_s": {"median": tokens / st["median"], "min": tokens / st["max"], "max": tokens / st["min"]},
               "flops_per_token": fpt,
               "mfu": {k: fpt * tokens / st[k2] / (peak_gflops["median"] * 1e9)
                       for k, k2 in (("median", "median"), ("min", "max"), ("max", "min"))},
               "phase_ms": _phase_medians((per_phase or {}).get(name, []), scale=1e3),
               "phase_minor_faults": _phase_medians((per_faults or {}).get(name, [])),
               "params": ready[name][0].get("param_counts"), "losses_last_warmup": ready[name][0].get("losses"),
               "memory": {"rss_import_bytes": max(r["rss_import_bytes"] for r in ready[name]),
                          **_rss_growth(max(r["rss_bytes"] for r in ready[name]), (per_rss or {}).get(name, []),
                                        a.steps_per_round)}}
        if w.system.startswith("samoe"):
            shards = edp if w.system.startswith("samoe-sharded") else 1
            rec["materialise_flops_fraction"] = (materialise_flops_per_step(a, ep, shards, w.system.endswith("-once"))
                                                 / (fpt * tokens / w.size))
            rec["grouped_mm"] = ready[name][0].get("grouped_mm")
        if name in profiles:
            prof = profiles[name]
            rec["memory"].update({k: max(p[k] for p in prof) for k in (
                "peak_step_alloc_bytes", "peak_step_alloc_raw_bytes", "rss_peak_bytes", "resting_bytes",
                "peak_total_bytes")})
            rec["memory"]["zero_reduce_bucket_elements"] = prof[0]["zero_reduce_bucket_elements"]
            rec["breakdown"] = prof[0]["breakdown"]
            rec["breakdown_ms"] = {k: round(v, 3) for k, v in prof[0]["breakdown_ms"].items()}
            rec["breakdown_ms_by_rank"] = [{k: round(v, 3) for k, v in p["breakdown_ms"].items()} for p in prof]
            rec["breakdown_top_ops"] = prof[0]["top_ops"]
            rec["profiled_step_ms"] = prof[0]["profiled_step_ms"]
        emit(rec)
        results[name] = rec
    ratios = []
    pairs = [("moe", n) for n in results if n != "moe" and "/" not in n]
    pairs += [("moe/no-malloc-env", "samoe/no-malloc-env"), ("samoe/no-malloc-env", "samoe"), ("moe/no-malloc-env", "moe")]
    pairs += [(n.removesuffix(TP2), n) for n in results if n.endswith(TP2)]  # TP2 over TP1, same model and batch
    pairs += [(n.removesuffix("-once"), n) for n in results if n.endswith("-once")]  # once per step over per call
    pairs += [(n.removesuffix("-prefetch"), n) for n in results if n.endswith("-prefetch")]  # prefetched over not
    for base, other in pairs:  # tokens/s of `other` over `base`, paired per round
        if base in results and other in results:
            rec = {"type": "ratio", "ep": ep, "edp": edp, "layout": layout, "dtype": dtype, "numerator": other,
                   "denominator": base, "tokens_per_s_ratio": _paired(per_round, base, other),
                   "best_step_ratio": results[base]["step_s"]["min"] / results[other]["step_s"]["min"],
                   "headline": (other, base) == ("samoe", "moe")}
            emit(rec)
            ratios.append(rec)
    policy_ratios = []
    for policy, members in (("dropless", DROPLESS), ("capacity", CAPACITY)):
        samoes = [n for n in members if n.startswith("samoe") and n in results]
        peers = [n for n in members if not n.startswith("samoe") and n in results]
        if not samoes or not peers:
            continue
        fastest = min(peers, key=lambda n: results[n]["step_s"]["median"])
        for s_name in samoes:
            for peer in peers:
                rec = {"type": "policy_ratio", "ep": ep, "edp": edp, "layout": layout, "dtype": dtype,
                       "policy": policy, "numerator": s_name, "denominator": peer, "fastest_peer": peer == fastest,
                       "tokens_per_s_ratio": _paired(per_round, peer, s_name),
                       "best_step_ratio": results[peer]["step_s"]["min"] / results[s_name]["step_s"]["min"],
                       "phase_ms_delta": {k: v - results[peer]["phase_ms"].get(k, 0.0)
                                          for k, v in results[s_name]["phase_ms"].items()},
                       "peak_step_alloc_ratio": _alloc_ratio(results, s_name, peer),
                       "peak_total_ratio": _alloc_ratio(results, s_name, peer, "peak_total_bytes")}
                emit(rec)
                policy_ratios.append(rec)
    return {"results": results, "ratios": ratios, "policy_ratios": policy_ratios, "peak": peak_gflops}


def _alloc_ratio(results, num: str, den: str, key: str = "peak_step_alloc_bytes"):
    a, b = (results[n]["memory"].get(key) for n in (num, den))
    return a / b if a and b else None


def main(argv=None) -> None:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if a.report_from:
        try:
            report = records_report(a.report_from)
        except (OSError, ValueError) as exc:
            sys.exit(f"throughput.py: --report-from: {exc}")
        except KeyError as exc:
            sys.exit(f"throughput.py: --report-from: {a.report_from}: a record lacks the field {exc}: not a "
                     "records file of this bench (its --output)?")
        if a.markdown:
            with open(a.markdown, "w") as f:
                f.write(report)
        else:
            sys.stdout.write(report)
        return
    out = open(a.output, "w") if a.output else None

    def emit(rec: dict) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    config = {"type": "config", "mode": "quick" if a.quick else "default", "cores": _cores(), "cpu": cpu_info(),
              "phase_barrier": a.phase_barrier,
              "loadavg_start": round(os.getloadavg()[0], 2), "systems": a.systems,
              "layouts": [f"{ep}x{edp}" for ep, edp in a.layout_list],
              "dtypes": a.dtype_list, **{k: getattr(a, k) for k in PRESETS["default"]},
              "capacity_factor": a.capacity_factor, "pad_to_capacity": a.pad_to_capacity, "ds_config": os.path.relpath(a.ds_config, REPO),
              "matmul_reps": a.matmul_reps, "malloc_env": MALLOC_ENV}
    emit(config)
    t0 = time.time()
    groups = []
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as log_dir:
        first = True
        for ep, edp in a.layout_list:
            for dtype in a.dtype_list:
                groups.append(run_group(a, ep, edp, dtype, a.malloc_compare and first, log_dir, emit))
                first = False
    config["loadavg_end"] = round(os.getloadavg()[0], 2)
    headline = [r for g in groups for r in g["ratios"] if r["headline"]]
    emit({"type": "summary", "wall_s": round(time.time() - t0, 1), "loadavg_end": config["loadavg_end"],
          "samoe_over_moe_tokens_per_s": {f"{r['layout']}_{r['dtype']}": r["tokens_per_s_ratio"]["median"]
                                          for r in headline},
          "samoe_over_fastest_peer_tokens_per_s": {
              f"{r['layout']}_{r['dtype']}_{r['numerator']}_over_{r['denominator']}": r["tokens_per_s_ratio"]["median"]
              for g in groups for r in g["policy_ratios"] if r["fastest_peer"]}})
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(config, groups))
    if out:
        out.close()


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(REPO, "bench"))
    main()
