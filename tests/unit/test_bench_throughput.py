"""bench/throughput.py runs end to end in its quick mode and prints the records it documents.

Timings are not checked (they depend on the machine and its load); the structure is: one result
per system with its step-time spread, tokens/s, MFU, memory and step breakdown, the matmul peak,
the SaMoE/megatron-MoE headline ratio, the Markdown report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _report_from(records_path: Path) -> subprocess.CompletedProcess:
    """``bench/throughput.py --report-from records_path``, its Markdown on stdout."""
    return subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), "--report-from", str(records_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_quick_throughput_bench_prints_its_records(tmp_path):
    out, md = tmp_path / "out.jsonl", tmp_path / "report.md"
    cmd = [sys.executable, str(REPO / "bench" / "throughput.py"), "--quick", "--systems", "samoe,moe,gmoe",
           "--layouts", "1x1", "--dtypes", "fp32", "--rounds", "1", "--no-malloc-compare", "--phase-barrier",
           "--output", str(out), "--markdown", str(md)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout_records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == stdout_records
    by_type: dict[str, list[dict]] = {}
    for rec in records:
        by_type.setdefault(rec["type"], []).append(rec)
    assert set(by_type) == {"config", "peak", "result", "ratio", "policy_ratio", "summary"}
    assert by_type["config"][0]["mode"] == "quick" and by_type["config"][0]["phase_barrier"] is True
    cpu = by_type["config"][0]["cpu"]  # which machine gave the numbers
    assert isinstance(cpu["model"], str) and cpu["model"] and isinstance(cpu["bf16_isa"], list)

    (peak,) = by_type["peak"]
    assert peak["dtype"] == "fp32" and peak["gflops"]["median"] > 0

    results = {r["system"]: r for r in by_type["result"]}
    assert set(results) == {"samoe", "moe", "gmoe"}
    for system, r in results.items():
        assert (r["ep"], r["edp"], r["dtype"], r["processes"], r["malloc_env"]) == (1, 1, "fp32", 1, True)
        st = r["step_s"]
        assert st["n"] == 2  # 1 round x 2 steps
        assert 0 < st["min"] <= st["q1"] <= st["median"] <= st["q3"] <= st["max"]
        assert r["tokens_per_step"] == 4 * 64  # quick: micro-batch 4 x seq 64
        assert abs(r["tokens_per_s"]["median"] * st["median"] - r["tokens_per_step"]) < 1e-6 * r["tokens_per_step"]
        assert 0 < r["mfu"]["median"] < 1
        assert r["flops_per_token"] > 6 * r["params"]["active_per_token"] - 1
        mem = r["memory"]
        assert 0 < mem["peak_step_alloc_bytes"] <= mem["peak_step_alloc_raw_bytes"]
        assert mem["rss_peak_bytes"] > mem["rss_import_bytes"] > 0
        # resting state: at least the parameters (fp32) and Adam's two moments of each
        n_params = r["params"]["total"]
        assert mem["resting_bytes"] >= 3 * 4 * n_params
        assert mem["peak_total_bytes"] == mem["resting_bytes"] + mem["peak_step_alloc_bytes"]
        assert set(r["breakdown"]) >= {"materialise fwd", "materialise bwd", "router", "dispatch/permute",
                                       "expert GEMMs", "attention", "optimizer+reduce", "other"}
        assert 0.5 < sum(r["breakdown"].values()) < 1.0 + 1e-6
        assert r["breakdown_ms"].get("router (fwd)", 0) > 0 and r["breakdown_ms"].get("expert GEMM (bwd)", 0) > 0
        # wall-clock phases of the timed steps: every engine phase ran; with 2 steps a median is their mean,
        # so the phases sum to the mean step over ranks, at most the slowest rank's (step_s) at its longest
        ph = r["phase_ms"]
        assert set(ph) == {"forward", "backward", "grad_reduce", "optimizer", "other", "skew"}  # --phase-barrier
        assert all(ph[k] > 0 for k in ("forward", "backward", "optimizer")) and ph["grad_reduce"] >= 0
        assert ph["other"] >= 0 and sum(ph.values()) <= 1e3 * st["max"] + 1e-6
        pf = r["phase_minor_faults"]  # the same phases, counted: rusage only grows
        assert set(pf) == set(ph) and all(v >= 0 for v in pf.values())
        # RSS after the warm-up and after the last round, and the growth per timed step (1 round x 2 steps)
        assert mem["rss_ready_bytes"] > mem["rss_import_bytes"] and mem["rss_last_round_bytes"] > 0
        assert mem["rss_growth_bytes_per_step"] * 2 == pytest.approx(mem["rss_last_round_bytes"] - mem["rss_ready_bytes"])
    # only SaMoE materialises experts from the pool, in forward and again in backward
    assert results["samoe"]["breakdown_ms"].get("materialize (fwd)", 0) > 0
    assert results["samoe"]["breakdown_ms"].get("materialize (bwd)", 0) > 0
    assert results["samoe"]["breakdown_ms"].get("pool/A grad (bwd)", 0) > 0
    assert not any(k.startswith(("materialize", "pool/A")) for k in results["moe"]["breakdown_ms"])
    assert 0 < results["samoe"]["materialise_flops_fraction"] < 1
    assert results["samoe"]["params"]["pool"] > 0 and results["moe"]["params"]["pool"] == 0

    assert sorted((r["numerator"], r["denominator"]) for r in by_type["ratio"]) == [("gmoe", "moe"), ("samoe", "moe")]
    (ratio,) = [r for r in by_type["ratio"] if r["headline"]]
    assert (ratio["numerator"], ratio["denominator"]) == ("samoe", "moe")
    assert ratio["tokens_per_s_ratio"]["n"] == 1 and ratio["tokens_per_s_ratio"]["median"] > 0
    assert ratio["tokens_per_s_ratio"]["rounds"] == [ratio["tokens_per_s_ratio"]["median"]]
    assert ratio["tokens_per_s_ratio"]["median_ci95"] is None  # one round: no interval
    assert ratio["best_step_ratio"] == results["moe"]["step_s"]["min"] / results["samoe"]["step_s"]["min"]
    assert by_type["summary"][0]["samoe_over_moe_tokens_per_s"]["1x1_fp32"] == ratio["tokens_per_s_ratio"]["median"]
    # within the dropless policy, SaMoE over each peer, the fastest one marked
    policy = {r["denominator"]: r for r in by_type["policy_ratio"]}
    assert set(policy) == {"moe", "gmoe"} and all(r["numerator"] == "samoe" for r in policy.values())
    fastest = min(("moe", "gmoe"), key=lambda n: results[n]["step_s"]["median"])
    assert [n for n, r in policy.items() if r["fastest_peer"]] == [fastest]
    assert policy["gmoe"]["best_step_ratio"] == results["gmoe"]["step_s"]["min"] / results["samoe"]["step_s"]["min"]
    assert policy["gmoe"]["phase_ms_delta"] == {k: v - results["gmoe"]["phase_ms"][k]
                                                for k, v in results["samoe"]["phase_ms"].items()}
    mems = {n: results[n]["memory"] for n in ("samoe", "gmoe")}
    assert policy["gmoe"]["peak_total_ratio"] == mems["samoe"]["peak_total_bytes"] / mems["gmoe"]["peak_total_bytes"]

    report = md.read_text()
    assert "| 1x1 | fp32 | samoe |" in report and "| 1x1 | fp32 | gmoe |" in report
    assert "SaMoE against the peers of its token policy" in report
    assert "Headline: SaMoE / megatron MoE" in report and "Step breakdown" in report
    assert "Step phases by wall clock" in report and "| skew |" in report
    rerendered = _report_from(out)
    assert rerendered.returncode == 0, rerendered.stderr[-3000:]
    assert rerendered.stdout == report

    # Runs appended to one file render one after another, each with its own rows: a second run
    # whose samoe (a copy of this one, its tokens/s changed) must not replace the first's row.
    first_row = f"| 1x1 | fp32 | samoe | {results['samoe']['tokens_per_s']['median']:.0f} |"
    second = [dict(r, tokens_per_s=dict(r["tokens_per_s"], median=12345.0))
              if r["type"] == "result" and r["name"] == "samoe" else r for r in records]
    two = tmp_path / "two_runs.jsonl"
    two.write_text(out.read_text() + "".join(json.dumps(r) + "\n" for r in second))
    both = _report_from(two)
    assert both.returncode == 0, both.stderr[-3000:]
    title = "# Training-step throughput: dense, megatron MoE, same-kernel MoE, DeepSpeed MoE, SaMoE"
    assert both.stdout.count(title) == 2 and f"{title} (run 1 of 2)" in both.stdout
    run1, run2 = both.stdout.split(f"{title} (run 2 of 2)")
    assert first_row in run1 and "| 1x1 | fp32 | samoe | 12345 |" in run2 and first_row not in run2
    # a records file cut short mid-line: one line naming the file, the line and the fix
    cut = tmp_path / "cut.jsonl"
    cut.write_text(out.read_text()[:-20])
    bad = _report_from(cut)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert f"{cut} line {len(records)} is not a JSON record" in bad.stderr
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(out.read_text() + '{"loss": 1.0}\n')
    bad = _report_from(foreign)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert f"{foreign} line {len(records) + 1} has no record type" in bad.stderr


def grouped_vs_megatron(groups) -> dict:
    """One forward/backward of the same-kernel peer and of megatron's MoE from the same seed."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from grouped_moe_adapter import build_grouped_moe_model

    from samoe_dist import cpu_compat
    from samoe_dist.arguments import parse_args
    from samoe_dist.model import build_model

    cfg, _ = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
                         "--vocab-size", "64", "--num-experts", "4", "--moe-router-topk", "2", "--swiglu",
                         "--micro-batch-size", "2", "--ds_config", str(REPO / "examples" / "ds_config_cpu.json")])
    cpu_compat.seed_model_parallel(1)
    models = []
    for build in (build_model, build_grouped_moe_model):
        torch.manual_seed(0)
        models.append(build(cfg, groups))
    gen = torch.Generator().manual_seed(1)
    tokens, labels = (torch.randint(0, 64, (2, 16), generator=gen) for _ in range(2))
    losses = []
    for m in models:
        loss, _ = m(tokens, labels, torch.ones(2, 16))
        loss.backward()
        losses.append(float(loss))
    megatron, grouped = models
    from samoe_dist.gradient_flow import expert_grad_sq_norms

    norms = [expert_grad_sq_norms(m.moe_layers, 4, 0, torch.device("cpu")) for m in models]
    out = {"losses": losses, "grad_diff": 0.0, "weight_diff": 0.0,
           "norm_diff": float(((norms[0] - norms[1]).abs() / norms[0]).max())}
    for a, b in zip(megatron.moe_layers, grouped.moe_layers):
        for e, expert in enumerate(a.experts.local_experts):
            fc1, fc1_g = expert.linear_fc1.weight, expert.linear_fc1.weight.grad  # [2f, h]: w1 then w3
            f = fc1.shape[0] // 2
            pairs = [(fc1[:f].t(), b.experts.w1[e]), (fc1[f:].t(), b.experts.w3[e]),
                     (expert.linear_fc2.weight.t(), b.experts.w2[e])]
            grads = [(fc1_g[:f].t(), b.experts.w1.grad[e]), (fc1_g[f:].t(), b.experts.w3.grad[e]),
                     (expert.linear_fc2.weight.grad.t(), b.experts.w2.grad[e])]
            out["weight_diff"] = max([out["weight_diff"]] + [float((x - y).abs().max()) for x, y in pairs])
            out["grad_diff"] = max([out["grad_diff"]] + [float((x - y).abs().max() / y.abs().max()) for x, y in grads])
    return out


