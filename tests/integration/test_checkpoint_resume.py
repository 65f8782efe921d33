"""--save/--load through the DeepSpeed engine: a resumed run continues where the first stopped."""

from __future__ import annotations

from tests.helpers import read_metrics, run_launcher, tiny_model_args


def test_resume_continues_the_same_run(tmp_path, tiny_corpus):
    corpus, tok = tiny_corpus
    common = ["--num-experts", "4", "--samoe-pool-size", "2", "--micro-batch-size", "2",
              "--global-batch-size", "8", "--lr", "3e-3", "--train-iters", "8", "--lr-warmup-iters", "2"]
    full = tmp_path / "full.jsonl"
    run = run_launcher(2, tiny_model_args(tmp_path, corpus, tok, *common, "--metrics-file", str(full)))
    assert run.returncode == 0, run.stderr[-3000:]

    ckpt = tmp_path / "ckpt"
    first = tmp_path / "first.jsonl"
    run = run_launcher(2, tiny_model_args(tmp_path, corpus, tok, *common, "--metrics-file", str(first),
                                          "--save", str(ckpt), "--save-interval", "4", "--exit-interval", "4"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    second = tmp_path / "second.jsonl"
    run = run_launcher(2, tiny_model_args(tmp_path, corpus, tok, *common, "--metrics-file", str(second),
                                          "--load", str(ckpt)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from" in run.stdout + run.stderr

    want = [(r["iteration"], r["consumed_samples"], r["lm_loss"]) for r in read_metrics(full, "train")]
    got = [(r["iteration"], r["consumed_samples"], r["lm_loss"])
           for r in read_metrics(first, "train") + read_metrics(second, "train")]
    assert [w[:2] for w in want] == [g[:2] for g in got]
    for (_, _, a), (_, _, b) in zip(want, got):
        assert abs(a - b) <= 1e-6 * abs(a), (want, got)
