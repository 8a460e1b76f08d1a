"""Live candidates (issue 21 item 5): generation jobs queued from the labeling app, claimed by exactly one worker,
run by `align generate`'s code (same token ids and log-probs), their pairs leasable; errors as one line."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from align.errors import AlignError
from align.jobs import JobWorker, check_request
from align.store import Pair, Prompt, Response, add_prompts, connect, lease_next_pair
from align.store.clock import utcnow
from align.store.jobs import claim_job, get_job, report_progress, submit_job
from tests.db import fill_store
from tests.helpers import run_cli

PROMPTS = [{"prompt": "Add 2 and 3."}, {"prompt": "Name a colour."}, {"prompt": "Spell cat backwards."}]


def samples(store) -> dict[tuple[str, int], Response]:
    with store.read() as session:
        rows = session.execute(select(Response, Prompt.text).join(Prompt, Response.prompt_id == Prompt.id)).all()
    return {(text, r.sample_index): r for r, text in rows}


def test_a_job_samples_exactly_what_align_generate_does_and_its_pairs_are_leasable(store, tiny_model_dir, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    spec = str(tiny_model_dir)
    request = check_request(store, [spec], temperature=0.9, top_p=1.0, seed=7, max_new_tokens=6, prompts=str(path),
                            n=2, votes_required=2)
    job_id = submit_job(store, "rita", **request)
    assert get_job(store, job_id)["status"] == "queued"
    seen = []
    worker = JobWorker(store, on_progress=lambda job, done, total: seen.append((job, done, total)))
    assert worker.run_once() == job_id and worker.run_once() is None  # nothing else waits
    job = get_job(store, job_id)
    assert job["status"] == "done" and job["error"] is None and (job["done"], job["total"]) == (6, 6)
    assert job["result"]["generated"] == 6 and job["result"]["pairs"] == 3 and seen[-1] == (job_id, 6, 6)

    other = f"sqlite:///{tmp_path / 'cli.db'}"
    code, _, err = run_cli("generate", "--model", spec, "--prompts", str(path), "--n", "2", "--temperature", "0.9",
                           "--seed", "7", "--max_new_tokens", "6", "--db", other)
    assert code == 0, err
    with connect(other) as cli_store:
        expected = samples(cli_store)
    got = samples(store)
    assert set(got) == set(expected) and len(got) == 6
    for key, response in got.items():
        want = expected[key]
        assert response.completion_token_ids == want.completion_token_ids
        assert response.token_logps == pytest.approx(want.token_logps, abs=1e-6)
        assert response.sample_token_logps == pytest.approx(want.sample_token_logps, abs=1e-6)
        assert (response.temperature, response.top_p, response.seed, response.max_new_tokens) == (0.9, 1.0, 7, 6)
        assert len(response.token_logps) == len(response.completion_token_ids) > 0

    leased = lease_next_pair(store, "alice")
    with store.read() as session:
        pair = session.get(Pair, leased)
        assert pair.votes_required == 2 and pair.rule == "random_iid"
        assert {pair.response_a_id, pair.response_b_id} <= {r.id for r in got.values()}


def test_each_job_is_claimed_by_exactly_one_worker(store_url):
    with connect(store_url) as store:
        jobs = [submit_job(store, "rita", ["m"], {"temperature": 1.0}, {"source": "store"}, 2) for _ in range(3)]
    stores = [connect(store_url) for _ in range(6)]  # one per claimer, like separate app processes
    barrier, claimed = threading.Barrier(len(stores)), []

    def claim(index: int) -> None:
        barrier.wait()
        job = claim_job(stores[index], f"worker-{index}")
        if job is not None:
            claimed.append((job["id"], job["worker"]))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert sorted(job for job, _ in claimed) == jobs  # each job once, no job twice
        assert [get_job(stores[0], j)["attempts"] for j in jobs] == [1, 1, 1]
        assert len({worker for _, worker in claimed}) == 3
        store = stores[0]
        assert claim_job(store, "late") is None
        first, owner = min(claimed)
        # A worker that went silent (its process was killed) loses the job after stale_seconds, to one new worker.
        later = utcnow() + timedelta(seconds=901)
        taken = claim_job(store, "rescuer", now=later)
        assert taken["id"] == first and taken["worker"] == "rescuer" and taken["attempts"] == 2
        report_progress(store, first, owner, done=5)  # the old worker's late report changes nothing now
        assert get_job(store, first)["done"] == 0 and get_job(store, first)["worker"] == "rescuer"
    finally:
        for opened in stores:
            opened.close()


def test_bad_requests_are_refused_with_one_line(store, tmp_path):
    with pytest.raises(AlignError, match="prompts: the store holds no prompts yet"):
        check_request(store, ["smollm2-135m-instruct"], prompts="store")
    fill_store(store, n_prompts=2, samples=1)
    cases = [
        (dict(models=[]), "pick at least one model"),
        (dict(models=["no-such-model"]), "model 'no-such-model': unknown model"),
        (dict(models=[str(tmp_path / "missing")]), "model path does not exist"),
        (dict(models=["v0"], temperature=-1), "temperature must be >= 0"),
        (dict(models=["v0"], top_p=0), "top_p must be in"),
        (dict(models=["v0"], seed="x"), "sampling settings"),
        (dict(models=["v0"], n=0), "samples per prompt: 1 to 16"),
        (dict(models=["v0"], prompts=str(tmp_path / "none.jsonl")), "none.jsonl"),
        (dict(models=["v0"], prompts="tasks:test"), "unknown task split"),
        (dict(models=["v0"], pair_rule="best"), "pair rule"),
    ]
    for kwargs, message in cases:
        with pytest.raises(AlignError, match=message):
            check_request(store, **kwargs)
    ok = check_request(store, "v0, smollm2-135m-instruct", prompts="store", limit=1)
    assert ok["models"] == ["v0", "smollm2-135m-instruct"] and ok["prompts"] == {"source": "store", "limit": 1}


def test_a_job_that_fails_records_one_line_and_the_worker_goes_on(store, tiny_model_dir):
    fill_store(store, n_prompts=1, samples=1)
    # Passes the request check (a hub id) but cannot load offline; then a stored version with no loadable model.
    broken = submit_job(store, "rita", ["nobody/no-such-model"], {"max_new_tokens": 4}, {"source": "store"}, 2)
    gone = submit_job(store, "rita", ["v0"], {"max_new_tokens": 4}, {"source": "store"}, 2)
    good = submit_job(store, "rita", [str(tiny_model_dir)], {"max_new_tokens": 4}, {"source": "store"}, 2)
    worker = JobWorker(store)
    assert [worker.run_once() for _ in range(3)] == [broken, gone, good]
    failed = get_job(store, broken)
    assert failed["status"] == "failed" and "\n" not in failed["error"] and "Traceback" not in failed["error"]
    assert "no-such-model" in failed["error"]
    assert get_job(store, gone)["status"] == "failed" and "v0" in get_job(store, gone)["error"]
    assert get_job(store, good)["status"] == "done" and get_job(store, good)["result"]["generated"] == 2


def test_migration_to_v5_adds_the_jobs_table(store_url):
    from sqlalchemy import inspect, text, update

    from align.store.schema import Meta

    connect(store_url).close()
    with connect(store_url) as store, store.write() as session:
        session.execute(text("DROP TABLE generation_job"))
        session.execute(update(Meta).where(Meta.key == "schema_version").values(value="4"))
    with connect(store_url) as store:
        with store.read() as session:
            assert "generation_job" in inspect(session.connection()).get_table_names()
        assert submit_job(store, "rita", ["m"], {}, {"source": "store"}, 1) == 1


def test_in_the_app_a_reviewer_queues_a_job_and_annotators_vote_while_it_runs(tmp_path, tiny_model_dir):
    """The launched app with its job worker: the reviewer queues through the Candidates tab's endpoint, an annotator
    is refused; while the worker is held mid-job (after its first stored batch) the annotator leases and votes."""
    pytest.importorskip("gradio_client")
    import time

    import httpx
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from align.store import Vote, add_user, make_pairs
    from labeling.app import build_app, close_app, launch_app
    from tests.test_labeling_api import VOTE, free_port, view

    url = f"sqlite:///{tmp_path / 'store.db'}"
    with connect(url) as store:
        filled = fill_store(store, n_prompts=3, samples=2)
        old_pairs = make_pairs(store, filled["version_id"], votes_required=2)
        add_user(store, "alice", "pw-alice-0123", "annotator")
        add_user(store, "rita", "pw-rita-0123", "reviewer")
    demo = build_app(url, job_worker=True, release_grace=0)
    worker = demo.candidates.worker
    worker.batch_size = 4  # 4 samples per batch: one prompt at a time, so the job has three batches
    reached, go = threading.Event(), threading.Event()

    def hold(job_id, done, total):
        if 0 < done < total and not reached.is_set():
            reached.set()
            go.wait(120)

    worker.on_progress = hold
    base = launch_app(demo, port=free_port(), block=False, quiet=True)
    try:
        rita = Client(base, auth=("rita", "pw-rita-0123"), verbose=False)
        alice = Client(base, auth=("alice", "pw-alice-0123"), verbose=False)
        form = dict(models=[str(tiny_model_dir)], prompts="store", limit=3, temperature=1.0, top_p=1.0, seed=3, n=4,
                    max_new_tokens=6, votes_required=2, pair_rule="random_iid")
        with pytest.raises(AppError, match="has the role annotator; this needs reviewer or admin"):
            alice.predict(**form, api_name="/generate_candidates")
        with pytest.raises(AppError, match="temperature must be >= 0"):
            rita.predict(**{**form, "temperature": -1}, api_name="/generate_candidates")
        status, _ = rita.predict(**form, api_name="/generate_candidates")
        assert status.startswith("Queued job 1")
        assert reached.wait(120), "the worker never stored a first batch"
        with connect(url) as store:
            job = get_job(store, 1)
        assert job["status"] == "running" and (job["done"], job["total"]) == (4, 12)
        # The job is mid-run in this very process: the annotator still gets a pair and votes.
        first = view(alice.predict(api_name="/next"))
        assert first.pair_id in old_pairs
        after = view(alice.predict(first.pair_id, *VOTE, api_name="/vote_left"))
        assert after.status == "Saved: A (left) better."
        with connect(url) as store, store.read() as session:
            assert session.scalars(select(Vote.pair_id).where(Vote.annotator == "alice")).all() == [first.pair_id]
        go.set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with connect(url) as store:
                job = get_job(store, 1)
            if job["status"] != "running":
                break
            time.sleep(0.2)
        assert job["status"] == "done" and job["result"]["pairs"] == 6 and job["error"] is None
        table = rita.predict(api_name="/generation_jobs")
        assert table["data"][0][:3] == [1, "done", "12/12"]
        with connect(url) as store, store.read() as session:
            new = session.scalars(select(Pair).where(Pair.id.not_in(old_pairs))).all()
            assert len(new) == 6 and all(p.votes_required == 2 for p in new)
        # The JSON API: reviewers list and queue jobs; a bad spec is a 409 with one line, an annotator a 403.
        api = httpx.Client(base_url=base)
        token = api.post("login", data={"username": "rita", "password": "pw-rita-0123"}).json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        assert api.get("api/v1/jobs", headers=headers).json()["jobs"][0]["status"] == "done"
        bad = api.post("api/v1/jobs", headers=headers, json={"models": ["no-such-model"]})
        assert bad.status_code == 409 and bad.json()["error"].startswith("model 'no-such-model': unknown model")
        queued = api.post("api/v1/jobs", headers=headers, json={"models": ["v0"], "prompts": "store", "n": 2})
        assert queued.status_code == 200 and queued.json()["job"]["status"] == "queued"
        alice_token = api.post("login", data={"username": "alice", "password": "pw-alice-0123"}).json()["token"]
        refused = api.get("api/v1/jobs", headers={"Authorization": f"Bearer {alice_token}"})
        assert refused.status_code == 403
    finally:
        go.set()
        close_app(demo)


def test_two_running_workers_on_one_store_run_each_job_once(store_url, tiny_model_dir):
    """Two workers, each on its own connection, poll the same queue: every job starts exactly once (in one process
    they also take turns: `align.jobs.RUNNING`)."""
    with connect(store_url) as store:
        add_prompts(store, PROMPTS)
        jobs = [submit_job(store, "rita", [str(tiny_model_dir)], {"max_new_tokens": 4, "seed": seed},
                           {"source": "store", "limit": 2}, 2) for seed in range(3)]
    starts, lock = [], threading.Lock()

    def started(job_id, done, total, name):
        if done == 0:
            with lock:
                starts.append((job_id, name))

    stores = [connect(store_url) for _ in range(2)]
    workers = [JobWorker(s, poll_seconds=0.05, name=f"app-{i}",
                         on_progress=lambda j, d, t, i=i: started(j, d, t, f"app-{i}")).start()
               for i, s in enumerate(stores)]
    try:
        import time

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(get_job(stores[0], j)["status"] in ("queued", "running")
                                                  for j in jobs):
            time.sleep(0.1)
        finished = [get_job(stores[0], j) for j in jobs]
    finally:
        for worker in workers:
            worker.stop()
        for opened in stores:
            opened.close()
    assert [(job["status"], job["error"]) for job in finished] == [("done", None)] * 3
    assert sorted(job_id for job_id, _ in starts) == jobs  # each job started once, by one of the two
    assert {job["worker"] for job in finished} <= {"app-0", "app-1"}
    assert sum(job["result"]["generated"] for job in finished) == 3 * 2 * 2


def test_align_label_processes_run_queued_jobs_each_once(tmp_path, tiny_model_dir):
    """`align label --workers 2` as documented: both processes run a job worker; jobs queued in the store are run,
    each claimed once, with `align generate`'s provenance."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from labeling.workers import free_port_range, stop_process_group

    url = f"sqlite:///{tmp_path / 'store.db'}"
    with connect(url) as store:
        add_prompts(store, PROMPTS)
    port = free_port_range(2)
    root = Path(__file__).resolve().parents[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "align", "label", "--db", url, "--workers", "2", "--port", str(port)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    try:
        assert "2 processes on ports" in server.stdout.readline(), server.stderr.read()[-3000:]
        with connect(url) as store:
            jobs = [submit_job(store, "rita", **check_request(store, [str(tiny_model_dir)], seed=seed, n=2, limit=2,
                                                              max_new_tokens=4)) for seed in range(4)]
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and any(get_job(store, j)["status"] in ("queued", "running")
                                                      for j in jobs):
                time.sleep(0.5)
            finished = [get_job(store, j) for j in jobs]
            with store.read() as session:
                stored = session.execute(select(Response.seed, Response.prompt_id, Response.sample_index,
                                                Response.token_logps)).all()
    finally:
        stop_process_group(server)
    assert [(job["status"], job["error"], job["attempts"]) for job in finished] == [("done", None, 1)] * 4
    assert sum(job["result"]["generated"] for job in finished) == 4 * 2 * 2
    assert len(stored) == 16 and len({row[:3] for row in stored}) == 16 and all(row[3] for row in stored)
