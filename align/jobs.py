"""Live candidates (issue 21 item 5): generation jobs a reviewer queues from the labeling app, run in the background
by `align generate`'s own code (`align.sampling.generate_to_store`), so the new samples carry the same provenance
(model version, decoding settings, seed, token ids, per-token log-probs) and their pairs join the labeling queue.

    request = check_request(store, models=["tiny-v1"], temperature=0.7, prompts="store", limit=20, n=2)
    job_id = submit_job(store, "rita", **request)
    worker = JobWorker(store).start()    # a thread in each app process; exactly one of them claims each job

The worker is a thread outside Gradio's event handlers: annotators lease and vote while it samples (each batch is
its own short write transaction, as in `align generate`). A job that fails records one line (`error`) that the
reviewer's screen shows; the traceback goes to the server's log only.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any, Callable, Optional

from sqlalchemy import select

from align.errors import AlignError
from align.generation import SamplingSettings
from align.store.db import Store, first_line
from align.store.jobs import STALE_SECONDS, claim_job, fail_job, finish_job, report_progress, submit_job, waiting
from align.store.pairs import PAIR_RULES, prompt_messages
from align.store.schema import Prompt
from align.store.versions import find_version

log = logging.getLogger(__name__)

STORE_PROMPTS = "store"  # the prompt source "the project's prompts": those already in the store, in id order
MAX_SAMPLES_PER_PROMPT = 16
HEARTBEAT_SECONDS = 30.0
# One job at a time per process: transformers' model loading patches torch globally (two loads at once can leave
# weights uninitialised) and sampling seeds torch's global generator, so two jobs in one process would draw each
# other's random numbers. Other processes on the store run the other jobs.
RUNNING = threading.Lock()

__all__ = ["JobWorker", "check_request", "prompt_rows", "run_job", "submit_job"]


def check_request(store: Store, models: list[str] | str, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0, max_new_tokens: int = 64, seed: int = 0, prompts: str = STORE_PROMPTS,
                  limit: Optional[int] = None, n: int = 2, pair_rule: str = "random_iid",
                  votes_required: int = 3) -> dict[str, Any]:
    """A job request checked before it is queued, as `submit_job`'s keyword arguments; AlignError with one line
    naming the field otherwise. Models are stored version names or model specs (`align generate --model`)."""
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models or []) if m and m.strip()]
    if not names:
        raise AlignError("models: pick at least one model version")
    for name in names:
        check_model(store, name)
    try:
        settings = SamplingSettings(float(temperature), float(top_p), int(top_k), int(max_new_tokens), int(seed))
        n, votes_required = int(n), int(votes_required)
        limit = None if limit in (None, "", 0) else int(limit)
    except (TypeError, ValueError) as error:
        raise AlignError(f"sampling settings: {error}") from None
    if not 1 <= n <= MAX_SAMPLES_PER_PROMPT:
        raise AlignError(f"samples per prompt: 1 to {MAX_SAMPLES_PER_PROMPT}, got {n}")
    if limit is not None and limit < 1:
        raise AlignError(f"prompt count: at least 1, got {limit}")
    if pair_rule not in PAIR_RULES:
        raise AlignError(f"pair rule: one of {', '.join(PAIR_RULES)}, got {pair_rule!r}")
    if votes_required < 1:
        raise AlignError(f"votes per pair: at least 1, got {votes_required}")
    source = (prompts or STORE_PROMPTS).strip()
    prompt_rows(store, source, limit)  # the source must give prompts now, not fail later in the worker
    return {"models": names, "settings": settings.as_dict(), "prompts": {"source": source, "limit": limit},
            "samples_per_prompt": n, "pair_rule": pair_rule, "votes_required": votes_required}


def check_model(store: Store, name: str) -> None:
    """A stored version name, an embedded alias, or a spec that resolves (a local directory or a hub id)."""
    from align.models import EMBEDDED_MODELS, resolve_model

    if find_version(store, name) is not None or name in EMBEDDED_MODELS:
        return
    try:
        resolve_model(name)
    except AlignError as error:
        raise AlignError(f"model {name!r}: {error}") from None


def prompt_rows(store: Store, source: str, limit: Optional[int] = None) -> list[dict[str, Any]]:
    """Prompt rows of a source: "store" (the project's prompts, in id order), tasks:train / tasks:eval, or a
    prompt file on the server (align.prompts.resolve_prompts); the first `limit` of them."""
    from align.prompts import resolve_prompts

    if source != STORE_PROMPTS:
        return resolve_prompts(source, None, limit)
    with store.read() as session:
        query = select(Prompt).order_by(Prompt.id)
        found = list(session.scalars(query.limit(limit) if limit else query))
    if not found:
        raise AlignError("prompts: the store holds no prompts yet; give a prompt file or tasks:train")
    # The same canonical messages hash to the same prompt row, so the samples join the prompts already stored.
    return [{"messages": prompt_messages(p), "family": p.family, "gold": p.gold, "split": p.split,
             "source": p.source, "tags": p.tags} for p in found]


def run_job(store: Store, job: dict[str, Any], batch_size: int = 16,
            progress: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
    """Run one job: `generate_to_store` (what `align generate` runs) for each model in turn. `progress(done,
    total)` after each stored batch, counting responses over all models (those already stored count as done)."""
    from align.sampling import generate_to_store

    settings = SamplingSettings(**job["settings"])
    rows = prompt_rows(store, job["prompts"]["source"], job["prompts"].get("limit"))
    n, models = job["samples_per_prompt"], job["models"]
    per_model = len(rows) * n
    total = per_model * len(models)
    summaries = []
    for index, spec in enumerate(models):
        before = index * per_model
        skipped = [0]

        def on_batch(done: int, todo: int, before=before, skipped=skipped) -> None:
            skipped[0] = per_model - todo
            if progress is not None:
                progress(before + skipped[0] + done, total)

        summaries.append(generate_to_store(store, spec, rows, n, settings, batch_size, job["pair_rule"],
                                           job["votes_required"], on_batch=on_batch))
    return {"models": summaries, "generated": sum(s["generated"] for s in summaries),
            "pairs": sum(s["pairs"] for s in summaries), "prompts": len(rows)}


class JobWorker:
    """A background thread that claims queued generation jobs from the store and runs them, one at a time.

    Every app process runs one; `claim_job` gives each job to one of them. Idle, it checks for work every
    `poll_seconds` with a read (no write lock); `wake()` checks at once (the app calls it after a submit).
    `on_progress(job_id, done, total)`, if given, is called from the worker thread after each reported batch."""

    def __init__(self, store: Store, poll_seconds: float = 2.0, stale_seconds: float = STALE_SECONDS,
                 batch_size: int = 16, on_progress: Optional[Callable[[int, int, int], None]] = None,
                 name: Optional[str] = None):
        self.store, self.poll_seconds, self.stale_seconds = store, poll_seconds, stale_seconds
        self.batch_size, self.on_progress = batch_size, on_progress
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "JobWorker":
        self._thread = threading.Thread(target=self._loop, daemon=True, name="align-generation-jobs")
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if waiting(self.store, stale_seconds=self.stale_seconds) and self.run_once() is not None:
                    continue  # another job may be waiting
            except Exception:  # the store is unreachable for a moment: try again later, never die
                log.exception("generation job worker: checking for jobs failed")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def run_once(self) -> Optional[int]:
        """Claim one job and run it to the end here; its id, or None when none waited (or this process is running
        one already: the job is left to another process)."""
        if not RUNNING.acquire(blocking=False):
            return None
        try:
            job = claim_job(self.store, self.name, stale_seconds=self.stale_seconds)
            if job is None:
                return None
            self.execute(job)
            return job["id"]
        finally:
            RUNNING.release()

    def execute(self, job: dict[str, Any]) -> None:
        state = {"done": 0, "total": None}
        beating = threading.Event()

        def beat() -> None:  # model loading can take a while: say the worker is alive meanwhile
            while not beating.wait(HEARTBEAT_SECONDS):
                report_progress(self.store, job["id"], self.name, state["done"], state["total"])

        def progress(done: int, total: int) -> None:
            state.update(done=done, total=total)
            report_progress(self.store, job["id"], self.name, done, total)
            if self.on_progress is not None:
                self.on_progress(job["id"], done, total)

        heart = threading.Thread(target=beat, daemon=True, name=f"align-job-{job['id']}-heartbeat")
        heart.start()
        try:
            result = run_job(self.store, job, self.batch_size, progress)
        except AlignError as error:
            fail_job(self.store, job["id"], self.name, str(error))
        except Exception as error:  # a failure of ours: logged in full, one line for the reviewer
            log.exception("generation job %s failed", job["id"])
            fail_job(self.store, job["id"], self.name, f"generation failed ({type(error).__name__}: "
                                                       f"{first_line(error)})")
        else:
            finish_job(self.store, job["id"], self.name, result)
        finally:
            beating.set()
            heart.join()
