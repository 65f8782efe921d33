"""The data tools as a user runs them: train_tokenizer.py -> preprocess_data.py (2 workers) ->
pretrain_samoe.py on a weighted blend of two prefixes with 2 processes; a truncated .bin stops the
trainer with one line."""

from __future__ import annotations

import json
import subprocess
import sys

from samoe_dist.data.testing import REPO, synthetic_documents
from tests.helpers import error_lines, read_metrics, run_launcher


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_tools_then_pretrain_on_a_blend(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:  # two fields, two datasets: the blend's parts
        for text, summary in zip(synthetic_documents(300, seed=5), synthetic_documents(300, seed=6)):
            f.write(json.dumps({"text": text, "summary": summary}) + "\n")
    run = tool("train_tokenizer", "--input", str(corpus), "--json-keys", "text", "summary", "--model-prefix",
               str(tmp_path / "spm"), "--vocab-size", "300", "--no-progress")
    assert run.returncode == 0, run.stderr
    run = tool("preprocess_data", "--input", str(corpus), "--json-keys", "text", "summary", "--output-prefix",
               str(tmp_path / "corpus"), "--tokenizer-model", str(tmp_path / "spm.model"), "--append-eod",
               "--workers", "2", "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "300 documents" in run.stdout and "documents/s" in run.stdout
    text, summary = tmp_path / "corpus_text_document", tmp_path / "corpus_summary_document"

    metrics = tmp_path / "metrics.jsonl"
    run = run_launcher(2, [
        "--ds_config", str(REPO / "examples/ds_config_cpu.json"), "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", "3", "--lr-warmup-iters", "1", "--eval-iters", "1", "--eval-interval", "0",
        "--log-interval", "1", "--split", "90,10,0", "--data-path", "0.7", str(text), "0.3", str(summary),
        "--metrics-file", str(metrics)])
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert f"data: 0.700 x {text} + 0.300 x {summary}" in log
    assert (tmp_path / "index_cache").is_dir()  # next to the data: no --data-cache-path given
    assert [r["consumed_samples"] for r in read_metrics(metrics, "train")] == [8, 16, 24]
    config = read_metrics(metrics, "config")[0]["config"]
    assert config["model"]["vocab_size"] == 300  # read from the dataset's .meta.json

    data = (tmp_path / "corpus_text_document.bin").read_bytes()
    (tmp_path / "corpus_text_document.bin").write_bytes(data[:-100])
    run = run_launcher(1, ["--ds_config", str(REPO / "examples/ds_config_cpu.json"), "--data-path", str(text),
                           "--train-iters", "1", "--lr-warmup-iters", "0"])
    errors = error_lines(run.stderr)
    assert run.returncode != 0 and len(errors) == 1 and "Traceback" not in run.stderr
    assert f"{text}.bin is truncated: {len(data) - 100} bytes" in errors[0] and "preprocess_data.py" in errors[0]
