"""Every example config parses, and every launch script's argument list goes through the real
argument parser and layout check (DRY_RUN=1 prints the list instead of launching)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from samoe_dist.arguments import parse_args
from samoe_dist.config import validate_layout
from samoe_dist.ds_config import build_ds_config

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["examples/pretrain_gpt.sh", "examples/slurm/pretrain_deepspeed.sbatch",
           "examples/slurm/pretrain_torchrun.sbatch", "examples/slurm/pretrain_srun.sbatch"]
WORLD = 64  # the templates' 8 nodes x 8 GPUs


def _dry_run(script: str, **env: str) -> list[str]:
    out = subprocess.run(["bash", script], cwd=REPO, env=dict(os.environ, DRY_RUN="1", **env),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "examples").glob("*.json")))
def test_ds_configs_parse_and_merge(path):
    user = json.loads((REPO / path).read_text())
    cfg, _ = parse_args(["--micro-batch-size", "2", "--global-batch-size", "8"])
    validate_layout(cfg, 2)
    ds = build_ds_config(cfg, user, dp_size=2)
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"]["stage"] in (0, 1, 2)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("size", ["350m", "1.3b"])
@pytest.mark.parametrize("kind", ["samoe", "moe", "shared", "dense"])
def test_launch_scripts_arguments(script, size, kind):
    argv = _dry_run(script, SIZE=size, KIND=kind)
    cfg, ds = parse_args(argv)
    assert validate_layout(cfg, WORLD) == WORLD
    assert (REPO / ds).is_file()
    assert cfg.kind == ("samoe" if kind == "shared" else kind) and cfg.training.bf16
    if kind == "shared":  # shared routing: 256 pool experts routed to directly by every MoE layer
        assert cfg.samoe.samoe_route_to_pool and cfg.moe.num_experts == cfg.samoe.samoe_pool_size == 256
        assert cfg.parallel.expert_model_parallel_size == 8 and cfg.moe_layer_indices() == list(range(0, 24, 2))
        assert cfg.training.save == cfg.training.load
        return
    assert cfg.model.hidden_size == {"350m": 1024, "1.3b": 2048}[size] and cfg.model.num_layers == 24
    if kind != "dense":
        assert cfg.moe.num_experts == 128 and cfg.moe_layer_indices() == list(range(0, 24, 2))
        assert cfg.parallel.expert_model_parallel_size == 8
    if kind == "samoe":
        assert cfg.samoe.samoe_pool_size == 256  # 12 x 128 = 1536 layer experts from 256: 6x fewer
        assert cfg.samoe.samoe_init_peak_mass == 0.95  # a mass: beta = 4 would put only 18% on the peak at P=256
    assert cfg.training.save == cfg.training.load  # resume-or-start on preemption


def test_pool_sweep_covers_pools_twin_and_dense():
    lines = _dry_run("examples/sweep_pool.sh", SIZE="350m")
    runs, current = [], []
    for line in lines:
        if line == "--ds_config" and current:
            runs.append(current)
            current = []
        current.append(line)
    runs.append(current)
    cfgs = [parse_args(r)[0] for r in runs]
    assert [c.kind for c in cfgs] == ["samoe", "samoe", "samoe", "moe", "dense"]
    assert [c.samoe.samoe_pool_size for c in cfgs[:3]] == [128, 256, 512]
    assert len({c.training.save for c in cfgs}) == 5  # one run directory each


@pytest.mark.parametrize("script", SCRIPTS[1:] + ["examples/pretrain_gpt.sh", "examples/sweep_pool.sh"])
def test_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0


def test_deepspeed_sbatch_builds_the_hostfile_of_a_two_node_allocation(tmp_path):
    """examples/slurm/pretrain_deepspeed.sbatch on a faked 2-node allocation: `scontrol show
    hostnames` gives the nodes, `srun` prints the per-node command instead of running it. The
    hostfile lists both nodes with their GPUs, and the launch line hands it to DeepSpeed's runner
    with --no_ssh and the node's rank (the runner refuses more than one node without a hostfile)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && '
                                      '[ "$3" = "gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nprintf "srun"; printf " %q" "$@"; echo\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu[07-08]",
               SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(REPO),
               RUN_DIR=str(run_dir), SIZE="350m", KIND="samoe")
    out = subprocess.run(["bash", "examples/slurm/pretrain_deepspeed.sbatch"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    hostfile = run_dir / "hostfile.4242"
    assert hostfile.read_text() == "gpu07 slots=4\ngpu08 slots=4\n"
    launch = [line for line in out.stdout.splitlines() if line.startswith("srun")]
    assert len(launch) == 1, out.stdout
    for part in (f"--hostfile {hostfile}", "--no_ssh", "--node_rank $SLURM_NODEID", "--num_nodes 2",
                 "--num_gpus 4", "--master_addr gpu07", "--master_port 24242", "pretrain_samoe.py"):
        assert part in launch[0].replace("\\", ""), (part, launch[0])
