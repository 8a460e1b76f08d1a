"""Several labeling app processes on one store, behind nginx: `align label --workers N [--nginx]`.

Each worker is a whole app (Gradio, the JSON API, database logins) on its own port: PORT+1 .. PORT+N. With
`--nginx`, nginx (Debian's package; the config is labeling/deploy/nginx.conf) listens on PORT and spreads the
logged-in sessions over the workers, one session always on the same worker (Gradio's queue of a page lives in its
process; logins do not, they are in the database). Without it, point your own nginx at the workers' ports with
the same upstream block. The store must take concurrent writers: PostgreSQL, or SQLite on one machine.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from align.errors import AlignError

TEMPLATE = Path(__file__).parent / "deploy" / "nginx.conf"
SPAWN = multiprocessing.get_context("spawn")


def nginx_config(listen: str, ports: list[int], prefix: str | os.PathLike[str], host: str = "127.0.0.1") -> str:
    """The shipped nginx.conf with its ${prefix}, ${listen} and ${servers} filled in."""
    servers = "\n        ".join(f"server {host}:{port} max_fails=0;" for port in ports)
    return Template(TEMPLATE.read_text()).safe_substitute(prefix=str(prefix), listen=listen, servers=servers)


def find_nginx() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None)
    if found is None:
        raise AlignError("nginx is not installed; on Debian: apt-get install nginx (or run without --nginx)")
    return found


def start_nginx(listen_port: int, ports: list[int], directory: str | os.PathLike[str] | None = None,
                host: str = "127.0.0.1") -> subprocess.Popen:
    """Run nginx in the foreground of a child process with the rendered config in `directory` (a temporary one
    by default), once it accepts connections."""
    prefix = Path(directory or tempfile.mkdtemp(prefix="align-nginx-"))
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(f"{host}:{listen_port}", ports, prefix, host))
    process = subprocess.Popen([find_nginx(), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
                                "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_port(host, listen_port, process, what="nginx", log=prefix / "error.log")
    return process


def free_port_range(n: int, host: str = "127.0.0.1") -> int:
    """A free port whose next `n` ports are free too (for --nginx: nginx on it, the workers after it)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind((host, 0))
            base = sock.getsockname()[1]
        if base + n < 65000 and all(port_is_free(base + i, host) for i in range(1, n + 1)):
            return base
    raise AlignError(f"found no {n + 1} free ports in a row")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def stop_process_group(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM to a process started with start_new_session=True and all it started; SIGKILL if it lingers."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_for_port(host: str, port: int, process, what: str, timeout: float = 120.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = process.poll() is None if hasattr(process, "poll") else process.is_alive()
        if not alive:
            detail = log.read_text()[-1000:] if log is not None and log.exists() else ""
            raise AlignError(f"{what} on port {port} exited before it started. {detail}".strip())
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AlignError(f"{what} did not start on {host}:{port} within {timeout:.0f} s")


@dataclass(frozen=True)
class WorkerSpec:
    """What each worker process needs to build its app: build_app's keyword arguments (picklable ones), the
    side-by-side models to load if any, and the server settings."""

    store_url: str
    build: dict[str, Any]
    settings: Any = None
    compare: tuple[tuple[str, str], ...] | None = None  # (model spec, version name) x 2
    device: str | None = None


def build_responders(compare, device):
    if not compare:
        return None
    from labeling.compare import TransformersResponder  # deferred: loads transformers

    return [TransformersResponder(spec, name=name, device=device) for spec, name in compare]


def serve_worker(spec: WorkerSpec, host: str, port: int) -> None:
    """One worker process: build the app and serve it until terminated."""
    from labeling.app import build_app, launch_app

    demo = build_app(spec.store_url, responders=build_responders(spec.compare, spec.device), **spec.build)
    try:
        launch_app(demo, host=host, port=port, quiet=True, settings=spec.settings)
    except KeyboardInterrupt:
        pass


class Workers:
    """N worker processes (and nginx in front of them, if asked); `stop()` ends them all."""

    def __init__(self, spec: WorkerSpec, n: int, port: int, host: str = "127.0.0.1", nginx: bool = False,
                 nginx_dir: str | None = None):
        if n < 1:
            raise AlignError(f"--workers must be at least 1, got {n}")
        self.ports = [port + 1 + i for i in range(n)] if nginx else [port + i for i in range(n)]
        self.host, self.port = host, port
        self.processes = [SPAWN.Process(target=serve_worker, args=(spec, host, p), daemon=True) for p in self.ports]
        self.nginx = None
        try:
            for process in self.processes:
                process.start()
            for process, worker_port in zip(self.processes, self.ports):
                wait_for_port(host, worker_port, process, what="labeling worker")
            if nginx:
                self.nginx = start_nginx(port, self.ports, nginx_dir, host)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port if self.nginx else self.ports[0]}/"

    def wait(self) -> None:
        """Until a worker or nginx exits, or Ctrl-C."""
        try:
            while all(p.is_alive() for p in self.processes) and (self.nginx is None or self.nginx.poll() is None):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass

    def stop(self) -> None:
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.terminate()
            try:
                self.nginx.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.nginx.kill()
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=15)
            if process.is_alive():
                process.kill()
                process.join()
