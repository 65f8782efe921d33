"""compress: a standard MoE's L*N experts as a pool of P and combination logits (a SaMoE checkpoint).

The checks are independent of the fitting code: the new checkpoint is read back, its experts
materialised with the plain model's own ``combination_weights`` and compared with the original
experts; with P = L*N they must be the originals bit for bit and the logits those of the MoE.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from samoe_dist.export import PlainGPT
from samoe_dist.export.compress import compress, fit_simplex, project_simplex
from samoe_dist.export.convert import export
from samoe_dist.export.names import plain_config, to_plain
from tests.helpers import build_training_model, write_checkpoint
from tests.unit.test_export import tokens

MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--swiglu", "--num-layers", "3", "--moe-layer-freq", "2"]


@pytest.fixture
def moe_checkpoint(seeded, tmp_path):
    model, cfg, groups = build_training_model(MOE)
    return model, write_checkpoint(tmp_path / "moe", model, cfg, groups)


def experts_of(tag_dir) -> tuple[dict, torch.Tensor]:
    """(plain state, [MoE layers, N, D] each layer expert flattened as [W1, W2, W3] in the pool's
    layout), read from a checkpoint, materialising SaMoE experts with the plain model's math."""
    from samoe_dist.export.plain_gpt import combination_weights

    run = json.loads((tag_dir / "config.json").read_text())
    cfg = plain_config(run)
    state = to_plain(load_file(str(tag_dir / "model.safetensors")), cfg)
    f, layers = cfg.moe_ffn_hidden_size, []
    for i in cfg.moe_layers:
        if cfg.samoe_pool_size is None:
            rows = [torch.cat([state[f"layers.{i}.mlp.experts.{e}.fc1.weight"][:f].t().reshape(-1),
                               state[f"layers.{i}.mlp.experts.{e}.fc2.weight"].t().reshape(-1),
                               state[f"layers.{i}.mlp.experts.{e}.fc1.weight"][f:].t().reshape(-1)])
                    for e in range(cfg.num_experts)]
            layers.append(torch.stack(rows))
        else:
            A = combination_weights(state[f"layers.{i}.mlp.combination_logits"], cfg.samoe_temperature, 0,
                                    cfg.samoe_combination)
            pool = torch.cat([state[f"pool.{n}"].reshape(cfg.samoe_pool_size, -1) for n in ("w1", "w2", "w3")], 1)
            layers.append(A @ pool)
    return state, torch.stack(layers)


def test_full_pool_gives_back_the_original_experts_exactly(moe_checkpoint, tmp_path):
    model, tag = moe_checkpoint
    new_tag, errors = compress(str(tag.parent), 2 * 4, str(tmp_path / "samoe"))
    assert errors == [0.0, 0.0]
    state, experts = experts_of(new_tag)
    _, original = experts_of(tag)
    assert torch.equal(experts, original)  # one-hot rows: W_l = A_l @ pool is each original expert bit for bit
    for i in (0, 2):
        A = torch.softmax(state[f"layers.{i}.mlp.combination_logits"], -1)
        assert torch.equal(A, torch.nn.functional.one_hot(A.argmax(-1), 8).float())
    saved = json.loads((new_tag / "config.json").read_text())
    assert saved["samoe"]["samoe_pool_size"] == 8 and saved["converted_from"]["compress"]["pool_size"] == 8
    plain = PlainGPT.from_pretrained(export(str(tmp_path / "samoe"), str(tmp_path / "p.safetensors"))[0])
    assert plain.config.kind == "samoe"
    with torch.no_grad():
        torch.testing.assert_close(plain.logits(tokens()), model.logits(tokens()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,min_weight", [("softmax", 0.0), ("softmax", 1e-3), ("linear", 0.0)])
def test_smaller_pool_reports_its_reconstruction_error(moe_checkpoint, tmp_path, mode, min_weight):
    _, tag = moe_checkpoint
    new_tag, errors = compress(str(tag.parent), 3, str(tmp_path / "samoe"), mode=mode, min_weight=min_weight)
    state, experts = experts_of(new_tag)
    _, original = experts_of(tag)
    # the reported error is the one of the checkpoint as written, recomputed here from its files
    want = [float((original[j] - experts[j]).double().norm() / original[j].double().norm()) for j in range(2)]
    assert errors == pytest.approx(want, rel=1e-5)
    assert all(0 < e < 1 for e in errors)
    A = torch.stack([torch.softmax(state[f"layers.{i}.mlp.combination_logits"], -1) if mode == "softmax"
                     else state[f"layers.{i}.mlp.combination_logits"] for i in (0, 2)])
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 4), atol=1e-5, rtol=0)  # rows on the simplex
    assert float(A.min()) >= (min_weight / (1 + 3 * min_weight) if min_weight else 0.0) - 1e-7
    # not worse than every expert on its nearest pool expert (the k-means assignment)
    pool = torch.cat([state[f"pool.{n}"].reshape(3, -1) for n in ("w1", "w2", "w3")], 1)
    nearest = torch.cdist(original.flatten(0, 1), pool).argmin(1)
    hard = [float((original[j] - pool[nearest.view(2, 4)[j]]).double().norm() / original[j].double().norm())
            for j in range(2)]
    if min_weight == 0:
        assert sum(errors) <= sum(hard) + 1e-6
    # the SaMoE checkpoint loads into the trainer's model (the shape flags it records are complete)
    from samoe_dist.checkpoint import load_consolidated_state

    flags = [*MOE, "--samoe-pool-size", "3", "--samoe-combination", mode]
    model, cfg, groups = build_training_model(flags)
    load_consolidated_state(model, cfg, groups, load_file(str(new_tag / "model.safetensors")), "compressed")
    plain = PlainGPT.from_pretrained(export(str(tmp_path / "samoe"), str(tmp_path / "p.safetensors"))[0])
    with torch.no_grad():
        torch.testing.assert_close(model.logits(tokens()), plain.logits(tokens()), atol=1e-5, rtol=1e-5)


