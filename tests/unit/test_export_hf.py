"""Hugging Face export: the folder transformers loads computes the training model's logits.

The training model (megatron-core GPTModel: dense, standard MoE, SaMoE, shared routing) is built
in-process at EP=1 with perturbed weights and written as a training checkpoint; ``export-hf`` turns
it into a Hugging Face folder. ``AutoModelForCausalLM`` (samoe format, remote code) or transformers'
own ``MixtralForCausalLM`` (mixtral format) must give the training model's logits (fp32, 1e-5),
generate the plain model's greedy tokens, and ``AutoTokenizer`` must encode as the training tokenizer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samoe_dist.export import PlainGPT
from samoe_dist.export.convert import ConversionError, export
from samoe_dist.export.hf.convert import export_hf
from tests.helpers import build_training_model, convert_tool, write_checkpoint
from tests.unit.test_export import CASES, SAMOE, tokens

MIXTRAL = ["--num-experts", "4", "--moe-router-topk", "2", "--swiglu", "--normalization", "RMSNorm",
           "--no-moe-router-pre-softmax"]
MIXTRAL_CASES = {
    "moe": MIXTRAL,
    "samoe-top-m-untied": [*MIXTRAL, "--samoe-pool-size", "3", "--samoe-init", "random", "--samoe-top-m", "2",
                           "--untie-embeddings-and-output-weights"],
    "samoe-linear": [*MIXTRAL, "--samoe-pool-size", "3", "--samoe-combination", "linear"],
    "shared-routing": [*MIXTRAL, "--samoe-pool-size", "4", "--samoe-route-to-pool"],
}


@pytest.fixture(scope="session")
def tokenizer64(tmp_path_factory):
    """A 64-piece SentencePiece BPE model (the tiny models' vocabulary) on the tiny corpus."""
    from samoe_dist.data.tokenizer import train_tokenizer
    from tests.helpers import make_tiny_corpus

    jsonl, _ = make_tiny_corpus(tmp_path_factory.mktemp("corpus64"))
    return train_tokenizer([jsonl], jsonl.parent / "spm64", vocab_size=64, byte_fallback=False)


def hf_folder(tmp_path, argv, tokenizer, fmt="samoe", name="hf"):
    model, cfg, groups = build_training_model(argv)
    write_checkpoint(tmp_path / "ckpt", model, cfg, groups)
    out = export_hf(str(tmp_path / "ckpt"), str(tmp_path / name), fmt=fmt, tokenizer_model=str(tokenizer))
    return model, out


def load_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()
    # the remote code was copied into the tests' own modules cache (tests/conftest.py), not the home's
    cache = Path(os.environ["HF_MODULES_CACHE"]).resolve()
    assert type(model).__module__.startswith("transformers_modules.")
    assert Path(sys.modules[type(model).__module__].__file__).resolve().is_relative_to(cache)
    assert not cache.is_relative_to(Path.home().resolve() / ".cache")
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_hf_model_reproduces_training_logits(seeded, tmp_path, tokenizer64, case):
    from safetensors import safe_open

    model, out = hf_folder(tmp_path, CASES[case], tokenizer64)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "configuration_samoe.py", "generation_config.json", "model.safetensors", "modeling_samoe.py",
        "samoe_export.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_samoe.SamoeForCausalLM"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    if "--samoe-pool-size" in CASES[case]:  # the pool and the logits as trained: nothing materialised
        assert "model.pool.w1" in names and not any(".experts." in n for n in names)
        assert any(n.endswith("combination_logits") for n in names) == ("--samoe-route-to-pool" not in CASES[case])
    hf = load_hf(out)
    assert type(hf).__name__ == "SamoeForCausalLM"
    x = tokens()
    with torch.no_grad():
        want = model.logits(x)
        got = hf(x).logits
        no_cache = hf(x, use_cache=False).logits
    assert got.shape == want.shape == (3, 16, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(no_cache, got)
    # labels = the inputs, shifted inside the model as transformers' causal LMs do
    with torch.no_grad():
        loss = hf(x, labels=x).loss
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(want[:, :-1].flatten(0, 1), x[:, 1:].flatten()),
                               atol=1e-5, rtol=1e-5)


def _until_eod(row: list[int], start: int, eod: int) -> list[int]:
    """The generated part of ``row`` up to and including its first end-of-document token."""
    new = row[start:]
    return new[: new.index(eod) + 1] if eod in new else new


@pytest.mark.parametrize("case", ["samoe-dense-combination-rope", "moe-top2-swiglu-learned-topk-softmax"])
def test_hf_generate_matches_plain_generate(seeded, tmp_path, tokenizer64, case):
    """Greedy tokens equal PlainGPT.generate's, one prompt at a time and batched with left padding
    (the attention mask and the position ids: rope and learned positions)."""
    model, out = hf_folder(tmp_path, CASES[case], tokenizer64)
    plain = PlainGPT.from_pretrained(export(str(tmp_path / "ckpt"), str(tmp_path / "plain.safetensors"))[0])
    hf = load_hf(out)
    eod = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert eod == 1  # SentencePiece's </s>, samoe's end-of-document
    prompts = [tokens(1, 6)[0], tokens(2, 3)[1], (tokens(1, 4)[0] + 1) % 64]
    new = 10  # 6 + 10 = 16 = max_position_embeddings: no context cropping
    want = [_until_eod(plain.generate(p[None], new, temperature=0)[0].tolist(), len(p), eod) for p in prompts]
    for p, w in zip(prompts, want):
        got = hf.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=new,
                          do_sample=False)[0].tolist()
        assert got[:len(p)] == p.tolist() and _until_eod(got, len(p), eod) == w
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), eod)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as batched generation needs
        batch[i, width - len(p):], mask[i, width - len(p):] = p, 1
    got = hf.generate(batch, attention_mask=mask, max_new_tokens=new, do_sample=False)
    assert [_until_eod(row, width, eod) for row in got.tolist()] == want


