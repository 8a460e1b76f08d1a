"""Load test of the labeling app through its real HTTP API: N simulated annotators vote for D seconds.

    python bench/labeling_load.py                      # 100 annotators, 60 s, SQLite, server in a subprocess
    python bench/labeling_load.py --think 2            # a stress test: every annotator votes every ~2 s
    python bench/labeling_load.py -n 20 -d 10 --db postgresql://...   # an empty PostgreSQL database

Each annotator logs in (POST /login) and opens a session, then loops: think, vote, get the next pair, until the
time is up or nothing is left. Calls use the protocol of the page itself (and of gradio_client): POST the
inputs to /gradio_api/queue/join with the session's hash, then read the result from /gradio_api/queue/data. It prints votes/s, the vote round trip (p50/p95, request sent to next pair received),
and checks the store against what the clients saw acknowledged: lost votes (acknowledged, not stored),
duplicated votes (stored twice for one annotator and pair, or stored without an acknowledgement) and pairs
with more votes than they require. Targets on SQLite: zero lost, zero duplicated, p95 < 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align.store import (
    Vote,
    add_prompts,
    add_responses,
    add_user,
    connect,
    make_pairs,
    register_model_version,
)
from align.store.votes import in_effect

CHOICES = ("left", "right", "tie")


class CallError(Exception):
    """The app refused a call (gr.Error): e.g. the pair is no longer leased."""


@dataclass
class Stats:
    acked: list[tuple[str, int]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    refused: int = 0
    failed: int = 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_store(url: str, n_annotators: int, n_pairs: int, votes_required: int = 3) -> list[tuple[str, str]]:
    """Fill an empty store with `n_pairs` pairs and `n_annotators` logins; returns (name, password)s."""
    with connect(url) as store:
        version = register_model_version(store, {"name": "bench-v0", "base_model": "bench", "adapter_hash": "0"})
        prompt_ids = add_prompts(store, [{"prompt": f"Question {i}: explain **item** {i}."} for i in range(n_pairs)])
        rows = [
            {"prompt_id": p, "model_version_id": version, "seed": 0, "sample_index": k, "max_new_tokens": 64,
             "text": f"Answer {k} to {p}:\n\n```python\nprint({p} < {k})\n```\nwith *markdown* and <b>html</b>."}
            for p in prompt_ids for k in (0, 1)
        ]
        add_responses(store, rows)
        make_pairs(store, version, votes_required=votes_required)
        users = [(f"annotator{i:03d}", f"pw-{i}-{random.random():.6f}") for i in range(n_annotators)]
        for name, password in users:
            add_user(store, name, password)
    return users


class Session:
    """One browser tab's connection: a login cookie, a session hash, and the app's endpoint ids."""

    def __init__(self, client: httpx.AsyncClient, fn_ids: dict[str, int]):
        self.client, self.fn_ids = client, fn_ids
        self.session_hash = uuid.uuid4().hex[:11]

    async def call(self, endpoint: str, data: list) -> list:
        """What the page does on a click: join the queue with the inputs, then read the session's event stream
        until this event completes."""
        joined = await self.client.post("/gradio_api/queue/join", json={
            "data": data, "fn_index": self.fn_ids[endpoint], "session_hash": self.session_hash,
            "event_data": None, "trigger_id": None,
        })
        joined.raise_for_status()
        event_id = joined.json()["event_id"]
        params = {"session_hash": self.session_hash}
        async with self.client.stream("GET", "/gradio_api/queue/data", params=params) as stream:
            async for line in stream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                    if not message.get("success"):
                        raise CallError(str(message.get("output", {}).get("error")))
                    return message["output"]["data"]
        raise CallError(f"{endpoint}: the event stream ended without a result")


async def log_in(base_url: str, name: str, password: str, gate: asyncio.Semaphore) -> tuple[Session, list]:
    """A logged-in session and its first item. Logins are not timed: the scrypt check is slow on purpose."""
    client = httpx.AsyncClient(base_url=base_url, timeout=60)
    async with gate:
        login = await client.post("/login", data={"username": name, "password": password})
        login.raise_for_status()
        config = (await client.get("/config")).json()
        fn_ids = {d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}
        session = Session(client, fn_ids)
        return session, await session.call("next", [])


async def annotator(session: Session, name: str, item: list, deadline: float, think: float, stats: Stats,
                    seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline and item[0] is not None:
        pause = rng.uniform(0.5 * think, 1.5 * think)
        if time.monotonic() + pause >= deadline:
            break
        await asyncio.sleep(pause)
        pair_id, choice = int(item[0]), rng.choice(CHOICES)
        started = time.perf_counter()
        try:
            item = await session.call(f"vote_{choice}", [pair_id, "slightly", [], [], ""])
        except CallError:
            stats.refused += 1
            item = await session.call("next", [])
            continue
        except httpx.HTTPError:
            stats.failed += 1  # unknown outcome: not acknowledged, so a stored row counts as unacknowledged
            item = await session.call("next", [])
            continue
        stats.latencies.append(time.perf_counter() - started)
        stats.acked.append((name, pair_id))


async def drive(base_url: str, users: list[tuple[str, str]], duration: float, think: float) -> tuple[Stats, float]:
    """Log everyone in first, then let them all vote for `duration` seconds."""
    gate = asyncio.Semaphore(8)
    sessions = await asyncio.gather(*(log_in(base_url, name, password, gate) for name, password in users))
    stats = Stats()
    started = time.monotonic()
    try:
        await asyncio.gather(*(annotator(session, name, item, started + duration, think, stats, seed=i)
                               for i, ((name, _), (session, item)) in enumerate(zip(users, sessions))))
    finally:
        await asyncio.gather(*(session.client.aclose() for session, _ in sessions))
    return stats, time.monotonic() - started


def check_store(url: str, stats: Stats) -> dict[str, int]:
    from sqlalchemy import select

    from align.store import Pair

    with connect(url) as store, store.read() as session:
        rows = session.execute(select(Vote.annotator, Vote.pair_id).where(Vote.kind == "vote")).all()
        effective = Counter(session.scalars(select(Vote.pair_id).where(Vote.kind == "vote", in_effect())))
        required = dict(session.execute(select(Pair.id, Pair.votes_required)).all())
    stored = Counter(rows)
    acked = Counter(stats.acked)
    lost = sum(max(0, n - stored[key]) for key, n in acked.items())
    duplicated = sum(n - 1 for n in stored.values() if n > 1) + sum(1 for key in stored if key not in acked)
    over_k = sum(1 for pair_id, n in effective.items() if n > required[pair_id])
    return {"stored": sum(stored.values()), "lost": lost, "duplicated": duplicated, "over_k": over_k}


def start_server(url: str, port: int, in_process: bool):
    """Launch the app; returns a function that stops it."""
    if in_process:
        from labeling.app import build_app, close_app, launch_app

        demo = build_app(url)
        launch_app(demo, port=port, block=False, quiet=True)
        return lambda: close_app(demo)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "labeling", "--db", url, "--port", str(port)], cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited: {process.stderr.read()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    return stop


def run_load(n_annotators: int = 100, duration: float = 60.0, think: float = 10.0, db: str | None = None,
             in_process: bool = False, votes_required: int = 3) -> dict:
    """Run the load test; returns the figures `main` prints. `db`: an empty store (default: a temp SQLite)."""
    workdir = None
    if db is None:
        workdir = tempfile.TemporaryDirectory(prefix="align-load-")
        db = f"sqlite:///{workdir.name}/store.db"
    # Enough pairs that nobody runs dry: every annotator could vote at 1/think per second.
    n_pairs = max(20, int(n_annotators * duration / max(think, 0.05) * 1.5 / votes_required) + 10)
    users = prepare_store(db, n_annotators, n_pairs, votes_required)
    port = free_port()
    stop = start_server(db, port, in_process)
    try:
        stats, elapsed = asyncio.run(drive(f"http://127.0.0.1:{port}", users, duration, think))
    finally:
        stop()
    result = check_store(db, stats)
    latencies = sorted(stats.latencies)
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [math_nan()] * 99
    result.update(
        annotators=n_annotators, seconds=elapsed, acked=len(stats.acked), refused=stats.refused,
        failed=stats.failed, votes_per_s=len(stats.acked) / elapsed if elapsed else 0.0,
        p50_ms=1000 * q[49], p95_ms=1000 * q[94], backend=db.split(":", 1)[0],
    )
    if workdir is not None:
        workdir.cleanup()
    return result


def math_nan() -> float:
    return float("nan")


def summary_line(r: dict) -> str:
    return (f"labeling load: {r['annotators']} annotators, {r['seconds']:.0f} s, {r['backend']}: "
            f"{r['votes_per_s']:.1f} votes/s, vote round trip p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms; "
            f"acknowledged {r['acked']}, stored {r['stored']}, lost {r['lost']}, duplicated {r['duplicated']}, "
            f"pairs over k {r['over_k']}, refused {r['refused']}, failed {r['failed']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--annotators", type=int, default=100)
    parser.add_argument("-d", "--duration", type=float, default=60.0, help="seconds of voting")
    parser.add_argument("--think", type=float, default=10.0,
                        help="mean seconds an annotator reads before each vote (uniform in 0.5x..1.5x); 10 s is a "
                        "brisk human pace (careful pairwise judgments take 15-60 s); lower it for a stress test")
    parser.add_argument("--db", default=None, help="an EMPTY store URL (default: a temporary SQLite file)")
    parser.add_argument("--in-process", action="store_true", help="run the server in this process")
    args = parser.parse_args(argv)
    result = run_load(args.annotators, args.duration, args.think, args.db, args.in_process)
    print(summary_line(result))
    ok = result["lost"] == 0 and result["duplicated"] == 0 and result["over_k"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
