"""Loader of the local test tasks: each task's JSONL file, found beside this file (lm-eval reads a
`dataset_path: json` file relative to the working directory; `custom_dataset` makes the tasks
runnable from anywhere)."""

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str) -> datasets.DatasetDict:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def mc(**kwargs):
    return _load("mc.jsonl")


def gen(**kwargs):
    return _load("gen.jsonl")


def text(**kwargs):
    return _load("text.jsonl")
