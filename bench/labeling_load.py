"""Load test of the labeling app through its real HTTP API: N simulated annotators vote for D seconds.

    python bench/labeling_load.py                      # 100 annotators, 60 s, SQLite, server in a subprocess
    python bench/labeling_load.py --think 1            # a stress test: every annotator votes every ~1 s
    python bench/labeling_load.py -n 1000 --think 20 --workers 2 --db postgresql://...   # 2 processes + nginx
    python bench/labeling_load.py --lease_pairs 30000 -n 0                              # lease latency only

Each annotator holds a login session (made in the store beforehand: logins are not what is measured, and each
costs a deliberate ~90 ms scrypt check) and loops: think, vote, get the next pair, until the time is up or
nothing is left. `--client page` (default) speaks the page's own protocol (and gradio_client's): POST the inputs
to /gradio_api/queue/join with the session's hash, then read the result from /gradio_api/queue/data; `--client
json` uses the JSON API (/api/v1/vote answers with the next item), a lighter client. With `--workers N` the
server is `align label --workers N --nginx`: N app processes behind nginx.

It prints votes/s, the vote round trip (p50/p95, request sent to next pair received), the server's CPU per vote
(all its processes, nginx included; needs psutil), and checks the store against what the clients saw
acknowledged: lost votes (acknowledged, not stored), duplicated votes (stored twice for one annotator and pair,
or stored without an acknowledgement) and pairs with more votes than they require. `--lease_pairs N` also times
`lease_next_pair` itself in this process on a fresh store of N pairs (the indexed queue should not care about N).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
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
    connect,
    make_pairs,
    register_model_version,
)
from align.store.votes import in_effect
from labeling.workers import free_port_range, stop_process_group

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
    """Fill an empty store with `n_pairs` pairs and `n_annotators` logins; returns (name, session token)s."""
    from align.store import User
    from align.store.users import hash_password, start_session

    with connect(url) as store:
        version = register_model_version(store, {"name": "bench-v0", "base_model": "bench", "adapter_hash": "0"})
        for start in range(0, n_pairs, 5000):
            chunk = range(start, min(n_pairs, start + 5000))
            prompt_ids = add_prompts(store, [{"prompt": f"Question {i}: explain **item** {i}."} for i in chunk])
            rows = [
                {"prompt_id": p, "model_version_id": version, "seed": 0, "sample_index": k, "max_new_tokens": 64,
                 "text": f"Answer {k} to {p}:\n\n```python\nprint({p} < {k})\n```\nwith *markdown* and <b>html</b>."}
                for p in prompt_ids for k in (0, 1)
            ]
            add_responses(store, rows)
            make_pairs(store, version, votes_required=votes_required, prompt_ids=prompt_ids)
        names = [f"annotator{i:04d}" for i in range(n_annotators)]
        shared_hash = hash_password(f"pw-{random.random():.9f}")  # one scrypt hash for all: setup stays fast
        with store.write() as session:
            session.add_all([User(name=name, password_hash=shared_hash, role="annotator") for name in names])
        return [(name, start_session(store, name, hours=2)) for name in names]


class Session:
    """One browser tab's connection: a login cookie, a session hash, and the app's endpoint ids."""

    def __init__(self, client: httpx.AsyncClient, fn_ids: dict[str, int]):
        self.client, self.fn_ids, self.owned = client, fn_ids, True
        self.session_hash = uuid.uuid4().hex[:11]

    async def vote(self, pair_id: int, choice: str) -> int | None:
        item = await self.call(f"vote_{choice}", [pair_id, "slightly", [], [], ""])
        return None if item[0] is None else int(item[0])

    async def next(self) -> int | None:
        item = await self.call("next", [])
        return None if item[0] is None else int(item[0])

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


class JsonSession:
    """A program's session on the JSON API: one request per vote, the next item in the answer. Every session
    shares one pooled client (`shared_client`): the login travels as the session cookie of each request, which
    is what nginx routes on, so the client needs no connection per annotator."""

    def __init__(self, client: httpx.AsyncClient, token: str):
        self.client, self.owned = client, False
        self.headers = {"cookie": f"align_session={token}"}

    async def vote(self, pair_id: int, choice: str) -> int | None:
        reply = await self.client.post("/api/v1/vote", json={"pair_id": pair_id, "choice": choice},
                                       headers=self.headers)
        if reply.status_code in (403, 409):
            raise CallError(reply.json().get("error"))
        reply.raise_for_status()
        return reply.json()["next"]["pair_id"]

    async def next(self) -> int | None:
        reply = await self.client.get("/api/v1/item", headers=self.headers)
        reply.raise_for_status()
        return reply.json()["pair_id"]


def shared_client(base_url: str, connections: int = 256) -> httpx.AsyncClient:
    """One keep-alive connection pool for all JSON sessions (a lighter client than one connection each)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits)


