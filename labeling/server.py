"""Serving the labeling app: our own login (sessions in the database), a Content-Security-Policy on every response,
the JSON API, and the Gradio app mounted under it, run by uvicorn; `run_workers` runs several such processes.

    app = create_server(build_app(url))          # a FastAPI app
    handle = serve(app, port=7860, block=False)  # a thread; handle.stop()

Why not Gradio's own `auth=`: its tokens live in one process's memory (a second process knows no login), and it
calls the password check inside the async login handler, so a flood of wrong passwords stalls every annotator.
Here a login is a row in `login_session` (any process serves it), the scrypt check runs in a worker thread behind
a one-at-a-time gate, and failed logins are throttled per account and per address with backoff, in the database
(shared by all processes). Gradio reads the user through `auth_dependency`, so `gr.Request.username` works as
before and `gradio_client.Client(url, auth=(name, password))` still logs in (it POSTs the same form to /login).
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from align.store.users import (
    ThrottlePolicy,
    clear_failures,
    end_sessions,
    login_wait,
    record_failure,
    session_account,
    start_session,
    throttle_keys,
    verify_user,
)

COOKIE = "align_session"
# Our own static scripts (code, never data), served from labeling/static under this path: script-src 'self'.
STATIC_DIR = Path(__file__).parent / "static"
STATIC_PATH = "align-static"
MAX_WAITING_LOGINS = 32  # password checks queued per process (about 3 s of scrypt); more are refused at once
# Images only from the app itself or data: URLs, so markdown or HTML that slips past the sanitiser cannot make the
# browser fetch a URL (which would tell its owner the page was viewed). Gradio needs inline scripts and styles.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "img-src 'self' data: blob:",
    "media-src 'self' data: blob:",
    "font-src 'self' data:",
    "style-src 'self' 'unsafe-inline'",
    "script-src 'self' 'unsafe-inline' 'unsafe-eval'",
    "connect-src 'self'",
    "frame-src 'none'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'self'",
])
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


@dataclass(frozen=True)
class ServerSettings:
    session_hours: float = 12.0
    throttle: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    # Peers whose X-Real-IP header names the client (the reverse proxy); anyone else is the client themself.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    cookie_secure: bool = False  # set behind HTTPS
    # Seconds a session lookup is cached in the process: a logout elsewhere takes at most this long to apply.
    session_cache_seconds: float = 2.0
    max_body_bytes: int = 1_000_000


class SecurityHeaders:
    """ASGI middleware (plain ASGI: it does not buffer Gradio's event streams): the security headers on every
    HTTP response, a size limit on request bodies, and the login form for a browser without a session."""

    def __init__(self, app, max_body_bytes: int, logins: Logins):
        self.app, self.max_body_bytes, self.logins = app, max_body_bytes, logins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self.with_headers(send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            response = JSONResponse({"error": f"request too large (limit {self.max_body_bytes} bytes)"}, 413)
            return await response(scope, receive, send)
        if scope["method"] == "GET" and scope["path"] in ("", "/"):
            if not await self.logins.current_user(Request(scope)):
                return await RedirectResponse("login", status_code=303)(scope, receive, send)
        return await self.app(scope, receive, send)

    @staticmethod
    def with_headers(send):
        async def sending(message):
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in SECURITY_HEADERS if name not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)
        return sending


class Logins:
    """Sessions (in the store, cached briefly per process), the throttled password check, and the login page."""

    def __init__(self, store, settings: ServerSettings, on_account=None):
        self.store, self.settings, self.on_account = store, settings, on_account
        self.cache: dict[str, tuple[float, str | None]] = {}
        self.check_gate = asyncio.Semaphore(1)  # one scrypt check at a time per process: a flood gets one core
        self.waiting = 0  # logins waiting for the gate; past MAX_WAITING_LOGINS new ones are turned away

    def client_address(self, request: Request) -> str:
        peer = request.client.host if request.client else ""
        if peer in self.settings.trusted_proxies:
            forwarded = request.headers.get("x-real-ip", "").strip()
            try:
                return str(ipaddress.ip_address(forwarded))
            except ValueError:
                pass
        return peer

    def user_of_token(self, token: str | None) -> str | None:
        if not token:
            return None
        now = time.monotonic()
        cached = self.cache.get(token)
        if cached is not None and now - cached[0] < self.settings.session_cache_seconds:
            return cached[1]
        found = session_account(self.store, token)
        user = found[0] if found else None
        if found and self.on_account is not None:
            self.on_account(*found)  # the role and target come with the login: the handler need not read them
        if len(self.cache) > 100_000:
            self.cache.clear()
        self.cache[token] = (now, user)
        return user

    @staticmethod
    def token_of(request: Request) -> str | None:
        bearer = request.headers.get("authorization", "")
        if bearer.lower().startswith("bearer "):
            return bearer[7:].strip()
        return request.cookies.get(COOKIE)

    async def current_user(self, request: Request) -> str | None:
        """Gradio's auth_dependency: the logged-in user's name, or None."""
        token = self.token_of(request)
        if not token:
            return None
        cached = self.cache.get(token)
        if cached is not None and time.monotonic() - cached[0] < self.settings.session_cache_seconds:
            return cached[1]
        return await run_in_threadpool(self.user_of_token, token)

    async def check(self, name: str, password: str, address: str) -> tuple[str | None, str]:
        """(session token, "") for a right password, else (None, a message for the screen)."""
        if not name or not password:
            return None, "Enter your name and password."
        keys = throttle_keys(name, address)
        policy = self.settings.throttle
        wait = await run_in_threadpool(login_wait, self.store, keys)
        if wait > 0:
            return None, f"Too many failed logins; try again in {wait:.0f} s."
        if self.waiting >= MAX_WAITING_LOGINS:
            return None, "The server is busy with logins; try again in a few seconds."
        self.waiting += 1
        try:
            async with self.check_gate:
                role = await run_in_threadpool(verify_user, self.store, name, password)
        finally:
            self.waiting -= 1
        if role is None:
            await run_in_threadpool(record_failure, self.store, keys, policy)
            return None, "Wrong name or password."
        await run_in_threadpool(clear_failures, self.store, keys[0])
        token = await run_in_threadpool(start_session, self.store, name, self.settings.session_hours)
        return token, ""


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def login_page(message: str = "", auth_message: str = "") -> str:
    note = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>align · labeling · log in</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 22rem; margin: 10vh auto; padding: 0 1rem; }}
label {{ display: block; margin-top: .8rem; }} input {{ width: 100%; padding: .4rem; box-sizing: border-box; }}
button {{ margin-top: 1rem; padding: .5rem 1.2rem; }} .error {{ color: #b00020; font-weight: 600; }}
@media (prefers-color-scheme: dark) {{ body {{ background: #111; color: #eee; }} .error {{ color: #ff8a80; }} }}
</style></head><body>
<h1>align labeling</h1><p>{html.escape(auth_message)}</p>{note}
<form method="post" action="login">
<label>Name <input name="username" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button>
</form></body></html>"""


def create_server(demo, settings: ServerSettings | None = None, *, head: str = "", css: str = "",
                  auth_message: str = "") -> FastAPI:
    """The FastAPI app serving `demo` (from `labeling.app.build_app`) with database logins, the security headers
    and the JSON API (`labeling.api`)."""
    import gradio as gr

    from labeling.api import api_router

    settings = settings or ServerSettings()
    logins = Logins(demo.labeling.store, settings, on_account=demo.labeling.remember_account)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.logins, app.state.labeling = logins, demo.labeling

    def set_cookie(response: Response, token: str) -> None:
        response.set_cookie(COOKIE, token, max_age=int(settings.session_hours * 3600), httponly=True,
                            samesite="lax", secure=settings.cookie_secure, path="/")

    @app.get("/login")
    @app.get("/login/")
    async def login_form(request: Request):
        if await logins.current_user(request):
            return RedirectResponse("./", status_code=303)
        return HTMLResponse(login_page(auth_message=auth_message))

    @app.post("/login")
    @app.post("/login/")
    async def login(request: Request):
        form = await request.form()
        name, password = str(form.get("username", "")).strip(), str(form.get("password", ""))
        token, message = await logins.check(name, password, logins.client_address(request))
        if token is None:
            code = 429 if message.startswith("Too many") else 503 if message.startswith("The server is busy") else 401
            if wants_html(request):
                return HTMLResponse(login_page(message, auth_message), status_code=code)
            return JSONResponse({"success": False, "error": message}, status_code=code)
        response = (RedirectResponse("./", status_code=303) if wants_html(request)
                    else JSONResponse({"success": True, "token": token}))
        set_cookie(response, token)
        return response

    @app.get("/logout")
    @app.get("/logout/")
    async def logout(request: Request):
        """Log out everywhere: every session of the user ends (on every process within the session cache)."""
        user = await logins.current_user(request)
        if user:
            await run_in_threadpool(end_sessions, logins.store, user)
            await run_in_threadpool(demo.labeling.release, user)
        logins.cache.pop(logins.token_of(request) or "", None)
        response = RedirectResponse("login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get(f"/{STATIC_PATH}/{{name}}")
    async def static_script(name: str):
        path = STATIC_DIR / name
        if not name.endswith(".js") or "/" in name or not path.is_file():
            return JSONResponse({"error": "not found"}, status_code=404)
        return FileResponse(path, media_type="text/javascript", headers={"cache-control": "no-cache"})

    app.include_router(api_router(demo.labeling, logins, getattr(demo, "candidates", None)))
    demo.queue(default_concurrency_limit=None)
    relax_queue_polling(demo)
    app = gr.mount_gradio_app(
        app, demo, path="", auth_dependency=logins.current_user, show_error=True, ssr_mode=False, head=head,
        css=css, auth_message=auth_message,
    )
    app.add_middleware(SecurityHeaders, max_body_bytes=settings.max_body_bytes, logins=logins)
    return app


# Gradio's queue looks for new events every 1 ms when it has none (and for progress every 10 ms): about 45 ms of CPU
# a second per idle process, a cost every app process pays whether or not anyone votes. Every 10 ms (50 ms) is
# plenty for a human clicking (the JSON API does not use the queue at all) and costs a tenth of that.
QUEUE_POLL_SECONDS, PROGRESS_POLL_SECONDS = 0.01, 0.05


def relax_queue_polling(demo) -> None:
    queue = getattr(demo, "_queue", None)  # gradio.queueing.Queue (Gradio 4-6): no public setting for this
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = max(queue.sleep_when_free, QUEUE_POLL_SECONDS)
        queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, PROGRESS_POLL_SECONDS)


class Serving:
    """A uvicorn server running in a thread (tests, the benchmark's in-process mode)."""

    def __init__(self, server, thread: threading.Thread, url: str):
        self.server, self.thread, self.url = server, thread, url

    def stop(self) -> None:
        # Open event streams are cut at shutdown; uvicorn would log each as an error.
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True,
          max_threads: int = 64) -> Serving | None:
    """Run `app` with uvicorn: in this thread until stopped (block), or in a background thread."""
    import anyio.to_thread
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_keep_alive=30,
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)

    async def run() -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = max_threads
        await server.serve()

    if block:
        asyncio.run(run())
        return None
    thread = threading.Thread(target=lambda: asyncio.run(run()), daemon=True, name=f"labeling-{port}")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the labeling server did not start on {host}:{port}")
        time.sleep(0.05)
    return Serving(server, thread, f"http://{host}:{port}/")


__all__ = ["COOKIE", "CONTENT_SECURITY_POLICY", "Logins", "ServerSettings", "Serving", "create_server", "serve"]