def test_hf_model_refuses_positions_beyond_its_learned_embeddings(seeded, tmp_path, tokenizer64):
    """A context longer than max_position_embeddings (16) is one clear error with learned positions,
    not an index error inside the embedding; up to 16 tokens, or 15 cached and 1 new, run."""
    _, out = hf_folder(tmp_path, CASES["dense-swiglu-learned-rmsnorm-untied"], tokenizer64)
    hf = load_hf(out)
    x = tokens(1, 17)
    with torch.no_grad():
        assert hf(x[:, :16]).logits.shape == (1, 16, 64)
        with pytest.raises(ValueError, match="17 positions .* exceed max_position_embeddings 16"):
            hf(x)
        cached = hf(x[:, :15], use_cache=True).past_key_values
        assert hf(x[:, 15:16], past_key_values=cached, use_cache=True).logits.shape == (1, 1, 64)
        with pytest.raises(ValueError, match=r"past 16 \+ new 1"):
            hf(x[:, 16:17], past_key_values=hf(x[:, :16], use_cache=True).past_key_values, use_cache=True)


def test_hf_tokenizer_encodes_as_the_training_tokenizer(tmp_path, tiny_corpus):
    """AutoTokenizer on the folder: the training tokenizer's ids and end-of-document token, byte
    fallback included, with and without trust_remote_code (the tokenizer itself has no code)."""
    from transformers import AutoTokenizer

    from samoe_dist.data.tokenizer import Tokenizer, train_tokenizer
    from samoe_dist.export.hf.convert import hf_tokenizer
    from samoe_dist.data.tokenizers import TokenizerSpec

    corpus, small = tiny_corpus
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:50]]
    texts += ["  two  spaces\n\n\ttab  ", "digits 0123456789", "unicode: naïve 漢字 😀", "</s> and <unk> as text",
              ""]
    byte = train_tokenizer([corpus], tmp_path / "byte", vocab_size=320, byte_fallback=True)
    for model_file in (small, byte):
        ours = Tokenizer(model_file)
        spec = TokenizerSpec(tokenizer_model=str(model_file))
        folder = tmp_path / f"tok_{model_file.stem}"
        hf_tokenizer(ours, spec, 32).save_pretrained(str(folder))
        for kwargs in ({}, {"trust_remote_code": True}):
            hf = AutoTokenizer.from_pretrained(str(folder), **kwargs)
            assert hf.eos_token_id == ours.eod == 1 and hf.bos_token_id is None and hf.pad_token_id == 1
            for text in texts:
                ids = hf.encode(text, add_special_tokens=False)
                assert ids == ours.encode(text), text
                if model_file == byte:  # without byte fallback, unknown characters decode differently
                    assert hf.decode(ids) == ours.decode(ids) == text
    assert Tokenizer(byte).encode("😀") != Tokenizer(small).encode("😀")  # the byte pieces were exercised