def test_same_kernel_peer_is_megatrons_moe(tmp_path):
    """bench/grouped_moe_adapter.py: megatron's MoE with its experts on SaMoE's grouped-GEMM code
    starts from the same weights, gives the same loss (1e-6 relative) and the same expert gradients
    (1e-5 of each tensor's largest element: fp32 sums of ~100 terms ordered differently by a grouped
    GEMM and a per-expert loop)."""
    from tests.distributed.harness import run_fn

    (res,) = run_fn(1, 1, grouped_vs_megatron, (), tmp_path / "out")
    assert res["weight_diff"] == 0.0
    assert abs(res["losses"][0] - res["losses"][1]) <= 1e-6 * abs(res["losses"][0])
    assert res["grad_diff"] <= 1e-5
    assert res["norm_diff"] <= 1e-5  # the per-expert gradient norms the trainer logs, for stacked experts too


def test_live_tensor_bytes_counts_each_storage_once():
    """The resting-state measure sees a new tensor's bytes, counts a view of it no second time,
    and stops counting it once it is freed."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    try:
        from throughput_worker import live_tensor_bytes
    finally:
        sys.path.remove(str(REPO / "bench"))
    before = live_tensor_bytes()
    big = torch.zeros(1000, 257, dtype=torch.float32)  # 1028000 bytes
    views = [big[1:], big.t(), big.view(-1)]
    with_big = live_tensor_bytes()
    del big, views
    after = live_tensor_bytes()
    # nothing else allocates a tensor in between: the differences are exactly our storage
    assert with_big - before == 1000 * 257 * 4
    assert with_big - after == 1000 * 257 * 4


def test_tp2_systems_are_the_same_run_split_over_two_ranks():
    """dense-tp2 / samoe-tp2 add only TP 2 with sequence parallelism: same model, same global batch."""
    from samoe_dist.arguments import parse_args
    from samoe_dist.config import validate_layout

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import throughput
    finally:
        sys.path.remove(str(REPO / "bench"))
    a = throughput.parse_args(["--quick", "--layouts", "1x2", "--systems", "dense,dense-tp2,samoe,samoe-tp2"])
    for base in ("dense", "samoe"):
        one, two = (throughput.trainer_argv(a, s, 1, 2, "fp32") for s in (base, base + "-tp2"))
        assert two[:len(one)] == one and two[len(one):] == ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
        cfg, _ = parse_args(two)
        assert validate_layout(cfg, 2) == 1 and cfg.training.global_batch_size == parse_args(one)[0].training.global_batch_size


def test_phase_timer_times_are_exclusive(monkeypatch):
    """bench/throughput_worker.PhaseTimer: a reduction nested in backward (or in step) counts once, as
    grad_reduce; the phases and "other" sum to the step. On a fake clock the times are exact."""
    sys.path.insert(0, str(REPO / "bench"))
    import throughput_worker

    clock, faults = [0.0], [0]
    monkeypatch.setattr(throughput_worker.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(throughput_worker, "_minor_faults", lambda: faults[0])

    def work(seconds):  # one fake page fault per 1/16 s of work
        clock[0] += seconds
        faults[0] += int(seconds * 16)

    class Engine:
        def __init__(self, reduce_in_step):
            self.reduce_in_step = reduce_in_step

        def forward(self):
            work(1.0)

        def allreduce_gradients(self):
            work(0.25)

        def backward(self):
            work(2.0)
            if not self.reduce_in_step:
                self.allreduce_gradients()

        def step(self):
            if self.reduce_in_step:
                self.allreduce_gradients()
            work(0.5)

    for reduce_in_step in (False, True):
        engine = Engine(reduce_in_step)
        timer = throughput_worker.PhaseTimer(engine)

        def train_step():
            work(0.125)  # data, loss bookkeeping
            engine.forward()
            engine.backward()
            engine.step()

        _, total, phases, counts = timer.run(train_step)
        assert total == 3.875
        assert phases == {"forward": 1.0, "backward": 2.0, "grad_reduce": 0.25, "optimizer": 0.5, "other": 0.125}
        assert counts == {k: int(v * 16) for k, v in phases.items()}

        # --phase-barrier: the wait before the reduction is its own phase, not the reduction's
        engine = Engine(reduce_in_step)
        timer = throughput_worker.PhaseTimer(engine, barrier=lambda: work(0.0625))
        _, total, phases, counts = timer.run(train_step)
        assert total == 3.9375
        assert counts == {k: int(v * 16) for k, v in phases.items()}
        assert phases == {"forward": 1.0, "backward": 2.0, "grad_reduce": 0.25, "skew": 0.0625, "optimizer": 0.5,
                          "other": 0.125}


def test_median_ci_is_the_sign_test_interval():
    """bench/throughput.median_ci: the order statistics (x_(k), x_(n+1-k)) with the largest k whose
    coverage 1 - 2 P(Binomial(n, 1/2) < k) reaches 95%. Coverages by hand: n = 5, (min, max):
    1 - 2/32 = 0.9375 (too low: no interval); n = 6: 1 - 2/64; n = 12, k = 3: 1 - 2 (1 + 12 + 66)/4096
    = 0.9614 (k = 4 would be 1 - 2 (79 + 220)/4096 = 0.854)."""
    sys.path.insert(0, str(REPO / "bench"))
    import throughput

    assert throughput.median_ci([1.0, 2, 3, 4, 5]) is None
    assert throughput.median_ci([6.0, 1, 5, 2, 4, 3]) == (1, 6, 1 - 2 / 64)
    values = [0.5 + 0.1 * i for i in (7, 2, 11, 0, 5, 9, 1, 4, 10, 3, 8, 6)]  # 0.5 .. 1.6, shuffled
    low, high, coverage = throughput.median_ci(values)
    assert (low, high) == (sorted(values)[2], sorted(values)[9]) and abs(coverage - (1 - 158 / 4096)) < 1e-12
    assert throughput.median_ci(values, level=0.8)[:2] == (sorted(values)[3], sorted(values)[8])
