"""tools/eval_zeroshot.py and tools/eval_ppl.py end to end, on a checkpoint trained from the CLI.

A tiny SaMoE model trains for a few steps with the real launcher and saves; the zero-shot tool runs
two tasks with --limit on it (lm-eval, local data) and writes lm-eval's results JSON; the
perplexity tool gives the same numbers for the checkpoint and for its export.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest

from tests.helpers import REPO, run_launcher, run_tool, tiny_model_args

import lm_eval  # noqa: E402,F401  lm-eval is a pinned test dependency (setup.py [dev]): missing, these tests fail

LIMIT = 8


def tool(name: str, *argv: str) -> subprocess.CompletedProcess:
    return run_tool(name, [*argv, "--no-progress"], timeout=300)


def tool_main(name: str, *argv: str) -> int:
    """The tool's main() in this process (saves an interpreter start where the CLI is already covered)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([*argv, "--no-progress"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_corpus):
    tmp = tmp_path_factory.mktemp("eval_ckpt")
    corpus, tok = tiny_corpus
    run = run_launcher(1, tiny_model_args(tmp, corpus, tok, "--num-experts", "4", "--samoe-pool-size", "2",
                                          "--micro-batch-size", "4", "--global-batch-size", "4", "--lr", "3e-3",
                                          "--train-iters", "3", "--save", str(tmp / "ckpt")))
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp


def test_zero_shot_tool_writes_lm_eval_results(trained, capsys):
    out = trained / "zeroshot.json"
    run = tool("eval_zeroshot", "--load", str(trained / "ckpt"), "--tasks", "piqa,arc_easy", "--limit", str(LIMIT),
               "--batch-size", "8", "--output", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results["results"]) == ["piqa", "arc_easy"]
    for task in ("piqa", "arc_easy"):
        metrics = results["results"][task]
        for metric in ("acc", "acc_norm"):
            assert 0.0 <= metrics[f"{metric},none"] <= 1.0
            assert isinstance(metrics[f"{metric}_stderr,none"], float) and metrics[f"{metric}_stderr,none"] >= 0
        assert results["n-samples"][task]["effective"] == LIMIT
        assert results["configs"][task]["dataset_kwargs"]["split"] == "validation"
    assert results["n-samples"]["piqa"]["original"] == 1838
    assert results["config"]["samoe"]["kind"] == "samoe" and results["config"]["samoe"]["format"] == "training"
    assert results["config"]["limit"] == LIMIT
    # the table on stdout: one row per task and metric
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| piqa ", "| arc_easy "))]
    assert len(rows) == 4 and all(f"| {LIMIT} |" in r for r in rows)
    # --output is never replaced silently; the error is one line
    assert tool_main("eval_zeroshot", "--load", str(trained / "ckpt"), "--tasks", "piqa", "--output", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval_zeroshot.py: error: --output") and "pass --overwrite" in err
    assert len(err.splitlines()) == 1


def test_perplexity_tool_agrees_for_checkpoint_and_export(trained, tiny_corpus):
    corpus, _ = tiny_corpus
    exported = trained / "plain" / "model.safetensors"
    conv = run_tool("convert_checkpoint", ["export", "--load", str(trained / "ckpt"), "--output", str(exported)])
    assert conv.returncode == 0, conv.stderr
    flags = ["--input", str(corpus), "--limit", "20", "--stride", "16"]
    run = tool("eval_ppl", "--load", str(trained / "ckpt"), *flags, "--output", str(trained / "ppl_ckpt.json"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert tool_main("eval_ppl", "--load", str(exported), *flags, "--output", str(trained / "ppl_plain.json")) == 0
    a, b = (json.loads((trained / f"ppl_{name}.json").read_text()) for name in ("ckpt", "plain"))
    assert a["model"]["format"] == "training" and b["model"]["format"] == "exported"
    assert a["documents"] == b["documents"] == 20 and a["tokens"] == b["tokens"] > 0 and a["bytes"] == b["bytes"]
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)
    assert a["bits_per_byte"] == pytest.approx(b["bits_per_byte"], rel=1e-6)
    # a few steps of training already beat the uniform guess over the vocabulary
    assert a["perplexity"] < a["model"]["vocab_size"]
