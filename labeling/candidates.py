"""The Candidates tab (reviewers): queue new candidate pairs from chosen model versions (issue 21 item 5).

A reviewer picks model versions (stored ones, or any model spec `align generate` takes), temperature, top-p, seed,
the prompts (the project's prompts in the store, the shipped task suite, or a prompt file on the server, and how
many) and samples per prompt. The request is checked and stored as a generation job (align.store.jobs); an app
process's background worker (align.jobs.JobWorker) runs it with `align generate`'s code and the pairs join the
queue, while annotators go on labeling. The jobs table shows each job's status, progress and error line.
Every handler checks the reviewer role itself (`Candidates`), so the hidden tab is not the only guard.
(No `from __future__ import annotations`: Gradio finds `gr.Request` parameters by their annotation.)
"""

from typing import Any, Optional

import gradio as gr

from align.jobs import STORE_PROMPTS, check_request
from align.store.jobs import list_jobs, queue_job
from align.store.pairs import PAIR_RULES
from labeling.handlers import REVIEW_ROLES, Labeling, Rejected
from labeling.render import escape_text

PROMPT_SOURCES = (STORE_PROMPTS, "tasks:train", "tasks:eval")


class Candidates:
    """The tab's actions without Gradio (the JSON API uses them too): role check, request check, queue, list."""

    def __init__(self, labeling: Labeling, worker=None):
        self.labeling, self.worker = labeling, worker

    def submit(self, user: Optional[str], request: dict[str, Any]) -> dict[str, Any]:
        """Queue a job from a request dict (check_request's arguments); the queued job's row."""
        self.labeling.require(user, REVIEW_ROLES)
        allowed = {"models", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "prompts", "limit", "n",
                   "pair_rule", "votes_required"}
        unknown = sorted(set(request) - allowed)
        if unknown:
            raise Rejected(f"unknown field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(allowed))}")
        try:
            checked = check_request(self.labeling.store, **request)
        except Exception as error:  # AlignError (or a value of the wrong type): one line for the reviewer
            raise Rejected(" ".join(str(error).split())) from None
        job = queue_job(self.labeling.store, user, **checked)
        if self.worker is not None:
            self.worker.wake()
        return public(job)

    def jobs(self, user: Optional[str], limit: int = 20) -> list[dict[str, Any]]:
        self.labeling.require(user, REVIEW_ROLES)
        return [public(job) for job in list_jobs(self.labeling.store, limit)]

    def versions(self, user: Optional[str]) -> list[str]:
        """Names of the stored model versions, newest first (the model picker's choices)."""
        from sqlalchemy import select

        from align.store import ModelVersion

        self.labeling.require(user, REVIEW_ROLES)
        with self.labeling.store.read() as session:
            return list(session.scalars(select(ModelVersion.name).order_by(ModelVersion.id.desc()).limit(200)))


def public(job: dict[str, Any]) -> dict[str, Any]:
    """A job as JSON-safe values (times as ISO strings)."""
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in job.items()}


def job_rows(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs table: one row per job, newest first."""
    rows = []
    for job in jobs:
        s = {"temperature": 1.0, "top_p": 1.0, "seed": 0, "max_new_tokens": 64, **job["settings"]}
        prompts = job["prompts"]
        progress = f"{job['done']}/{job['total']}" if job["total"] is not None else "–"
        rows.append({
            "job": job["id"], "status": job["status"], "progress": progress,
            "models": ", ".join(job["models"]),
            "settings": f"T={s['temperature']} top-p={s['top_p']} seed={s['seed']} max={s['max_new_tokens']}",
            "prompts": f"{prompts['source']}" + (f" (first {prompts['limit']})" if prompts.get("limit") else ""),
            "per prompt": job["samples_per_prompt"],
            "pairs": (job["result"] or {}).get("pairs", ""),
            "error": job["error"] or "",
            "by": job["requested_by"],
        })
    return rows


def candidates_tab_body() -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown("Sample new candidate pairs with chosen model versions; they join the labeling queue when the job "
                "is done. Annotators keep labeling meanwhile. Samples are stored with the same provenance as "
                "`align generate` (version, settings, seed, token ids, log-probs).")
    with gr.Row():
        c["models"] = gr.Dropdown([], multiselect=True, allow_custom_value=True, label="Model versions (stored "
                                  "names, or a model spec)", elem_id="candidates-models", scale=3)
        c["prompts"] = gr.Dropdown(list(PROMPT_SOURCES), value=STORE_PROMPTS, allow_custom_value=True,
                                   label="Prompts (store: the project's; or a prompt file on the server)",
                                   elem_id="candidates-prompts", scale=2)
        c["limit"] = gr.Number(label="How many prompts (0: all)", value=10, precision=0, scale=1)
    with gr.Row():
        c["temperature"] = gr.Number(label="Temperature", value=1.0, elem_id="candidates-temperature")
        c["top_p"] = gr.Number(label="Top-p (1: off; < 1 weakens importance weights)", value=1.0)
        c["seed"] = gr.Number(label="Seed", value=0, precision=0)
        c["n"] = gr.Number(label="Samples per prompt", value=2, precision=0)
        c["max_new_tokens"] = gr.Number(label="Max new tokens", value=64, precision=0)
        c["votes_required"] = gr.Number(label="Votes per pair", value=3, precision=0)
        c["pair_rule"] = gr.Radio(list(PAIR_RULES), value="random_iid", label="Pairs")
    with gr.Row():
        c["submit"] = gr.Button("Queue generation", variant="primary", elem_id="candidates-submit", scale=0)
        c["refresh"] = gr.Button("Refresh", size="sm", scale=0, elem_id="candidates-refresh")
    c["status"] = gr.Markdown(elem_id="candidates-status")
    c["jobs"] = gr.Dataframe(label="Generation jobs (newest first)", elem_id="candidates-jobs")
    # Refreshes the jobs table every few seconds; switched on only by the reviewer-checked tab handler.
    c["timer"] = gr.Timer(5.0, active=False)
    return c


def wire_candidates(candidates: Candidates, c: dict[str, Any], tab: Any, guarded, table, fast: dict) -> None:
    fields = ("models", "prompts", "limit", "temperature", "top_p", "seed", "n", "max_new_tokens", "votes_required",
              "pair_rule")

    def on_open(request: gr.Request):
        user = request.username
        return (gr.Dropdown(choices=candidates.versions(user)), table(job_rows(candidates.jobs(user))),
                gr.Timer(active=True))

    def on_submit(models, prompts, limit, temperature, top_p, seed, n, max_new_tokens, votes_required, pair_rule,
                  request: gr.Request):
        values = (models, prompts, limit, temperature, top_p, seed, n, max_new_tokens, votes_required, pair_rule)
        job = candidates.submit(request.username, dict(zip(fields, values)))
        what = escape_text(f"{', '.join(job['models'])} on {job['prompts']['source']}")
        status = f"Queued job {job['id']}: {what}. The table below follows it."
        return status, table(job_rows(candidates.jobs(request.username)))

    def on_refresh(request: gr.Request):
        return table(job_rows(candidates.jobs(request.username)))

    tab.select(guarded(on_open), None, [c["models"], c["jobs"], c["timer"]], api_visibility="private", **fast)
    c["timer"].tick(guarded(on_refresh), None, c["jobs"], api_visibility="private", **fast)
    c["submit"].click(guarded(on_submit), [c[f] for f in fields], [c["status"], c["jobs"]],
                      api_name="generate_candidates", **fast)
    c["refresh"].click(guarded(on_refresh), None, c["jobs"], api_name="generation_jobs", **fast)
