"""Prompt sets: a file of prompt rows (any input align.data.open_source reads: JSON Lines, JSON, CSV, Parquet, globs,
save_to_disk folders), or the shipped task suite (`tasks:train`, `tasks:eval`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from align.data import check_messages, open_source
from align.errors import AlignError, DataError
from align.store.db import holds_nul
from align.evaluate import stratified
from align.tasks import load_tasks


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompt rows: task rows ({"prompt", "family", "gold", ...}), chat rows ({"messages"}) or {"prompt": text},
    validated here, where a problem can be named by file and line."""
    rows = []
    source = open_source(str(path))
    for index, row in enumerate(source):
        where = source.where(index)
        row = {k: v for k, v in row.items() if v is not None}  # a column another row has is no value here
        prompt = row.get("prompt", row.get("messages"))
        if not prompt or not isinstance(prompt, (str, list)):
            raise DataError(f"{where}: needs a non-empty 'prompt' (text or messages) or 'messages'")
        if isinstance(prompt, list):
            column = "prompt" if "prompt" in row else "messages"
            check_messages(prompt, where, column)
            if prompt[-1]["role"] == "assistant":  # an SFT row: the prompt with its answer dropped
                if len(prompt) == 1:
                    raise DataError(f"{where}: '{column}' holds only an assistant turn; there is no prompt")
                row = {k: v for k, v in dict(row, messages=prompt[:-1], prompt=None).items() if v is not None}
        if holds_nul(row):
            raise DataError(f"{where}: holds a NUL character (\\x00), which the store cannot keep; remove it")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return rows


def resolve_prompts(source: str, per_family: Optional[int] = None, limit: Optional[int] = None) -> list[dict]:
    """Prompt rows of a JSONL path, or of `tasks:eval` / `tasks:train` (the shipped task suite)."""
    if source.startswith("tasks:"):
        split = source.split(":", 1)[1]
        if split not in ("eval", "train"):
            raise AlignError(f"unknown task split {split!r} in {source!r}; use tasks:eval or tasks:train")
        rows = load_tasks(repo_file(f"data/tasks/{split}.jsonl"))
    else:
        rows = read_prompts(source)
    if per_family is not None:
        rows = stratified([dict(r, family=r.get("family") or "-") for r in rows], per_family)
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise AlignError(f"the prompt set {source!r} is empty after --per_family/--limit")
    return rows


def repo_file(relative: str) -> Path:
    """A shipped file (the task suite, recipe configs), found from the working directory or the source checkout."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / relative).is_file():
            return root / relative
    raise AlignError(f"{relative} not found (run from the repository root, or pass a JSONL path)")
