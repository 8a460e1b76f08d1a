"""Prompt sets: a JSONL file of prompt rows, or the shipped task suite (`tasks:train`, `tasks:eval`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from align.data import read_jsonl
from align.errors import AlignError, DataError
from align.evaluate import stratified
from align.tasks import load_tasks


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompt rows: task rows ({"prompt", "family", "gold", ...}), chat rows ({"messages"}) or {"prompt": text}."""
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, start=1):
        prompt = row.get("prompt", row.get("messages"))
        if not prompt or not isinstance(prompt, (str, list)):
            raise DataError(f"{path}: row {lineno} needs a non-empty 'prompt' (text or messages) or 'messages'")
        if isinstance(prompt, list) and prompt[-1].get("role") == "assistant":
            row = dict(row, messages=prompt[:-1], prompt=None)  # an SFT row: prompt with its answer dropped
            rows[lineno - 1] = {k: v for k, v in row.items() if v is not None}
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
