"""Shared fixtures: tiny random models saved as local model specs, small chat and preference data, prompts, a
reward-model run. Plain helpers shared by several test files are in tests/helpers.py."""

import json
import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.db"]  # store fixtures: SQLite always, PostgreSQL when ALIGN_TEST_POSTGRES_URL is set

# Tests never touch the network; the hub client fails fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402 - after the environment above, which the hub client reads when it is imported

from align.prompts import read_prompts  # noqa: E402
from tests.helpers import ROOT, load_tokenizer, pair_rows, write_chat_rows, write_pairs  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a byte-level ChatML tokenizer, saved as a local model directory."""
    from align.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def chat_files(tmp_path) -> tuple[Path, Path]:
    return write_chat_rows(tmp_path / "train.jsonl", 24), write_chat_rows(tmp_path / "eval.jsonl", 6, offset=100)


@pytest.fixture(scope="module")
def data_files(tiny_model_dir, tmp_path_factory):
    tokenizer = load_tokenizer(tiny_model_dir)
    root = tmp_path_factory.mktemp("dpo-data")
    rows = pair_rows(tokenizer, n=12)
    rows[5]["label"] = "both_bad"
    return write_pairs(root / "train.jsonl", rows), write_pairs(root / "eval.jsonl", pair_rows(tokenizer, 4, offset=50))


@pytest.fixture
def task_rows():
    rows = read_prompts(ROOT / "data" / "tasks" / "train.jsonl")
    by_family = {}
    for row in rows:
        by_family.setdefault(row["family"], row)
    return list(by_family.values())[:4]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    rows = (ROOT / "data" / "tasks" / "train.jsonl").read_text().splitlines()
    path = tmp_path_factory.mktemp("prompts") / "train.jsonl"
    path.write_text("\n".join(rows[::80][:6]) + "\n")  # six tasks from different families
    return path


@pytest.fixture(scope="module")
def reward_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A reward-model run directory as align.trainers.reward leaves it (merged weights, stats), random head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path_factory.mktemp("rm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(run / "merged")
    tokenizer.save_pretrained(run / "merged")
    (run / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0, "n": 10}))
    (run / "version.json").write_text(json.dumps({"name": "rm", "method": "reward", "config": {"dtype": "float32"}}))
    return run