async def open_session(base_url: str, token: str, client_kind: str, gate: asyncio.Semaphore, config: dict):
    """A session on a login made beforehand, and its first pair."""
    async with gate:
        if client_kind == "json":
            session = JsonSession(config["client"], token)
        else:
            client = httpx.AsyncClient(base_url=base_url, timeout=120, cookies={"align_session": token})
            if "fn_ids" not in config:  # one page load is enough: every process serves the same app
                page = (await client.get("/config")).json()
                config["fn_ids"] = {d["api_name"]: d["id"] for d in page["dependencies"] if d.get("api_name")}
            session = Session(client, config["fn_ids"])
        return session, await session.next()


def first_pause(rng: random.Random, think: float) -> float:
    """How long a steady-state annotator still reads when the window opens: the rest of a length-biased think
    interval (the stationary phase of their vote cycle). The window then sees the steady vote rate from its first
    second, instead of a ramp from everybody starting to read at once (which, with think intervals of 10-30 s,
    cuts the mean rate over a 60 s window to 85% of the steady rate)."""
    low, high = 0.5 * think, 1.5 * think
    interval = math.sqrt(low**2 + rng.random() * (high**2 - low**2))  # density proportional to the length
    return rng.random() * interval


async def annotator(session, name: str, pair_id: int | None, deadline: float, think: float, stats: Stats,
                    seed: int, stationary: bool = True) -> None:
    rng = random.Random(seed)
    first = True
    while time.monotonic() < deadline and pair_id is not None:
        pause = first_pause(rng, think) if first and stationary else rng.uniform(0.5 * think, 1.5 * think)
        first = False
        if time.monotonic() + pause >= deadline:
            break
        await asyncio.sleep(pause)
        voted, choice = pair_id, rng.choice(CHOICES)
        started = time.perf_counter()
        try:
            pair_id = await session.vote(voted, choice)
        except CallError:
            stats.refused += 1
            pair_id = await session.next()
            continue
        except httpx.HTTPError:
            stats.failed += 1  # unknown outcome: not acknowledged, so a stored row counts as unacknowledged
            pair_id = await session.next()
            continue
        stats.latencies.append(time.perf_counter() - started)
        stats.acked.append((name, voted))


async def drive(base_url: str, users: list[tuple[str, str]], duration: float, think: float, client_kind: str,
                cpu: "ServerCpu", db_cpu: "ServerCpu", stationary: bool = True) -> tuple[Stats, float, dict[str, float]]:
    """Open every session first, then let them all vote for `duration` seconds; (stats, seconds, CPU seconds of
    the server, the database server and this client)."""
    gate, config = asyncio.Semaphore(16), {}
    if client_kind == "json":
        config["client"] = shared_client(base_url)
    try:
        sessions = await asyncio.gather(*(open_session(base_url, token, client_kind, gate, config)
                                          for _, token in users))
        stats = Stats()
        before = {"server": cpu.seconds(), "database": db_cpu.seconds(), "client": time.process_time()}
        started = time.monotonic()
        try:
            await asyncio.gather(*(annotator(session, name, item, started + duration, think, stats, seed=i,
                                             stationary=stationary)
                                   for i, ((name, _), (session, item)) in enumerate(zip(users, sessions))))
            elapsed = time.monotonic() - started
            after = {"server": cpu.seconds(), "database": db_cpu.seconds(), "client": time.process_time()}
        finally:
            await asyncio.gather(*(session.client.aclose() for session, _ in sessions if session.owned))
    finally:
        if "client" in config:
            await config["client"].aclose()
    return stats, elapsed, {key: after[key] - before[key] for key in before}


class ServerCpu:
    """CPU seconds (user + system) used so far by the server's processes: a root process and its children; or,
    with `name`, every process of that name (the database server's, which may serve others too)."""

    def __init__(self, pid: int | None, name: str | None = None):
        try:
            import psutil
        except ImportError:
            psutil = None
        self.psutil, self.name = psutil, name
        self.root = psutil.Process(pid) if psutil is not None and pid is not None else None

    def processes(self) -> list:
        if self.name is not None and self.psutil is not None:
            return [p for p in self.psutil.process_iter(["name"]) if p.info["name"] == self.name]
        return [] if self.root is None else [self.root, *self.root.children(recursive=True)]

    def seconds(self) -> float:
        if self.root is None and (self.name is None or self.psutil is None):
            return float("nan")
        total = 0.0
        for process in self.processes():
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except Exception:  # a process that just ended
                continue
        return total


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


