"""Read and validate data files; tokenise chat conversations with an assistant-only loss mask.

Every reader names the file and line of a problem, so a bad row in a 100k-line file is found at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

from align.errors import AlignError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line; a malformed line raises DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a malformed line or a missing column raises DataError naming it."""
    required = tuple(required)
    rows = []
    for lineno, row in iter_jsonl(path):
        missing = [key for key in required if key not in row]
        if missing:
            raise DataError(f"{path}:{lineno}: missing column(s) {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path, sort_keys: bool = False) -> Path:
    """Write one JSON object per line, atomically: readers see the old file or the whole new one."""
    return write_atomically(path, (json.dumps(row, ensure_ascii=False, sort_keys=sort_keys, default=str) + "\n"
                                   for row in rows))


def write_atomically(path: str | Path, pieces: Iterable[str]) -> Path:
    """Write text to `path` so that readers see the old file or the whole new one (a temporary file renamed over
    it). Only a regular file or a new path is replaced that way: a symlink's target is written (the link stays),
    and a device, FIFO or socket (`/dev/stdout`, `/dev/full`) is written into directly, never replaced by a file.
    Any OS error becomes one line naming the path."""
    path = Path(path)
    target = Path(os.path.realpath(path))
    try:
        if target.is_dir():
            raise AlignError(f"cannot write {path}: it is a directory")
        if target.exists() and not target.is_file():
            with open(target, "w", encoding="utf-8") as f:
                f.writelines(pieces)
            return path
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(
            "w", dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False, encoding="utf-8")
        try:
            with handle:
                handle.writelines(pieces)
                handle.flush()
                os.fsync(handle.fileno())
            if target.exists():
                shutil.copymode(target, handle.name)  # a replaced file keeps its permissions
            os.replace(handle.name, target)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise AlignError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def files_sha256(*paths: Optional[str | Path]) -> str:
    """One hash over the contents of data files: the data snapshot a run trained on."""
    digest = hashlib.sha256()
    for p in paths:
        if p is not None:
            digest.update(Path(p).read_bytes())
    return digest.hexdigest()[:16]


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Check one conversation: a list of {role, content}, ending with a non-empty assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {message['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: message {i} content must be a string")
    last = messages[-1]
    if last["role"] != "assistant" or not last["content"].strip():
        raise DataError(f"{where}: the last message must be a non-empty assistant response")
    return messages


def load_chat_file(path: str | Path, limit: Optional[int] = None) -> list[list[dict[str, str]]]:
    """Conversations from a chat-format JSONL ({"messages": [...]} per line), validated."""
    rows = read_jsonl(path, required=("messages",))
    conversations = [validate_messages(row["messages"], f"{path}:{i + 1}") for i, row in enumerate(rows)]
    return conversations[:limit] if limit else conversations


def tokenize_chat(
    messages: list[dict[str, str]], tokenizer: "PreTrainedTokenizerBase", max_length: int
) -> dict[str, list[int]]:
    """Token ids of a conversation and a mask that is 1 on assistant tokens (the ones we train on).

    Works with any chat template, with or without `{% generation %}` markers: each assistant turn's
    tokens are found by rendering the conversation up to the turn's generation prompt, then through
    the turn. This needs the template to be prefix-stable (true of ChatML, Llama 3, Qwen, ...), and
    checks it rather than assuming it.
    """
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        end = len(through)
        if ids[:end] != through or start > end:
            raise DataError("the chat template is not prefix-stable; cannot locate assistant tokens")
        mask[start:end] = [1] * (end - start)
    ids, mask = ids[:max_length], mask[:max_length]
    return {"input_ids": ids, "assistant_masks": mask}


def _render(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt rendered with the generation prompt: what the model continues from."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    """A prompt given as text or as chat messages, as chat messages."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
