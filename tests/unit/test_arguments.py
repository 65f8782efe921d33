"""The command line: frozen flag set, Megatron spelling, one-line errors before any process group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from samoe_dist.arguments import all_flags, parse_args
from samoe_dist.config import ConfigError, validate_layout
from tests.helpers import run_preloaded

REPO = Path(__file__).resolve().parents[2]

FROZEN_FLAGS = [
    "--adam-beta1", "--adam-beta2", "--adam-eps", "--allow-data-change", "--attention-dropout", "--bf16",
    "--clip-grad", "--data-cache-path", "--data-path", "--deepscale", "--deepscale_config", "--deepspeed",
    "--deepspeed_config", "--ds-config", "--ds_config", "--eod-mask-loss", "--eval-interval", "--eval-iters",
    "--exit-duration-in-mins", "--exit-interval", "--expert-model-parallel-size", "--ffn-hidden-size",
    "--global-batch-size", "--help", "--hidden-dropout", "--hidden-size", "--init-method-std",
    "--keep-last-checkpoints", "--load", "--local-rank", "--local_rank", "--log-interval", "--lr",
    "--lr-decay-iters", "--lr-decay-style", "--lr-warmup-iters", "--max-position-embeddings", "--merge-file",
    "--metrics-file", "--micro-batch-size", "--min-lr", "--moe-aux-loss-coeff",
    "--moe-expert-capacity-factor", "--moe-ffn-hidden-size", "--moe-layer-freq", "--moe-pad-expert-input-to-capacity",
    "--moe-router-pre-softmax",
    "--moe-router-topk", "--moe-token-dispatcher-type", "--moe-z-loss-coeff", "--no-moe-router-pre-softmax",
    "--normalization", "--num-attention-heads", "--num-experts", "--num-layers",
    "--override-opt-param-scheduler", "--overwrite-checkpoints", "--position-embedding-type",
    "--recompute-granularity", "--samoe-combination", "--samoe-combination-lr-mult", "--samoe-init",
    "--samoe-init-noise", "--samoe-init-peak", "--samoe-init-peak-mass", "--samoe-materialize-once-per-step",
    "--samoe-pool-sharding",
    "--samoe-pool-size", "--samoe-prefetch-gather", "--samoe-route-to-pool", "--samoe-temperature", "--samoe-top-m",
    "--save",
    "--save-interval", "--seed", "--seq-length", "--sequence-parallel", "--split", "--swiglu",
    "--tensor-model-parallel-size", "--tensorboard-dir",
    "--tokenizer-model", "--tokenizer-type", "--train-iters", "--untie-embeddings-and-output-weights",
    "--use-checkpoint-opt-param-scheduler", "--vocab-file", "--vocab-size", "--weight-decay",
]

MEGATRON_FLAGS = (
    "--num-layers --hidden-size --num-attention-heads --ffn-hidden-size --seq-length "
    "--max-position-embeddings --vocab-size --micro-batch-size --global-batch-size --train-iters --lr "
    "--min-lr --lr-decay-style --lr-warmup-iters --weight-decay --clip-grad --bf16 --seed --data-path "
    "--split --tokenizer-model --save --load --save-interval --eval-interval --eval-iters --log-interval "
    "--tensorboard-dir --num-experts --moe-router-topk --moe-aux-loss-coeff --moe-z-loss-coeff "
    "--moe-expert-capacity-factor --moe-pad-expert-input-to-capacity --moe-layer-freq --expert-model-parallel-size --tensor-model-parallel-size "
    "--sequence-parallel"
).split()


def test_flag_set_is_frozen():
    """Adding, renaming or removing a flag must be a deliberate change to this list."""
    assert all_flags() == FROZEN_FLAGS


def test_megatron_flag_names_present():
    missing = [f for f in MEGATRON_FLAGS if f not in all_flags()]
    assert not missing


def test_flags_map_to_config_fields():
    cfg, ds = parse_args(["--num-layers", "6", "--hidden-size", "96", "--num-attention-heads", "3",
                          "--num-experts", "8", "--samoe-pool-size", "4", "--moe-layer-freq", "2",
                          "--ds_config", "x.json", "--bf16", "--data-path", "a.jsonl"])
    assert cfg.model.num_layers == 6 and cfg.model.hidden_size == 96 and cfg.model.ffn_hidden_size == 384
    assert cfg.moe.num_experts == 8 and cfg.samoe.samoe_pool_size == 4 and cfg.kind == "samoe"
    assert cfg.moe_layer_indices() == [0, 2, 4]
    assert cfg.training.bf16 is True and cfg.data.data_path == ["a.jsonl"] and ds == "x.json"
    assert cfg.moe.moe_ffn_hidden_size == 384


def test_ds_config_long_form_and_conflict():
    _, ds = parse_args(["--deepspeed_config", "a.json"])
    assert ds == "a.json"
    with pytest.raises(SystemExit) as exc:
        parse_args(["--deepspeed_config", "a.json", "--ds_config", "b.json"])
    assert exc.value.code == 2


@pytest.mark.parametrize("argv, message", [
    (["--hidden-size", "100", "--num-attention-heads", "3"], "--hidden-size 100 is not divisible by --num-attention-heads 3"),
    (["--samoe-pool-size", "4"], "--samoe-pool-size needs --num-experts"),
    (["--num-experts", "4", "--moe-router-topk", "5"], "--moe-router-topk 5 exceeds --num-experts 4"),
    (["--num-experts", "4", "--samoe-pool-size", "2", "--samoe-top-m", "3"], "--samoe-top-m 3 exceeds --samoe-pool-size 2"),
    (["--samoe-init", "fancy"], "--samoe-init must be"),
    (["--num-experts", "4", "--samoe-pool-size", "2", "--samoe-pool-sharding", "columns"],
     "--samoe-pool-sharding must be one of replicated, sharded"),
    (["--num-experts", "4", "--samoe-materialize-once-per-step"], "--samoe-materialize-once-per-step needs --samoe-pool-size"),
    (["--num-experts", "4", "--samoe-pool-size", "4", "--samoe-route-to-pool", "--samoe-materialize-once-per-step"],
     "nothing is materialised: drop --samoe-materialize-once-per-step"),
    (["--num-experts", "4", "--samoe-pool-size", "4", "--samoe-prefetch-gather"],
     "--samoe-prefetch-gather starts the sharded pool's all-gathers early: it needs --samoe-pool-size P and "
     "--samoe-pool-sharding sharded"),
    (["--num-experts", "4", "--samoe-pool-size", "4", "--samoe-pool-sharding", "sharded", "--samoe-prefetch-gather",
      "--samoe-materialize-once-per-step"], "drop --samoe-prefetch-gather"),
    (["--lr", "1e-3", "--min-lr", "1e-2"], "--min-lr"),
    (["--seq-length", "512", "--max-position-embeddings", "256"], "--seq-length 512 exceeds --max-position-embeddings 256"),
    (["--split", "a,b"], "--split must be"),
    (["--expert-model-parallel-size", "2"], "needs --num-experts"),
    (["--num-experts", "4", "--moe-pad-expert-input-to-capacity"],
     "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor"),
    (["--num-layers", "0"], "--num-layers must be > 0"),
    (["--sequence-parallel"], "--sequence-parallel splits the sequence over the tensor-parallel group: it needs "
                              "--tensor-model-parallel-size > 1"),
    (["--tensor-model-parallel-size", "3", "--num-attention-heads", "4"],
     "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (["--tensor-model-parallel-size", "2", "--vocab-size", "101"], "--vocab-size 101 is not divisible by"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "33",
      "--max-position-embeddings", "64"], "--sequence-parallel splits --seq-length 33 over 2 ranks"),
    (["--tensor-model-parallel-size", "4", "--sequence-parallel", "--num-experts", "4",
      "--expert-model-parallel-size", "2"], "use EP 1 (every rank holds every expert) or a multiple of TP"),
])
def test_invalid_values_name_the_field(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def _cfg(*argv):
    cfg, _ = parse_args(list(argv))
    return cfg


def test_layout_checks():
    assert validate_layout(_cfg("--micro-batch-size", "4", "--global-batch-size", "16"), 2) == 2
    cfg = _cfg("--micro-batch-size", "4")
    validate_layout(cfg, 4)
    assert cfg.training.global_batch_size == 16  # default: micro x data-parallel
    with pytest.raises(ConfigError, match="--global-batch-size 12 is not divisible by --micro-batch-size 4 x data-parallel size 2"):
        validate_layout(_cfg("--micro-batch-size", "4", "--global-batch-size", "12"), 2)
    with pytest.raises(ConfigError, match="--num-experts 6 is not divisible by --expert-model-parallel-size 4"):
        validate_layout(_cfg("--num-experts", "6", "--expert-model-parallel-size", "4"), 4)
    with pytest.raises(ConfigError, match="--expert-model-parallel-size 4 does not divide the world size 6"):
        validate_layout(_cfg("--num-experts", "8", "--expert-model-parallel-size", "4"), 6)
    # TP: the ranks of one tensor-parallel group are one data-parallel replica
    assert validate_layout(_cfg("--tensor-model-parallel-size", "2", "--micro-batch-size", "2"), 4) == 2
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size 2 does not divide the world size 3"):
        validate_layout(_cfg("--tensor-model-parallel-size", "2"), 3)
    sharded = ("--num-experts", "4", "--samoe-pool-size", "2", "--samoe-pool-sharding", "sharded",
               "--hidden-size", "8", "--num-attention-heads", "2", "--moe-ffn-hidden-size", "9")
    validate_layout(_cfg(*sharded), 8)  # 8 x 9 = 72 weights split over 8 ranks
    with pytest.raises(ConfigError, match="8 x 9 = 72 weights over the expert-data-parallel group of 5 ranks"):
        validate_layout(_cfg(*sharded), 5)


def _run_entry(args, world_size="1", fresh=True):
    """`python pretrain_samoe.py ARGS` as rank 0 of ``world_size``: in a fresh interpreter, or
    (``fresh=False``) in a fork of the tests' preloaded server, which skips the imports' ~10 s
    and with them anything the imports themselves print."""
    env = dict(os.environ, WORLD_SIZE=world_size, RANK="0")
    env.pop("MASTER_ADDR", None)  # a layout error must come before any process group exists
    if not fresh:
        return run_preloaded(REPO / "pretrain_samoe.py", args, [env], timeout=120)
    return subprocess.run([sys.executable, str(REPO / "pretrain_samoe.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


# The first case runs in a fresh interpreter: nothing the imports print may join the one line.
@pytest.mark.parametrize("args, world, message, fresh", [
    (["--num-experts", "6", "--expert-model-parallel-size", "4"], "4",
     "--num-experts 6 is not divisible by --expert-model-parallel-size 4", True),
    (["--micro-batch-size", "4", "--global-batch-size", "12"], "2",
     "--global-batch-size 12 is not divisible by --micro-batch-size 4 x data-parallel size 2", False),
    (["--hidden-size", "100", "--num-attention-heads", "3"], "1", "--hidden-size 100 is not divisible", False),
    (["--no-such-flag"], "1", "unrecognized arguments: --no-such-flag", False),
    (["--ds_config", "does/not/exist.json"], "1", "DeepSpeed config 'does/not/exist.json' does not exist", False),
])
def test_entry_script_fails_with_one_line(args, world, message, fresh):
    out = _run_entry(["--ds_config", str(REPO / "examples/ds_config_cpu.json"), *args], world, fresh)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