def test_hf_tokenizer_from_gpt2_bpe_files(tmp_path):
    """GPT-2's vocab.json + merges.txt (--vocab-file/--merge-file runs) become a byte-level fast tokenizer."""
    from transformers import AutoTokenizer

    from samoe_dist.data.gpt2_bpe import GPT2BPETokenizer
    from samoe_dist.data.testing import write_gpt2_files
    from samoe_dist.data.tokenizers import TokenizerSpec
    from samoe_dist.export.hf.convert import hf_tokenizer

    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "k"), ("i", "n"), ("Ġk", "in"), ("Ġkin", "g")]
    vocab, merge_file = write_gpt2_files(tmp_path, merges)
    ours = GPT2BPETokenizer(vocab, merge_file)
    hf_tokenizer(ours, TokenizerSpec(vocab_file=str(vocab), merge_file=str(merge_file)), 64).save_pretrained(
        str(tmp_path / "out"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert hf.eos_token_id == ours.eod == ours.vocab_size - 1
    for text in ("It's the king's 12 crowns!\n\n  Café ☃ 日本  \t", " the king", "<|endoftext|> as text",
                 "I'll see 42 kings²,  now!"):
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text) and hf.decode(ids) == text
    assert len(hf.encode(" the king", add_special_tokens=False)) == 2  # the merges applied


def test_exported_folder_loads_with_only_torch_and_transformers(seeded, tmp_path, tokenizer64):
    """Loaded from the folder alone: no samoe_dist, megatron or DeepSpeed module is imported."""
    model, out = hf_folder(tmp_path, CASES["samoe-top-m-swiglu-learned-rmsnorm"], tokenizer64, name="alone_hf")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True); "
            "t = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True); "
            "print(float(m(torch.arange(8).view(1, 8)).logits.sum())); "
            "bad = [n for n in sys.modules if n.split('.')[0] in ('megatron', 'deepspeed', 'samoe_dist')]; "
            "assert not bad, bad")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),  # a clean home: its caches are the test's
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with torch.no_grad():
        want = float(model.logits(torch.arange(8).view(1, 8)).sum())
    assert abs(float(run.stdout.strip().splitlines()[-1]) - want) <= 1e-4 * max(1.0, abs(want))


@pytest.mark.parametrize("case", list(MIXTRAL_CASES))
def test_mixtral_export_loads_in_transformers_mixtral(seeded, tmp_path, tokenizer64, case):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    model, out = hf_folder(tmp_path, MIXTRAL_CASES[case], tokenizer64, fmt="mixtral")
    assert not (out / "modeling_samoe.py").exists()
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # no remote code
    assert isinstance(hf, MixtralForCausalLM)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.logits(x), atol=1e-5, rtol=1e-5)


def test_mixtral_export_refuses_other_models_naming_each_flag(seeded, tmp_path, tokenizer64):
    model, cfg, groups = build_training_model(["--num-experts", "4", "--moe-layer-freq", "2",
                                               "--position-embedding-type", "learned_absolute"])
    # the dense model and top-1 are refused too, with their own reasons
    from samoe_dist.export.hf.convert import mixtral_differences
    from samoe_dist.export.names import plain_config

    dense = build_training_model([])[1]
    assert mixtral_differences(plain_config(dense.to_dict()))[0].startswith("a dense model")
    top1 = build_training_model([*MIXTRAL[:2], "--moe-router-topk", "1", *MIXTRAL[4:-1]])[1]
    assert [d.split(" (")[0] for d in mixtral_differences(plain_config(top1.to_dict()))] == [
        "--moe-router-topk 1 with pre-softmax gates"]
    write_checkpoint(tmp_path / "ckpt", model, cfg, groups)
    with pytest.raises(ConversionError) as err:
        export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), fmt="mixtral", tokenizer_model=str(tokenizer64))
    message = str(err.value)
    for flag in ("--moe-layer-freq 1", "--normalization LayerNorm", "no --swiglu",
                 "--position-embedding-type learned_absolute", "--no-moe-router-pre-softmax", "--format samoe"):
        assert flag in message, (flag, message)
    assert "\n" not in message and not (tmp_path / "out").exists()


# -- the command line: one clear line per bad input -----------------------------------------------------
def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # what the test printed before (transformers' progress bars)
    assert convert_tool().main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("convert_checkpoint.py"), err
    return err


def test_export_hf_command_line(seeded, tmp_path, tokenizer64, tiny_corpus, capsys):
    model, cfg, groups = build_training_model(SAMOE)
    ckpt = str(write_checkpoint(tmp_path / "ckpt", model, cfg, groups).parent)
    out = str(tmp_path / "hf")
    err = _error(capsys, ["export-hf", "--load", ckpt, "--output", out])
    assert "records no tokenizer" in err and "--tokenizer-model" in err
    err = _error(capsys, ["export-hf", "--load", ckpt, "--output", out, "--tokenizer-model", str(tiny_corpus[1])])
    assert "has 160 pieces but the model's vocabulary is 64" in err
    assert not Path(out).exists()
    assert convert_tool().main(["export-hf", "--load", ckpt, "--output", out, "--tokenizer-model", str(tokenizer64)]) == 0
    first = (Path(out) / "model.safetensors").read_bytes()
    err = _error(capsys, ["export-hf", "--load", ckpt, "--output", out, "--tokenizer-model", str(tokenizer64)])
    assert "exists and is not empty: pass --overwrite" in err
    (Path(out) / "stale.txt").write_text("from before")
    assert convert_tool().main(["export-hf", "--load", ckpt, "--output", out, "--tokenizer-model", str(tokenizer64),
                         "--overwrite"]) == 0
    assert not (Path(out) / "stale.txt").exists() and (Path(out) / "model.safetensors").read_bytes() == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    err = _error(capsys, ["export-hf", "--load", ckpt, "--output", str(tmp_path / "m"), "--format", "mixtral",
                          "--tokenizer-model", str(tokenizer64)])
    assert "is not a Mixtral model" in err and "--format samoe" in err


