"""Prompts and the responses sampled for them. Every add is idempotent (insert-or-get)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from align.errors import DataError
from align.store.clock import utcnow
from align.store.db import Store, chunks, insert_ignoring_conflicts
from align.store.schema import RESPONSE_KEY, Prompt, Response
from align.store.undo import note_added

# ---- prompts -------------------------------------------------------------------------------------------------


def add_prompts(store: Store, rows: list[dict[str, Any]]) -> list[int]:
    """Store prompts, returning their ids in input order; a prompt already stored keeps its row and id.

    A row has `prompt` (a string, or a list of messages) or `messages`, and optionally `family` (or `task`),
    `tags`, `gold`, `split`, `source`, and `id` (the dataset's own id, kept as `source_id`).
    """
    records = [prompt_record(row, index) for index, row in enumerate(rows)]
    with store.write() as session:
        insert_ignoring_conflicts(session, Prompt, records, key=("content_hash",))
        hashes = [record["content_hash"] for record in records]
        ids: dict[str, int] = {}
        for chunk in chunks(sorted(set(hashes))):
            found = session.execute(select(Prompt.content_hash, Prompt.id).where(Prompt.content_hash.in_(chunk)))
            ids.update(dict(found.tuples().all()))
    note_added("prompt", ids.values())
    return [ids[content_hash] for content_hash in hashes]


def prompt_record(row: dict[str, Any], index: int) -> dict[str, Any]:
    messages = row.get("messages")
    prompt = row.get("prompt")
    if messages is None and isinstance(prompt, list):
        messages = prompt
    if messages is not None:
        check_messages(messages, index)
        text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        canonical = messages
    elif isinstance(prompt, str) and prompt:
        text, canonical = prompt, [{"role": "user", "content": prompt}]
    else:
        raise DataError(f"prompt row {index + 1} needs 'prompt' (a non-empty string) or 'messages' (a list of messages)")
    # Hash the conversation, not the raw field, so "hi" and [{"role": "user", "content": "hi"}] are one prompt.
    encoded = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return {
        "content_hash": hashlib.sha256(encoded.encode()).hexdigest(),
        "text": text,
        "messages": messages,
        "source": row.get("source"),
        "source_id": None if row.get("id") is None else str(row["id"]),
        "family": row.get("family", row.get("task")),
        "tags": row.get("tags") or [],
        "gold": row.get("gold"),
        "split": row.get("split"),
        "created_at": utcnow(),
    }


def check_messages(messages: Any, index: int) -> None:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not ok:
        raise DataError(f"prompt row {index + 1}: 'messages' must be a non-empty list of {{'role', 'content'}} strings")


# ---- responses -----------------------------------------------------------------------------------------------


def sample_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Decoding settings in stored form: None means "off", stored as top_p 1.0 / top_k 0 so the unique key holds."""
    top_p, top_k = settings.get("top_p"), settings.get("top_k")
    return {
        "temperature": float(settings.get("temperature", 1.0)),
        "top_p": 1.0 if top_p is None else float(top_p),
        "top_k": 0 if top_k is None else int(top_k),
        "max_new_tokens": int(settings["max_new_tokens"]),
    }


def response_record(row: dict[str, Any], index: int) -> dict[str, Any]:
    missing = [k for k in ("prompt_id", "model_version_id", "seed", "max_new_tokens", "text") if row.get(k) is None]
    if missing:
        raise DataError(f"response row {index + 1} lacks {', '.join(missing)}")
    token_ids, sample_token_logps, token_logps = (
        row.get("completion_token_ids"), row.get("sample_token_logps"), row.get("token_logps"),
    )
    record = {
        "prompt_id": int(row["prompt_id"]),
        "model_version_id": int(row["model_version_id"]),
        "seed": int(row["seed"]),
        "sample_index": int(row.get("sample_index", 0)),
        **sample_settings(row),
        # A sampled text can decode to a NUL (a byte-level token), which no backend should store: it becomes U+FFFD,
        # and the exact output stays in the token ids. A text given without token ids is the caller's, refused.
        "text": row["text"].replace("\x00", "\ufffd") if token_ids is not None else row["text"],
        "completion_token_ids": token_ids,
        "finish_reason": row.get("finish_reason"),
        "sample_token_logps": sample_token_logps,
        "token_logps": token_logps,
        "sample_logp": row.get("sample_logp", sum(sample_token_logps) if sample_token_logps is not None else None),
        "logp": row.get("logp", sum(token_logps) if token_logps is not None else None),
        "length": row.get("length", len(token_ids) if token_ids is not None else None),
        "created_at": utcnow(),
    }
    return record


def add_responses(store: Store, rows: list[dict[str, Any]]) -> list[int]:
    """Store sampled responses, returning ids in input order; a sample already stored (same key) keeps its row.

    Required per row: prompt_id, model_version_id, seed, max_new_tokens, text. Optional: sample_index (0),
    temperature (1.0), top_p, top_k, completion_token_ids, finish_reason, sample_token_logps, token_logps,
    sample_logp and logp (default: the sums of the token lists), length (default: number of token ids).
    """
    records = [response_record(row, index) for index, row in enumerate(rows)]
    keys = [tuple(record[k] for k in RESPONSE_KEY) for record in records]
    try:
        with store.write() as session:
            insert_ignoring_conflicts(session, Response, records, key=RESPONSE_KEY)
            ids = response_ids(session, records)
    except IntegrityError as error:  # duplicates are ignored, so this is a dangling prompt or version id
        raise DataError(f"response rows refer to a prompt or model version not in {store.url}") from error
    return [ids[key] for key in keys]


def response_ids(session: Session, records: list[dict[str, Any]]) -> dict[tuple, int]:
    """Map each record's unique key to its stored id (read back after the insert-or-ignore)."""
    key_columns = [getattr(Response, k) for k in RESPONSE_KEY]
    versions = sorted({record["model_version_id"] for record in records})
    ids: dict[tuple, int] = {}
    for chunk in chunks(sorted({record["prompt_id"] for record in records})):
        query = select(Response.id, *key_columns).where(
            Response.prompt_id.in_(chunk), Response.model_version_id.in_(versions)
        )
        ids.update({tuple(found[1:]): found[0] for found in session.execute(query)})
    return ids


def existing_sample_keys(
    store: Store, model_version_id: int, seed: int, settings: dict[str, Any]
) -> set[tuple[int, int]]:
    """(prompt_id, sample_index) of samples already stored for this version, seed and decoding settings,
    so a resumed generation run can skip them."""
    stored = sample_settings(settings)
    query = select(Response.prompt_id, Response.sample_index).where(
        Response.model_version_id == model_version_id,
        Response.seed == int(seed),
        *(getattr(Response, name) == value for name, value in stored.items()),
    )
    with store.read() as session:
        return set(session.execute(query).tuples().all())
