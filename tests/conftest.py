"""Shared fixtures: tiny random models saved as local model specs, small chat data, an isolated cache."""

import json
import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.db"]  # store fixtures: SQLite always, PostgreSQL when ALIGN_TEST_POSTGRES_URL is set

# Tests never touch the network; the hub client fails fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a byte-level ChatML tokenizer, saved as a local model directory."""
    from align.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def write_chat_rows(path: Path, n: int, offset: int = 0) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
        for i in range(offset, offset + n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_files(tmp_path) -> tuple[Path, Path]:
    return write_chat_rows(tmp_path / "train.jsonl", 24), write_chat_rows(tmp_path / "eval.jsonl", 6, offset=100)