def start_server(url: str, port: int, in_process: bool, workers: int = 1):
    """Launch the app (with nginx in front when workers > 1); returns (a function that stops it, its pid)."""
    if in_process:
        from labeling.app import build_app, close_app, launch_app

        demo = build_app(url)
        launch_app(demo, port=port, block=False, quiet=True)
        return (lambda: close_app(demo)), os.getpid()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "align", "label", "--db", url, "--port", str(port)]
    if workers > 1:
        command += ["--workers", str(workers), "--nginx"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited: {process.stderr.read()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/login", timeout=1).raise_for_status()
            break
        except httpx.HTTPError:
            time.sleep(0.3)

    return (lambda: stop_process_group(process)), process.pid


def run_load(n_annotators: int = 100, duration: float = 60.0, think: float = 10.0, db: str | None = None,
             in_process: bool = False, votes_required: int = 3, workers: int = 1, client: str = "page",
             start: str = "stationary") -> dict:
    """Run the load test; returns the figures `main` prints. `db`: an empty store (default: a temp SQLite)."""
    workdir = None
    if db is None:
        workdir = tempfile.TemporaryDirectory(prefix="align-load-")
        db = f"sqlite:///{workdir.name}/store.db"
    # Enough pairs that nobody runs dry: every annotator could vote at 1/think per second.
    n_pairs = max(20, int(n_annotators * duration / max(think, 0.05) * 1.5 / votes_required) + 10)
    users = prepare_store(db, n_annotators, n_pairs, votes_required)
    port = free_port() if workers == 1 else free_port_range(workers)
    stop, pid = start_server(db, port, in_process, workers)
    database = ServerCpu(None, "postgres") if db.startswith("postgres") else ServerCpu(None)
    try:
        stats, elapsed, cpu_used = asyncio.run(
            drive(f"http://127.0.0.1:{port}", users, duration, think, client, ServerCpu(None if in_process else pid),
                  database, stationary=start == "stationary")
        )
    finally:
        stop()
    result = check_store(db, stats)
    latencies = sorted(stats.latencies)
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [math_nan()] * 99
    result.update(
        annotators=n_annotators, seconds=elapsed, acked=len(stats.acked), refused=stats.refused,
        failed=stats.failed, votes_per_s=len(stats.acked) / elapsed if elapsed else 0.0,
        p50_ms=1000 * q[49], p95_ms=1000 * q[94], backend=db.split(":", 1)[0].split("+")[0], workers=workers,
        start=start, offered_per_s=n_annotators / think,
        client=client, **{f"{key}_cpu_ms_per_vote": 1000 * used / len(stats.acked) if stats.acked else math_nan()
                          for key, used in cpu_used.items()},
    )
    result["cpu_ms_per_vote"] = result["server_cpu_ms_per_vote"]
    if workdir is not None:
        workdir.cleanup()
    return result


def lease_latency(db: str | None, n_pairs: int, n_leases: int = 300) -> dict:
    """Time `lease_next_pair` (and, apart, the vote that frees the annotator) in this process on a fresh store of
    `n_pairs` pairs; 100 annotators take turns. `db`: an empty store (default: a temporary SQLite file)."""
    from align.store import add_vote, lease_next_pair

    workdir = None
    if db is None:
        workdir = tempfile.TemporaryDirectory(prefix="align-lease-")
        db = f"sqlite:///{workdir.name}/store.db"
    prepare_store(db, 0, n_pairs)
    leases, votes, cpu = [], [], []
    with connect(db) as store:
        for i in range(n_leases):
            name = f"annotator{i % 100:04d}"
            started, started_cpu = time.perf_counter(), time.thread_time()
            pair_id = lease_next_pair(store, name)
            leases.append(time.perf_counter() - started)
            cpu.append(time.thread_time() - started_cpu)
            started = time.perf_counter()
            add_vote(store, pair_id, name, "a")
            votes.append(time.perf_counter() - started)
    if workdir is not None:
        workdir.cleanup()
    lq, vq = statistics.quantiles(leases, n=100), statistics.quantiles(votes, n=100)
    return {"pairs": n_pairs, "backend": db.split(":", 1)[0].split("+")[0], "lease_p50_ms": 1000 * lq[49],
            "lease_p95_ms": 1000 * lq[94], "vote_p50_ms": 1000 * vq[49],
            "lease_cpu_ms": 1000 * statistics.median(cpu)}


@contextlib.contextmanager
def fresh_schema(url: str):
    """The URL of a new, empty schema in the PostgreSQL database of `url`; dropped afterwards."""
    from sqlalchemy import create_engine

    from align.store.db import parse_url

    admin = create_engine(parse_url(url), isolation_level="AUTOCOMMIT")
    schema = f"lease_bench_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        yield admin.url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


def math_nan() -> float:
    return float("nan")


def summary_line(r: dict) -> str:
    return (f"labeling load: {r['annotators']} annotators, {r['seconds']:.0f} s, {r['backend']}, "
            f"{r['workers']} process(es), {r['client']} client, {r['start']} start "
            f"(offered about {r['offered_per_s']:.0f} votes/s at zero latency): "
            f"{r['votes_per_s']:.1f} votes/s, vote round trip p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, "
            f"server CPU {r['cpu_ms_per_vote']:.1f} ms/vote (database {r['database_cpu_ms_per_vote']:.1f}, "
            f"client {r['client_cpu_ms_per_vote']:.1f}); "
            f"acknowledged {r['acked']}, stored {r['stored']}, lost {r['lost']}, duplicated {r['duplicated']}, "
            f"pairs over k {r['over_k']}, refused {r['refused']}, failed {r['failed']}")


def lease_line(r: dict) -> str:
    return (f"lease latency at {r['pairs']} pairs, {r['backend']}: p50 {r['lease_p50_ms']:.2f} ms, "
            f"p95 {r['lease_p95_ms']:.2f} ms, client CPU p50 {r['lease_cpu_ms']:.2f} ms "
            f"(the vote after it: p50 {r['vote_p50_ms']:.2f} ms)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--annotators", type=int, default=100, help="0: only the lease latency")
    parser.add_argument("-d", "--duration", type=float, default=60.0, help="seconds of voting")
    parser.add_argument("--think", type=float, default=10.0,
                        help="mean seconds an annotator reads before each vote (uniform in 0.5x..1.5x); 10 s is a "
                        "brisk human pace (careful pairwise judgments take 15-60 s); lower it for a stress test")
    parser.add_argument("--db", default=None, help="an EMPTY store URL (default: a temporary SQLite file)")
    parser.add_argument("--workers", type=int, default=1, help="app processes (more than 1: behind nginx)")
    parser.add_argument("--client", choices=("page", "json"), default="page",
                        help="page: the page's own protocol (Gradio queue); json: the JSON API (lighter)")
    parser.add_argument("--start", choices=("stationary", "together"), default="stationary",
                        help="stationary: each annotator starts at a random point of their think cycle (the steady "
                        "state from the first second); together: everybody starts reading at once (a ramp)")
    parser.add_argument("--in_process", "--in-process", action="store_true", help="run the server in this process")
    parser.add_argument("--lease_pairs", default="30000",
                        help="also time lease_next_pair on fresh stores of these many pairs, e.g. 300,30000 "
                        "(default 30000; '' for none)")
    parser.add_argument("--lease_db", default=None,
                        help="EMPTY stores for the lease timing, comma-separated, one per size (default: a fresh "
                        "schema in --db's database when it is PostgreSQL, else a temporary SQLite file)")
    args = parser.parse_args(argv)
    ok = True
    if args.annotators > 0:
        result = run_load(args.annotators, args.duration, args.think, args.db, args.in_process,
                          workers=args.workers, client=args.client, start=args.start)
        print(summary_line(result), flush=True)
        ok = result["lost"] == 0 and result["duplicated"] == 0 and result["over_k"] == 0
    sizes = [int(n) for n in args.lease_pairs.split(",") if n.strip()]
    dbs = args.lease_db.split(",") if args.lease_db else [None] * len(sizes)
    if len(dbs) != len(sizes):
        parser.error("--lease_db needs one empty store per --lease_pairs size")
    for n_pairs, lease_db in zip(sizes, dbs):
        if lease_db is None and (args.db or "").startswith("postgres"):
            with fresh_schema(args.db) as url:
                print(lease_line(lease_latency(url, n_pairs)), flush=True)
        else:
            print(lease_line(lease_latency(lease_db, n_pairs)), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
