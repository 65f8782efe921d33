"""Checkpoint safety: a kill during a save, SIGTERM, a NaN loss, a mismatched --load, pruning."""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest

from tests.helpers import error_lines, read_metrics, run_launcher, start_direct, tiny_model_args

SAMOE = ["--num-experts", "4", "--samoe-pool-size", "2", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--lr", "3e-3", "--eval-iters", "1", "--lr-decay-iters", "6"]  # a schedule that --train-iters does not move
MOE = [*SAMOE[:2], *SAMOE[4:]]  # the same without the pool: a standard MoE


def _args(tmp, corpus, tok, *extra):
    return tiny_model_args(tmp, corpus, tok, *SAMOE, *extra)


# The tests that only load a checkpoint share one save per layout (a copy each, so none sees another's
# changes): SaMoE, 2 iterations, 1 process at EP=1 and 2 processes at EP=2.
@pytest.fixture(scope="module")
def saved_ep1(tmp_path_factory, tiny_corpus):
    tmp = tmp_path_factory.mktemp("saved_ep1")
    run = run_launcher(1, _args(tmp, *tiny_corpus, "--train-iters", "2", "--save", str(tmp / "ckpt")))
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "ckpt"


@pytest.fixture(scope="module")
def saved_ep2(tmp_path_factory, tiny_corpus):
    tmp = tmp_path_factory.mktemp("saved_ep2")
    run = run_launcher(2, _args(tmp, *tiny_corpus, "--train-iters", "2", "--save", str(tmp / "ckpt"),
                                "--expert-model-parallel-size", "2"))
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "ckpt"


def _copy(ckpt, tmp_path):
    return shutil.copytree(ckpt, tmp_path / "ckpt")


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path, tiny_corpus):
    ckpt = tmp_path / "ckpt"
    args = _args(tmp_path, *tiny_corpus, "--train-iters", "6", "--save", str(ckpt), "--save-interval", "2")
    proc = start_direct(args, SAMOE_FAULT_KILL_IN_SAVE="4")  # killed inside the save of iteration 4, before the rename
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert (ckpt / "latest").read_text() == "iter_0000002"
    assert (ckpt / "iter_0000004.partial").is_dir() and not (ckpt / "iter_0000004").exists()
    # the previous checkpoint loads and training continues from it; the next save replaces the debris
    metrics = tmp_path / "resumed.jsonl"
    proc = start_direct(_args(tmp_path, *tiny_corpus, "--train-iters", "6", "--save", str(ckpt),
                              "--save-interval", "2", "--load", str(ckpt), "--metrics-file", str(metrics)))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert [r["iteration"] for r in read_metrics(metrics, "train")] == [3, 4, 5, 6]
    assert (ckpt / "latest").read_text() == "iter_0000006"
    assert not (ckpt / "iter_0000004.partial").exists() and (ckpt / "iter_0000004" / "model.safetensors").is_file()