# -- import-hf: a Mixtral folder into a training checkpoint ---------------------------------------------
def tiny_mixtral(folder: Path, vocab: int = 64, max_positions: int = 16, fused: bool = False, **overrides):
    """A random MixtralForCausalLM with the tiny training model's shapes, every weight perturbed
    (so norms and routers matter), saved to ``folder``; returns the model. ``fused``: rewrite the
    experts in transformers 5's in-memory layout (gate_up_proj / down_proj)."""
    from safetensors.torch import load_file, save_file
    from transformers import MixtralConfig, MixtralForCausalLM

    config = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=max_positions, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, num_local_experts=4,
                  num_experts_per_tok=2, tie_word_embeddings=False)
    with torch.random.fork_rng():  # the same random model at every call
        torch.manual_seed(5)
        model = MixtralForCausalLM(MixtralConfig(**{**config, **overrides})).eval()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(folder))
    if fused:
        state = load_file(str(folder / "model.safetensors"))
        for i in range(2):
            m = f"model.layers.{i}."
            x = [f"{m}block_sparse_moe.experts.{e}." for e in range(4)]
            state[f"{m}mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([state.pop(f"{p}w1.weight"), state.pop(f"{p}w3.weight")]) for p in x])
            state[f"{m}mlp.experts.down_proj"] = torch.stack([state.pop(f"{p}w2.weight") for p in x])
            state[f"{m}mlp.gate.weight"] = state.pop(f"{m}block_sparse_moe.gate.weight")
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return model


def test_import_hf_keeps_the_mixtral_logits(seeded, tmp_path):
    from safetensors.torch import load_file

    from samoe_dist.checkpoint import load_consolidated_state
    from samoe_dist.export.hf.convert import import_hf

    mixtral = tiny_mixtral(tmp_path / "mixtral")
    tag = import_hf(str(tmp_path / "mixtral"), str(tmp_path / "ckpt"))
    assert sorted(p.name for p in tag.iterdir()) == ["config.json", "model.safetensors"]  # weights only
    saved = json.loads((tag / "config.json").read_text())
    assert saved["moe"]["num_experts"] == 4 and saved["moe"]["moe_router_pre_softmax"] is False
    model, cfg, groups = build_training_model(MIXTRAL[:2] + MIXTRAL[4:] + ["--untie-embeddings-and-output-weights"])
    load_consolidated_state(model, cfg, groups, load_file(str(tag / "model.safetensors")), "imported")
    x = tokens()
    with torch.no_grad():
        want = mixtral(x).logits
        torch.testing.assert_close(model.logits(x), want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)
    # transformers 5's own expert layout imports to the same checkpoint
    tiny_mixtral(tmp_path / "fused", fused=True)
    fused = import_hf(str(tmp_path / "fused"), str(tmp_path / "ckpt_fused"))
    a, b = load_file(str(tag / "model.safetensors")), load_file(str(fused / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_import_hf_refuses_what_the_trainer_cannot_build(seeded, tmp_path, capsys):
    tiny_mixtral(tmp_path / "gqa", num_key_value_heads=2, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": 1e6})
    err = _error(capsys, ["import-hf", "--input", str(tmp_path / "gqa"), "--save", str(tmp_path / "a")])
    assert "num_key_value_heads 2 != num_attention_heads 4" in err and "rope_theta 1000000.0" in err
    assert not (tmp_path / "a").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    err = _error(capsys, ["import-hf", "--input", str(tmp_path / "other"), "--save", str(tmp_path / "a")])
    assert "model_type 'llama'" in err and "Mixtral" in err
    tiny_mixtral(tmp_path / "ok")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    err = _error(capsys, ["import-hf", "--input", str(tmp_path / "ok"), "--save", str(tmp_path / "full")])
    assert "already exists and is not empty" in err
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"garbage")
    err = _error(capsys, ["import-hf", "--input", str(tmp_path / "ok"), "--save", str(tmp_path / "a")])
    assert "not a readable safetensors file" in err
