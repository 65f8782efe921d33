"""The plain PyTorch model reproduces the training model, and the conversions keep every weight.

The training model (megatron-core GPTModel, dense / standard MoE / SaMoE) is built in-process at
EP=1, its weights perturbed so no norm weight or bias keeps its trivial init, and written as a
training checkpoint's ``model.safetensors`` + ``config.json``; ``export`` turns that into the
plain model, whose logits must equal the training model's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samoe_dist.export import PlainGPT
from samoe_dist.export.convert import ConversionError, export, import_plain, reshard
from tests.helpers import build_training_model, convert_tool, write_checkpoint

REPO = Path(__file__).resolve().parents[2]
SAMOE = ["--num-experts", "4", "--samoe-pool-size", "3"]

CASES = {
    "dense-gelu-rope-layernorm": [],
    "dense-swiglu-learned-rmsnorm-untied": ["--swiglu", "--position-embedding-type", "learned_absolute",
                                            "--normalization", "RMSNorm", "--untie-embeddings-and-output-weights"],
    "moe-top1-rope-every-2nd-layer": ["--num-experts", "4", "--moe-router-topk", "1", "--moe-layer-freq", "2",
                                      "--num-layers", "3"],
    "moe-top2-swiglu-learned-topk-softmax": ["--num-experts", "4", "--moe-router-topk", "2", "--swiglu",
                                             "--no-moe-router-pre-softmax", "--position-embedding-type",
                                             "learned_absolute", "--moe-ffn-hidden-size", "24"],
    "samoe-dense-combination-rope": [*SAMOE, "--samoe-temperature", "0.5", "--samoe-init", "random"],
    "samoe-top-m-swiglu-learned-rmsnorm": [*SAMOE, "--samoe-top-m", "2", "--swiglu", "--normalization", "RMSNorm",
                                           "--position-embedding-type", "learned_absolute", "--samoe-init", "random"],
    "samoe-linear-combination": [*SAMOE, "--samoe-combination", "linear"],
    "shared-routing-top1-swiglu": ["--num-experts", "4", "--samoe-pool-size", "4", "--samoe-route-to-pool",
                                   "--moe-router-topk", "1", "--swiglu"],
}


def tokens(batch: int = 3, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("case", list(CASES))
def test_plain_model_reproduces_training_logits(seeded, tmp_path, case):
    model, cfg, groups = build_training_model(CASES[case])
    write_checkpoint(tmp_path / "ckpt", model, cfg, groups)
    weights, config = export(str(tmp_path / "ckpt"), str(tmp_path / "plain" / "model.safetensors"))
    assert config == tmp_path / "plain" / "model.json"
    plain = PlainGPT.from_pretrained(weights)
    assert plain.config.kind == cfg.kind
    x = tokens()
    with torch.no_grad():
        want = model.logits(x)  # [b, s, V]
        got = plain.logits(x)
    assert got.shape == want.shape == (3, 16, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the first positions do not see the later ones (causal), in the plain model too
    torch.testing.assert_close(plain.logits(x[:, :5]), got[:, :5], atol=1e-5, rtol=1e-5)


def test_export_import_round_trip_is_byte_identical(seeded, tmp_path):
    from samoe_dist.checkpoint import check_config, load_consolidated_state
    from safetensors.torch import load_file

    model, cfg, groups = build_training_model([*SAMOE, "--swiglu", "--samoe-top-m", "2"])
    tag_dir = write_checkpoint(tmp_path / "ckpt", model, cfg, groups)
    export(str(tmp_path / "ckpt"), str(tmp_path / "plain.safetensors"))
    new_tag = import_plain(str(tmp_path / "plain.safetensors"), str(tmp_path / "imported"))
    assert sorted(p.name for p in new_tag.iterdir()) == ["config.json", "model.safetensors"]  # weights only
    assert (tmp_path / "imported" / "latest").read_text() == new_tag.name
    assert (new_tag / "model.safetensors").read_bytes() == (tag_dir / "model.safetensors").read_bytes()
    saved = json.loads((new_tag / "config.json").read_text())
    check_config(saved, cfg, str(new_tag))  # every shape-defining flag as trained
    assert saved["model"]["seq_length"] == cfg.model.seq_length and saved["layout"] == {"world_size": 1, "ep_size": 1}
    # the trainer's loader takes it into a freshly initialised model, which then matches exactly
    fresh, _, _ = build_training_model([*SAMOE, "--swiglu", "--samoe-top-m", "2", "--seed", "99"])
    load_consolidated_state(fresh, cfg, groups, load_file(str(new_tag / "model.safetensors")), "imported")
    with torch.no_grad():
        assert torch.equal(fresh.logits(tokens()), model.logits(tokens()))


def test_plain_model_save_and_load_keep_the_logits(seeded, tmp_path):
    model, cfg, groups = build_training_model(CASES["moe-top2-swiglu-learned-topk-softmax"])
    write_checkpoint(tmp_path / "ckpt", model, cfg, groups)
    plain = PlainGPT.from_pretrained(export(str(tmp_path / "ckpt"), str(tmp_path / "a"))[0])
    plain.save_pretrained(tmp_path / "b")
    again = PlainGPT.from_pretrained(tmp_path / "b")
    assert torch.equal(again.logits(tokens()), plain.logits(tokens()))


def test_generate_is_seeded_and_greedy_is_argmax(seeded, tmp_path):
    model, cfg, groups = build_training_model(CASES["samoe-dense-combination-rope"])
    write_checkpoint(tmp_path / "ckpt", model, cfg, groups)
    plain = PlainGPT.from_pretrained(export(str(tmp_path / "ckpt"), str(tmp_path / "p"))[0])
    prompt = tokens(2, 4)
    a = plain.generate(prompt, 20, temperature=2.0, seed=5)
    b = plain.generate(prompt, 20, temperature=2.0, seed=5)
    c = plain.generate(prompt, 20, temperature=2.0, seed=6)
    assert a.shape == (2, 24) and torch.equal(a[:, :4], prompt)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = plain.generate(prompt, 20, temperature=0)  # longer than max_position_embeddings 16: cropped
    for t in range(4, 24):
        context = greedy[:, max(0, t - 16):t]
        assert torch.equal(greedy[:, t], plain.logits(context)[:, -1].argmax(-1))
    assert torch.equal(plain.generate(prompt, 8, temperature=1.0, top_k=1, seed=1), greedy[:, :12])


def test_plain_combination_weights_match_samoe(seeded):
    from samoe_dist.export.plain_gpt import combination_weights as plain_weights
    from samoe_dist.samoe.combination import combination_weights

    logits = torch.randn(5, 6)
    for top_m in (0, 1, 3, 6):
        torch.testing.assert_close(plain_weights(logits, 0.7, top_m), combination_weights(logits, 0.7, top_m))


def test_plain_model_file_runs_on_its_own(seeded, tmp_path):
    """plain_gpt.py copied alone imports no megatron, DeepSpeed or samoe_dist, and loads an export."""
    model, cfg, groups = build_training_model(CASES["samoe-top-m-swiglu-learned-rmsnorm"])
    write_checkpoint(tmp_path / "ckpt", model, cfg, groups)
    weights, _ = export(str(tmp_path / "ckpt"), str(tmp_path / "m.safetensors"))
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(REPO / "samoe_dist" / "export" / "plain_gpt.py", alone)
    code = ("import sys, torch, plain_gpt; m = plain_gpt.PlainGPT.from_pretrained(sys.argv[1]); "
            "print(float(m.logits(torch.arange(8).view(1, 8)).sum())); "
            "bad = [n for n in sys.modules if n.split('.')[0] in ('megatron', 'deepspeed', 'samoe_dist')]; "
            "assert not bad, bad")
    run = subprocess.run([sys.executable, "-c", code, str(weights)], cwd=alone, capture_output=True, text=True,
                         env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(alone)})
    assert run.returncode == 0, run.stderr
    with torch.no_grad():
        want = float(model.logits(torch.arange(8).view(1, 8)).sum())
    assert abs(float(run.stdout) - want) <= 1e-4 * max(1.0, abs(want))


# -- bad input: one clear message each ------------------------------------------------------------------
@pytest.fixture
def checkpoint(seeded, tmp_path):
    model, cfg, groups = build_training_model(SAMOE)
    return write_checkpoint(tmp_path / "ckpt", model, cfg, groups)


def _error(capsys, argv: list[str]) -> str:
    assert convert_tool().main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("convert_checkpoint.py"), err
    return err


def test_bad_inputs_end_with_one_clear_message(checkpoint, tmp_path, capsys):
    ckpt = str(checkpoint.parent)
    new = str(tmp_path / "new")
    assert "no such directory" in _error(capsys, ["reshard", "--load", str(tmp_path / "nope"), "--save", new])
    (tmp_path / "empty").mkdir()
    assert "not a samoe checkpoint" in _error(capsys, ["export", "--load", str(tmp_path / "empty"), "--output", new])
    err = _error(capsys, ["reshard", "--load", ckpt, "--save", new, "--expert-model-parallel-size", "3"])
    assert "--expert-model-parallel-size 3 does not divide the checkpoint's --num-experts 4" in err
    err = _error(capsys, ["reshard", "--load", ckpt, "--save", new, "--expert-model-parallel-size", "2",
                          "--world-size", "3"])
    assert "does not divide --world-size 3" in err
    assert "already exists and is not empty" in _error(capsys, ["reshard", "--load", ckpt, "--save", ckpt])
    assert not Path(new).exists()  # nothing written by a failed conversion

    config = checkpoint / "config.json"
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({**saved, "model": {**saved["model"], "hidden_size": 64}}))
    err = _error(capsys, ["export", "--load", ckpt, "--output", str(tmp_path / "x.safetensors")])
    assert "does not match" in err and "with another shape" in err
    config.write_text(json.dumps({**saved, "samoe": {**saved["samoe"], "samoe_pool_size": None}}))
    err = _error(capsys, ["reshard", "--load", ckpt, "--save", new])
    assert "does not match" in err and "missing" in err and "unexpected" in err
    config.write_text("{not json")
    assert "is not valid JSON" in _error(capsys, ["reshard", "--load", ckpt, "--save", new])
    config.write_text(json.dumps(saved))

    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in _error(capsys, ["reshard", "--load", ckpt, "--save", new])
    weights.write_bytes(data)
    (checkpoint.parent / "latest").write_text("iter_0000009")
    assert "incomplete" in _error(capsys, ["reshard", "--load", ckpt, "--save", new])
    (checkpoint.parent / "latest").write_text(checkpoint.name)

    assert convert_tool().main(["export", "--load", ckpt, "--output", str(tmp_path / "e.safetensors")]) == 0
    assert "pass --overwrite" in _error(capsys, ["export", "--load", ckpt, "--output", str(tmp_path / "e.safetensors")])
    meta = json.loads((tmp_path / "e.json").read_text())
    (tmp_path / "e.json").write_text(json.dumps({**meta, "num_layers": 3}))
    assert "does not match" in _error(capsys, ["import", "--input", str(tmp_path / "e.safetensors"), "--save", new])
    assert not Path(new).exists()


def test_reshard_writes_a_weights_only_checkpoint(checkpoint, tmp_path):
    new_tag = reshard(str(checkpoint.parent), str(tmp_path / "ep2"), ep=2, world_size=4)
    assert new_tag == tmp_path / "ep2" / checkpoint.name
    assert sorted(p.name for p in new_tag.iterdir()) == ["config.json", "model.safetensors"]
    assert (new_tag / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    saved = json.loads((new_tag / "config.json").read_text())
    assert saved["layout"] == {"world_size": 4, "ep_size": 2} and saved["parallel"]["expert_model_parallel_size"] == 2
    assert saved["converted_from"]["iteration"] == 3 and saved["converted_from"]["consumed_samples"] == 24
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    with pytest.raises(ConversionError, match="dense model"):
        model, cfg, groups = build_training_model([])
        reshard(str(write_checkpoint(tmp_path / "dense", model, cfg, groups).parent), str(tmp_path / "d2"), ep=2)