def test_a_rank_killed_during_a_two_rank_save_keeps_the_previous_checkpoint(tmp_path, tiny_corpus):
    """World 2 (EP=2, ZeRO-1): rank 1 is SIGKILLed in the save of iteration 4, after DeepSpeed's files
    and before its own, while rank 0 writes its part and waits for it. 'latest' still names
    iteration 2; resuming from it at world 2 gives the per-step losses of an uninterrupted world-2
    run bitwise (fp32 on CPU, the same layout, so the same sums in the same order; dropout on, so
    the restored RNG states count too), and its own save of iteration 4 replaces the debris."""
    ckpt = tmp_path / "ckpt"

    def args(name, *extra):
        return _args(tmp_path, *tiny_corpus, "--train-iters", "6", "--expert-model-parallel-size", "2",
                     "--hidden-dropout", "0.1", "--metrics-file", str(tmp_path / f"{name}.jsonl"), *extra)

    saving = ["--save", str(ckpt), "--save-interval", "2"]
    full = run_launcher(2, args("full"))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_launcher(2, args("killed", *saving), SAMOE_FAULT_KILL_IN_SAVE="4:1")
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert (ckpt / "latest").read_text() == "iter_0000002"
    partial = ckpt / "iter_0000004.partial"
    assert not (ckpt / "iter_0000004").exists() and partial.is_dir()
    # rank 1 died inside the save: after DeepSpeed wrote its ZeRO partition, before its RNG file
    assert (partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    assert not (partial / "rng_rank1.pt").exists()
    resumed = run_launcher(2, args("resumed", *saving, "--load", str(ckpt)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at iteration 2 (8 samples consumed)" in resumed.stdout + resumed.stderr

    keys = ("iteration", "consumed_samples", "lm_loss", "load_balancing_loss", "grad_norm")
    rows = {name: [tuple(r[k] for k in keys) for r in read_metrics(tmp_path / f"{name}.jsonl", "train")]
            for name in ("full", "killed", "resumed")}
    assert [r[0] for r in rows["full"]] == [1, 2, 3, 4, 5, 6]
    assert rows["killed"] == rows["full"][:4]  # it got as far as the save of iteration 4
    assert rows["resumed"] == rows["full"][2:]
    final = {name: read_metrics(tmp_path / f"{name}.jsonl", "final")[0]["final_valid_loss"]
             for name in ("full", "resumed")}
    assert final["resumed"] == final["full"]
    assert (ckpt / "latest").read_text() == "iter_0000006"
    assert not partial.exists() and (ckpt / "iter_0000004" / "rng_rank1.pt").is_file()


def test_sigterm_saves_then_exits(tmp_path, tiny_corpus):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    proc = start_direct(_args(tmp_path, *tiny_corpus, "--train-iters", "100000", "--save", str(ckpt),
                              "--metrics-file", str(metrics)))
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and '"type": "train"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    exit_rec = read_metrics(metrics, "exit")[-1]
    assert exit_rec["reason"] == "SIGTERM received"
    tag = (ckpt / "latest").read_text()
    assert tag == f"iter_{exit_rec['iteration']:07d}"
    assert json.loads((ckpt / tag / "client_state.json").read_text())["iteration"] == exit_rec["iteration"]


def test_nan_loss_stops_naming_the_step(tmp_path, tiny_corpus):
    ckpt = tmp_path / "ckpt"
    # an absurd learning rate: the first update sends the weights to ~1e30 and the loss to inf/NaN
    proc = start_direct(_args(tmp_path, *tiny_corpus, "--train-iters", "5", "--lr", "1e30", "--min-lr", "0",
                              "--lr-warmup-iters", "0", "--clip-grad", "0", "--save", str(ckpt),
                              "--save-interval", "1"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    errors = error_lines(out)
    assert len(errors) == 1 and "at iteration 2" in errors[0] and "checkpoint" in errors[0], out[-2000:]
    assert (ckpt / "latest").read_text() == "iter_0000001"  # the last good one


def test_keep_last_checkpoints_and_exit_duration(tmp_path, tiny_corpus):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    run = run_launcher(1, _args(tmp_path, *tiny_corpus, "--train-iters", "5", "--save", str(ckpt),
                                "--save-interval", "1", "--keep-last-checkpoints", "2"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_")) == ["iter_0000004", "iter_0000005"]
    run = run_launcher(1, _args(tmp_path, *tiny_corpus, "--train-iters", "1000", "--exit-duration-in-mins", "0.0001",
                                "--metrics-file", str(metrics)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert read_metrics(metrics, "exit")[-1]["reason"].startswith("--exit-duration-in-mins")


@pytest.mark.parametrize("change, message", [
    (["--hidden-size", "64"], "--hidden-size: checkpoint 32, now 64"),
    (["--samoe-pool-size", "3"], "--samoe-pool-size: checkpoint 2, now 3"),
    (["--expert-model-parallel-size", "1", "--num-experts", "4"], None),  # same model: loads
])
def test_load_checks_the_model_config(tmp_path, tiny_corpus, saved_ep1, change, message):
    ckpt = _copy(saved_ep1, tmp_path)
    run = run_launcher(1, _args(tmp_path, *tiny_corpus, "--train-iters", "3", "--load", str(ckpt), *change))
    if message is None:
        assert run.returncode == 0, run.stderr[-3000:]
        return
    errors = error_lines(run.stderr)
    assert run.returncode != 0 and len(errors) == 1 and message in errors[0], run.stderr[-3000:]
    assert "Traceback" not in run.stderr


def test_load_refuses_another_layout_naming_the_converter(tmp_path, tiny_corpus, saved_ep2):
    ckpt = _copy(saved_ep2, tmp_path)
    run = run_launcher(1, _args(tmp_path, *tiny_corpus, "--train-iters", "3", "--load", str(ckpt)))
    errors = error_lines(run.stderr)
    assert run.returncode != 0 and len(errors) == 1, run.stderr[-3000:]
    assert "expert-parallel size 2" in errors[0] and "tools/convert_checkpoint.py reshard" in errors[0]


def test_changed_optimizer_flags_on_load_are_refused_applied_or_ignored_as_told(tmp_path, tiny_corpus, saved_ep1):
    """Megatron's choice: a learning-rate flag that differs from the checkpoint's is an error naming
    it, unless --override-opt-param-scheduler (the new value is used: the logged lr is the new
    schedule's) or --use-checkpoint-opt-param-scheduler (the checkpoint's schedule continues)."""
    from samoe_dist.arguments import parse_args
    from samoe_dist.optim import lr_at

    ckpt = _copy(saved_ep1, tmp_path)
    base = _args(tmp_path, *tiny_corpus, "--train-iters", "2", "--save", str(ckpt))  # how saved_ep1 was written

    def resume(name, *extra):
        metrics = tmp_path / f"{name}.jsonl"
        args = _args(tmp_path, *tiny_corpus, "--train-iters", "3", "--load", str(ckpt), "--lr-warmup-iters", "1",
                     "--metrics-file", str(metrics), "--lr", "1e-3", "--min-lr", "1e-5", *extra)
        return run_launcher(1, args), metrics, parse_args(args)[0].training

    run, _, _ = resume("refused")
    errors = error_lines(run.stderr)
    assert run.returncode != 0 and len(errors) == 1, run.stderr[-3000:]
    for part in ("--lr checkpoint 0.003, now 0.001", "--min-lr checkpoint 0.0001, now 1e-05",
                 "--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"):
        assert part in errors[0], errors
    run, metrics, new = resume("override", "--override-opt-param-scheduler")
    assert run.returncode == 0, run.stderr[-3000:]
    (step3,) = read_metrics(metrics, "train")
    assert step3["iteration"] == 3 and step3["lr"] == pytest.approx(lr_at(2, new), rel=1e-12)
    run, metrics, _ = resume("kept", "--use-checkpoint-opt-param-scheduler")
    assert run.returncode == 0, run.stderr[-3000:]
    old = parse_args(base)[0].training
    (step3,) = read_metrics(metrics, "train")
    assert step3["lr"] == pytest.approx(lr_at(2, old), rel=1e-12) and lr_at(2, old) != lr_at(2, new)


def test_resume_on_other_data_is_refused_unless_allowed(tmp_path, tiny_corpus, saved_ep1):
    """The checkpoint records its data (prefixes and sizes, split, seed, sequence length, tokenizer
    hash): another split is refused naming it, and accepted with --allow-data-change."""
    ckpt = _copy(saved_ep1, tmp_path)
    fingerprint = json.loads((ckpt / "iter_0000002" / "config.json").read_text())["data_fingerprint"]
    assert fingerprint["split"] == "969,30,1" and len(fingerprint["tokenizer_sha256"]) == 64
    assert all(size > 0 for size in fingerprint["file_bytes"].values())
    other = _args(tmp_path, *tiny_corpus, "--train-iters", "3", "--load", str(ckpt), "--split", "900,100,0")
    run = run_launcher(1, other)
    errors = error_lines(run.stderr)
    assert run.returncode != 0 and len(errors) == 1, run.stderr[-3000:]
    assert "split: checkpoint 969,30,1, now 900,100,0" in errors[0] and "--allow-data-change" in errors[0]
    run = run_launcher(1, [*other, "--allow-data-change"])
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("kind, victim", [
    ("samoe", "rng_rank1.pt"), ("samoe", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    ("samoe", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    # a standard MoE: DeepSpeed's per-expert file of expert 3 (layer 0: the model's one DeepSpeed MoE
    # marker, samoe_dist/ds_moe_marker.py), which only EP rank 1 reads
    ("moe", "layer_0_expert_3_mp_rank_00_model_states.pt"),
])
def test_a_missing_checkpoint_file_is_named(tmp_path, tiny_corpus, saved_ep2, kind, victim):
    """2 ranks, EP=2, ZeRO-1: with one file of the checkpoint deleted, the resume fails before
    DeepSpeed reads anything, with one line naming that file (no gloo 'connection closed')."""
    flags = SAMOE if kind == "samoe" else MOE

    def args(*extra):
        return tiny_model_args(tmp_path, *tiny_corpus, *flags, "--expert-model-parallel-size", "2", *extra)

    if kind == "samoe":
        ckpt = _copy(saved_ep2, tmp_path)
    else:
        ckpt = tmp_path / "ckpt"
        run = run_launcher(2, args("--train-iters", "2", "--save", str(ckpt)))
        assert run.returncode == 0, run.stderr[-3000:]
    (ckpt / "iter_0000002" / victim).unlink()
    run = run_launcher(2, args("--train-iters", "3", "--load", str(ckpt)))
    errors = error_lines(run.stderr)
    assert run.returncode != 0 and len(errors) == 1, run.stderr[-3000:]
    assert f"1 file(s) missing: {victim}" in errors[0] and "earlier complete checkpoint" in errors[0]
    assert "Connection closed" not in run.stderr and "Traceback" not in run.stderr


def test_save_refuses_to_overwrite_another_runs_checkpoints(tmp_path, tiny_corpus, saved_ep1):
    """--save into a directory holding another run's checkpoints, without --load of it, is refused
    before anything is written (its 'latest' and files untouched); --overwrite-checkpoints allows it."""
    ckpt = _copy(saved_ep1, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (ckpt / "iter_0000002").iterdir()}
    other = tiny_model_args(tmp_path, *tiny_corpus, "--micro-batch-size", "2", "--train-iters", "1",
                            "--save", str(ckpt))
    run = run_launcher(1, other)  # a dense model into the SaMoE run's directory
    errors = error_lines(run.stderr)
    assert run.returncode != 0 and len(errors) == 1, run.stderr[-3000:]
    assert "latest iter_0000002, a samoe model" in errors[0] and "--overwrite-checkpoints" in errors[0]
    assert (ckpt / "latest").read_text() == "iter_0000002"
    assert {p.name: p.stat().st_mtime_ns for p in (ckpt / "iter_0000002").iterdir()} == before
    run = run_launcher(1, [*other, "--overwrite-checkpoints"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert (ckpt / "latest").read_text() == "iter_0000001"
