"""Learning-rate schedule, ds_config merging, metrics output."""

from __future__ import annotations

import json
import math

import pytest

from samoe_dist.arguments import parse_args
from samoe_dist.config import ConfigError, validate_layout
from samoe_dist.ds_config import build_ds_config, load_ds_config
from samoe_dist.metrics import MetricsWriter, iteration_line
from samoe_dist.optim import lr_at


def _cfg(*argv, world=2):
    cfg, _ = parse_args(list(argv))
    validate_layout(cfg, world)
    return cfg


def test_lr_warmup_then_cosine_to_min():
    tr = _cfg("--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "10", "--train-iters", "110").training
    assert lr_at(0, tr) == pytest.approx(1e-4)  # (0+1)/10 of peak
    assert lr_at(9, tr) == pytest.approx(1e-3)  # end of warmup
    assert lr_at(60, tr) == pytest.approx(1e-4 + 0.5 * 9e-4)  # cosine midpoint
    assert lr_at(110, tr) == pytest.approx(1e-4) and lr_at(500, tr) == pytest.approx(1e-4)
    lrs = [lr_at(s, tr) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_lr_linear_and_constant():
    tr = _cfg("--lr", "1.0", "--min-lr", "0", "--lr-warmup-iters", "0", "--train-iters", "10",
              "--lr-decay-style", "linear").training
    assert [lr_at(s, tr) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    tr = _cfg("--lr", "0.5", "--lr-warmup-iters", "0", "--lr-decay-style", "constant").training
    assert lr_at(0, tr) == lr_at(99, tr) == 0.5


def test_ds_config_gets_flag_values():
    cfg = _cfg("--micro-batch-size", "2", "--global-batch-size", "8", "--clip-grad", "0.5", "--lr", "3e-4",
               "--weight-decay", "0.05", "--bf16")
    ds = build_ds_config(cfg, {"zero_optimization": {"stage": 2}}, dp_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["train_batch_size"] == 8
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 2
    params = ds["optimizer"]["params"]
    assert params["lr"] == 3e-4 and params["weight_decay"] == 0.05 and params["torch_adam"] is True


@pytest.mark.parametrize("user, message", [
    ({"train_batch_size": 64}, "train_batch_size=64 contradicts --global-batch-size"),
    ({"gradient_clipping": 2.0}, "gradient_clipping=2.0 contradicts --clip-grad"),
    ({"scheduler": {"type": "WarmupLR"}}, "remove it"),
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"optimizer": {"type": "Adam", "params": {"torch_adam": False}}}, "torch_adam"),
])
def test_ds_config_contradictions(user, message):
    cfg = _cfg("--micro-batch-size", "2", "--global-batch-size", "8")
    with pytest.raises((ConfigError, ValueError), match=message):
        build_ds_config(cfg, user, dp_size=2)


def test_bf16_flag_and_file_must_agree():
    """--bf16 against a file that turns bf16 off is an error naming both; a file asking for bf16
    without the flag is the same request; neither: fp32."""
    with pytest.raises(ConfigError, match=r'bf16 \{"enabled": false\} contradicts --bf16'):
        build_ds_config(_cfg("--micro-batch-size", "2", "--bf16"), {"bf16": {"enabled": False}}, dp_size=1)
    cfg = _cfg("--micro-batch-size", "2")
    assert build_ds_config(cfg, {"bf16": {"enabled": True}}, dp_size=1)["bf16"]["enabled"] and cfg.training.bf16
    cfg = _cfg("--micro-batch-size", "2")
    assert not build_ds_config(cfg, {"bf16": {"enabled": False}}, dp_size=1)["bf16"]["enabled"]
    assert not cfg.training.bf16


def test_ds_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_ds_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 1},}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(str(bad))
    with pytest.raises(ConfigError, match="--ds_config"):
        load_ds_config(None)


def test_metrics_file_and_iteration_line(tmp_path):
    path = tmp_path / "sub" / "m.jsonl"
    w = MetricsWriter(True, str(path), str(tmp_path / "tb"))
    rec = {"type": "train", "iteration": 3, "consumed_samples": 24, "ms_per_iter": 12.5, "tokens_per_sec": 100.0,
           "lr": 1e-3, "lm_loss": 2.5, "grad_norm": 0.7, "load_balancing_loss": 0.01}
    w.write(rec)
    w.write({"type": "valid", "iteration": 3, "lm_loss": 2.4, "ppl": math.exp(2.4)})
    w.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0] == rec and lines[1]["type"] == "valid"
    assert list((tmp_path / "tb").iterdir())  # tensorboard events written
    line = iteration_line(rec, 10)
    for part in ("iteration        3/      10", "consumed samples:", "elapsed time per iteration (ms): 12.5",
                 "tokens per second: 100.0", "learning rate: 1.000E-03", "lm loss: 2.500000E+00",
                 "load balancing loss: 1.000000E-02", "grad norm: 0.700"):
        assert part in line
    silent = MetricsWriter(False, str(tmp_path / "other.jsonl"), None)
    silent.write(rec)
    assert not (tmp_path / "other.jsonl").exists()  # ranks other than 0 write nothing


def test_tensorboard_gets_losses_loads_and_entropies(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(True, None, str(tmp_path))
    w.write({"type": "train", "iteration": 5, "lm_loss": 2.0, "load_balancing_loss": 0.01, "z_loss": 0.001,
             "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 123.0,
             "expert_load": [[0.25, 0.75], [0.5, 0.5]], "expert_tokens_per_rank": [[[1, 3], [2, 2]]],
             "combination_entropy_per_layer": [0.3, 0.4], "combination_entropy": 0.35})
    w.write({"type": "valid", "iteration": 5, "lm_loss": 2.1, "ppl": 8.17})
    w.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/lm_loss", "train/load_balancing_loss", "train/z_loss", "train/lr", "train/grad_norm",
                "train/tokens_per_sec", "train/expert_load/layer1/expert0", "train/combination_entropy",
                "train/combination_entropy_per_layer/layer0", "valid/lm_loss", "valid/ppl"):
        assert tag in tags, tag
    assert acc.Scalars("train/expert_load/layer0/expert1")[0].value == 0.75
    assert acc.Scalars("train/expert_load/layer0/expert1")[0].step == 5
    assert not any("per_rank" in t for t in tags)


def test_free_port_lies_below_the_ephemeral_range(tmp_path):
    """samoe_dist.ports.free_port: a bindable port outside the range outgoing connections take
    their local ports from, never the same twice in a process; the range is read from the kernel."""
    import socket

    from samoe_dist import ports

    lo, hi = ports.ephemeral_range()
    assert 1024 < lo <= hi
    given = [ports.free_port() for _ in range(20)]
    assert len(set(given)) == 20
    if lo - 10000 >= 1000:
        assert all(10000 <= p < lo for p in given)
    with socket.socket() as s:
        s.bind(("127.0.0.1", given[-1]))  # free when handed out
    fake = tmp_path / "range"
    fake.write_text("20000\t60999\n")
    assert ports.ephemeral_range(str(fake)) == (20000, 60999)
    fake.write_text("garbage")
    assert ports.ephemeral_range(str(fake)) == (32768, 60999)