def test_simplex_projection_and_fit_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    proj = project_simplex(V)
    assert torch.all(proj >= 0) and torch.allclose(proj.sum(-1), torch.ones(50, dtype=torch.float64))
    # no point of a fine grid on the simplex is closer to V than its projection
    grid = torch.tensor([[a, b, c, 20 - a - b - c] for a in range(21) for b in range(21 - a)
                         for c in range(21 - a - b)], dtype=torch.float64) / 20
    best = torch.cdist(V, grid).min(1).values
    assert torch.all((V - proj).norm(dim=-1) <= best + 1e-12)
    pool = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    X = torch.rand(20, 4, generator=gen, dtype=torch.float64) @ pool + 0.1 * torch.randn(20, 30, generator=gen,
                                                                                          dtype=torch.float64)
    A = fit_simplex(X, pool, torch.nn.functional.one_hot(torch.zeros(20, dtype=torch.long), 4))
    fitted = (X - A @ pool).norm(dim=-1)
    assert torch.all(fitted <= torch.cdist(X, grid @ pool).min(1).values + 1e-9)


def test_compress_command_line_refusals(moe_checkpoint, tmp_path, capsys):
    from tests.unit.test_export_hf import _error

    _, tag = moe_checkpoint
    ckpt, out = str(tag.parent), str(tmp_path / "samoe")
    err = _error(capsys, ["compress", "--load", ckpt, "--pool-size", "9", "--save", out])
    assert "--pool-size 9" in err and "2 MoE layers x 4 experts = 8" in err
    assert "--pool-size 0" in _error(capsys, ["compress", "--load", ckpt, "--pool-size", "0", "--save", out])
    assert not (tmp_path / "samoe").exists()
    from tests.helpers import convert_tool

    assert convert_tool().main(["compress", "--load", ckpt, "--pool-size", "4", "--save", out]) == 0
    printed = capsys.readouterr().out
    assert "relative reconstruction error per MoE layer" in printed
    first = (tmp_path / "samoe" / "iter_0000000" / "model.safetensors").read_bytes()
    err = _error(capsys, ["compress", "--load", ckpt, "--pool-size", "2", "--save", out])
    assert "already exists and is not empty: pass --overwrite" in err
    assert convert_tool().main(["compress", "--load", ckpt, "--pool-size", "2", "--save", out, "--overwrite"]) == 0
    assert (tmp_path / "samoe" / "iter_0000000" / "model.safetensors").read_bytes() != first
    saved = json.loads((tmp_path / "samoe" / "iter_0000000" / "config.json").read_text())
    assert saved["samoe"]["samoe_pool_size"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    err = _error(capsys, ["compress", "--load", out, "--pool-size", "2", "--save", str(tmp_path / "again")])
    assert "is a samoe model: compress takes a standard MoE" in err
