"""Generation jobs: new candidate pairs requested from the labeling app, queued in the store (issue 21 item 5).

    job_id = submit_job(store, "rita", ["tiny-v1"], settings.as_dict(), {"source": "store", "limit": 20}, n=2)
    job = claim_job(store, "host:123")      # the job, now running and claimed by this worker; None when none waits
    ... align.jobs.run_job(store, job) ...  # `align generate`'s code path; progress / finish_job / fail_job

Any number of app processes poll the same table; `claim_job` hands a queued job to exactly one of them, with the
pattern the lease queue uses: on PostgreSQL the row is taken `FOR UPDATE SKIP LOCKED` (two claimers never wait on
or take the same job); on SQLite the claim is one short BEGIN IMMEDIATE transaction. A job whose worker stopped
beating (a killed process) is claimed again after `stale_seconds`: generation resumes past the stored samples, so
a second run only finishes what the first began.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update

from align.errors import AlignError
from align.store.clock import utc, utcnow
from align.store.db import Store
from align.store.schema import GenerationJob
from align.store.slots import first_unlocked

STALE_SECONDS = 900  # a running job whose worker has not reported for this long is handed to another worker
JOB_FIELDS = ("id", "requested_by", "status", "models", "settings", "prompts", "samples_per_prompt", "pair_rule",
              "votes_required", "done", "total", "result", "error", "worker", "attempts", "created_at", "started_at",
              "finished_at")


def submit_job(store: Store, requested_by: str, models: list[str], settings: dict[str, Any],
               prompts: dict[str, Any], samples_per_prompt: int, pair_rule: str = "random_iid",
               votes_required: int = 3) -> int:
    """Queue a generation job; return its id. The caller has checked the request (align.jobs.check_request)."""
    return queue_job(store, requested_by, models, settings, prompts, samples_per_prompt, pair_rule,
                     votes_required)["id"]


def queue_job(store: Store, requested_by: str, models: list[str], settings: dict[str, Any],
              prompts: dict[str, Any], samples_per_prompt: int, pair_rule: str = "random_iid",
              votes_required: int = 3) -> dict[str, Any]:
    """Queue a generation job; return its row as queued (a worker may claim it the moment this commits)."""
    if not models:
        raise AlignError("a generation job needs at least one model version")
    with store.write() as session:
        job = GenerationJob(requested_by=requested_by, status="queued", models=list(models), settings=dict(settings),
                            prompts=dict(prompts), samples_per_prompt=samples_per_prompt, pair_rule=pair_rule,
                            votes_required=votes_required, done=0, attempts=0, created_at=utcnow())
        session.add(job)
        session.flush()
        return as_dict(job)


def waiting(store: Store, now: datetime | None = None, stale_seconds: float = STALE_SECONDS) -> bool:
    """Whether a job is there to claim: a read, so idle workers polling never take SQLite's write lock."""
    with store.read() as session:
        return session.scalar(claimable(now, stale_seconds).with_only_columns(GenerationJob.id).limit(1)) is not None


def claimable(now: datetime | None, stale_seconds: float):
    now = utc(now) or utcnow()
    stale = now - timedelta(seconds=stale_seconds)
    return select(GenerationJob).where(or_(
        GenerationJob.status == "queued",
        (GenerationJob.status == "running") & (GenerationJob.heartbeat_at < stale),
    ))


def claim_job(store: Store, worker: str, now: datetime | None = None,
              stale_seconds: float = STALE_SECONDS) -> dict[str, Any] | None:
    """Take the oldest queued job (or one whose worker went silent) for `worker`: it is marked running in the same
    transaction, so no other claimer gets it. Returns the job as a dict, or None when nothing waits."""
    now = utc(now) or utcnow()
    with store.write() as session:
        job = first_unlocked(session, claimable(now, stale_seconds).order_by(GenerationJob.id))
        if job is None:
            return None
        job.status, job.worker, job.started_at, job.heartbeat_at, job.error = "running", worker, now, now, None
        job.attempts = (job.attempts or 0) + 1
        session.flush()
        return as_dict(job)


def report_progress(store: Store, job_id: int, worker: str, done: int, total: int | None = None) -> None:
    """Record how far a running job is (and that its worker is alive). A job another worker took over is left."""
    values: dict[str, Any] = {"done": done, "heartbeat_at": utcnow()}
    if total is not None:
        values["total"] = total
    with store.write() as session:
        session.execute(update(GenerationJob).where(GenerationJob.id == job_id, GenerationJob.worker == worker,
                                                    GenerationJob.status == "running").values(**values))


def finish_job(store: Store, job_id: int, worker: str, result: dict[str, Any]) -> None:
    with store.write() as session:
        session.execute(update(GenerationJob).where(GenerationJob.id == job_id, GenerationJob.worker == worker)
                        .values(status="done", result=result, finished_at=utcnow(), heartbeat_at=utcnow()))


def fail_job(store: Store, job_id: int, worker: str, message: str) -> None:
    """Mark the job failed with one line for the reviewer's screen."""
    line = " ".join(message.split())[:2000] or "generation failed"
    with store.write() as session:
        session.execute(update(GenerationJob).where(GenerationJob.id == job_id, GenerationJob.worker == worker)
                        .values(status="failed", error=line, finished_at=utcnow(), heartbeat_at=utcnow()))


def list_jobs(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    """The newest jobs first, as dicts."""
    with store.read() as session:
        found = session.scalars(select(GenerationJob).order_by(GenerationJob.id.desc()).limit(limit))
        return [as_dict(job) for job in found]


def get_job(store: Store, job_id: int) -> dict[str, Any]:
    with store.read() as session:
        job = session.get(GenerationJob, job_id)
        if job is None:
            raise AlignError(f"no generation job {job_id}")
        return as_dict(job)


def as_dict(job: GenerationJob) -> dict[str, Any]:
    return {name: getattr(job, name) for name in JOB_FIELDS}
