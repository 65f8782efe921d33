#!/usr/bin/env python
"""Pretrain a dense, standard-MoE or SaMoE GPT with megatron-core and DeepSpeed.

    deepspeed --num_gpus 2 pretrain_samoe.py --ds_config examples/ds_config_cpu.json \
        --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
        --num-experts 8 --samoe-pool-size 8 --data-path data/shakespeare.jsonl \
        --tokenizer-model data/spm.model --train-iters 100

Flags follow Megatron's names; `--help` lists them. The training loop lives in samoe_dist.training.
"""

import os
import sys

from samoe_dist import cpu_compat
from samoe_dist.arguments import parse_args
from samoe_dist.config import ConfigError


def main(argv=None) -> int:
    cpu_compat.apply()
    cfg, ds_config = parse_args(argv)
    from samoe_dist.parallel import destroy
    from samoe_dist.training import pretrain

    try:
        pretrain(cfg, ds_config)
        # Tear the process groups down while the interpreter is whole: left to exit-time cleanup,
        # gloo's threads can abort the process ("terminate called without an active exception").
        destroy()
    except (ConfigError, FileNotFoundError, FloatingPointError) as exc:
        # One line per problem, from rank 0 only (the other ranks hit the same check).
        if os.environ.get("RANK", "0") == "0":
            print(f"pretrain_samoe.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
