"""A failed command leaves nothing in the store that looks like a result.

`generate` and `eval` register model versions and add prompts before they sample; when they then fail (a model
that will not load, a gold check that cannot score the prompts, an interrupt), `discard_unused_on_failure` removes
the rows the failed call itself added that nothing refers to: prompts without responses or pairs, versions without
responses or child versions. Rows that existed before, or that samples already refer to (resumable work), stay.
"""

from __future__ import annotations

import functools
import logging
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Optional

from sqlalchemy import delete, exists, func, select

from align.store.schema import ModelVersion, Pair, Prompt, Response

log = logging.getLogger(__name__)

# ids added inside the running guarded call, by table; None outside one
_added: ContextVar[Optional[dict[str, set[int]]]] = ContextVar("align_store_added", default=None)


def note_added(table: str, ids: Iterable[int]) -> None:
    """Called by the functions that add rows: remember the ids for the guarded call, if one is running."""
    added = _added.get()
    if added is not None:
        added.setdefault(table, set()).update(ids)


def discard_unused_on_failure(fn: Callable) -> Callable:
    """Decorate a function whose first argument is a Store (see the module docstring)."""

    @functools.wraps(fn)
    def run(store: Any, *args: Any, **kwargs: Any) -> Any:
        if _added.get() is not None:  # nested: the outermost call cleans up
            return fn(store, *args, **kwargs)
        with store.read() as session:
            marks = {"prompt": session.scalar(select(func.max(Prompt.id))) or 0,
                     "model_version": session.scalar(select(func.max(ModelVersion.id))) or 0}
        added: dict[str, set[int]] = {}
        token = _added.set(added)
        try:
            return fn(store, *args, **kwargs)
        except BaseException:
            try:
                _discard(store, marks, added)
            except Exception as exc:  # noqa: BLE001 - the original error is the one to report
                log.warning("could not remove the rows a failed call added: %s", exc)
            raise
        finally:
            _added.reset(token)

    return run


def _discard(store: Any, marks: dict[str, int], added: dict[str, set[int]]) -> None:
    # Only ids above the marks are new: an id this call found already stored is someone else's row.
    prompts = sorted(i for i in added.get("prompt", ()) if i > marks["prompt"])
    versions = sorted((i for i in added.get("model_version", ()) if i > marks["model_version"]), reverse=True)
    with store.write() as session:
        if prompts:
            session.execute(delete(Prompt).where(
                Prompt.id.in_(prompts), ~exists().where(Response.prompt_id == Prompt.id),
                ~exists().where(Pair.prompt_id == Prompt.id)))
        for version in versions:  # children (registered after their parents) first
            child = select(ModelVersion.id).where(ModelVersion.parent_id == version).exists()
            used = exists().where(Response.model_version_id == version)
            session.execute(delete(ModelVersion).where(ModelVersion.id == version, ~used, ~child))
    if prompts or versions:
        log.info("removed what the failed call added and nothing uses: up to %d prompt(s), %d model version(s)",
                 len(prompts), len(versions))
