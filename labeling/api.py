"""The labeling app's JSON API for programs: named fields, raw texts, one request per action.

Log in with POST /login (form fields `username`, `password`; the reply sets the session cookie and carries the
token), then send the cookie or `Authorization: Bearer TOKEN`. Every reply is JSON; a refused action is a 4xx
with {"error": "message"}.

    GET  /api/v1/item                  the pair leased to you (the same one until you answer it)
    POST /api/v1/vote   {"pair_id", "choice": "left"|"right"|"tie"|"both_bad", "strength": "slightly"|"much",
                         "rationale": "", "reasons": {"left": [...], "right": [...]}}
    POST /api/v1/skip   {"pair_id"}
    POST /api/v1/flag   {"pair_id", "reason": "unsafe"|"private data"|"broken", "note": ""}
    POST /api/v1/undo   {"pair_id": the pair on screen, or null}
    POST /api/v1/logout                  ends every session of yours
    GET  /api/v1/jobs                    reviewers: the newest generation jobs (status, progress, error)
    POST /api/v1/jobs   reviewers: queue new candidate pairs {"models": [...], "temperature", "top_p", "top_k",
                         "max_new_tokens", "seed", "prompts": "store"|"tasks:train"|a file, "limit", "n",
                         "pair_rule", "votes_required"}; answers {"job": {...}} (labeling.candidates)

An item: {"pair_id", "prompt": [{"role", "content"}, ...], "responses": [{"position": "left"|"right",
"response": "a"|"b", "id", "text"}, ...], "shown_order": ["a", "b"] or ["b", "a"], "progress": {...},
"message"}; `pair_id` is null when nothing is left. `choice` is in screen terms (left/right as in
`responses`); the store records it in response order. Actions answer {"event_id", "next": item}.
The handlers are plain functions run in worker threads: no Gradio queue, one round trip per action.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from align.store.users import end_sessions
from labeling.handlers import Labeling, LabelingError, PermissionDenied, Rejected


def api_router(labeling: Labeling, logins, candidates=None) -> APIRouter:
    router = APIRouter(prefix="/api/v1")

    async def run(request: Request, action) -> JSONResponse:
        user = await logins.current_user(request)
        if not user:
            return JSONResponse({"error": "log in first: POST /login with username and password"}, status_code=401)
        body: dict[str, Any] = {}
        if request.method == "POST":
            try:
                body = await request.json() if await request.body() else {}
            except ValueError:
                return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
            if not isinstance(body, dict):
                return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        try:
            return JSONResponse(await run_in_threadpool(action, user, body))
        except PermissionDenied as error:
            return JSONResponse({"error": str(error)}, status_code=403)
        except LabelingError as error:
            return JSONResponse({"error": str(error)}, status_code=409)

    def answered(user: str, done: tuple[int, Any]) -> dict[str, Any]:
        event_id, item = done
        return {"event_id": event_id, "next": item.as_json()}

    def vote(user: str, body: dict[str, Any]) -> dict[str, Any]:
        reasons = body.get("reasons") or {}
        if not isinstance(reasons, dict):
            raise Rejected("reasons must be an object: {\"left\": [...], \"right\": [...]}")
        return answered(user, labeling.vote_and_next(
            user, body.get("pair_id"), str(body.get("choice", "")), body.get("strength", "slightly"),
            reasons.get("left"), reasons.get("right"), body.get("rationale") or "", message="Saved.",
        ))

    def undo(user: str, body: dict[str, Any]) -> dict[str, Any]:
        event_id = labeling.undo(user, body.get("pair_id"))
        return answered(user, (event_id, labeling.next_item(user, "Undone.")))

    # A vote, skip or flag and the next lease are one transaction (Labeling.answer).
    actions = {
        "vote": vote,
        "skip": lambda user, body: answered(user, labeling.skip_and_next(user, body.get("pair_id"), "Skipped.")),
        "flag": lambda user, body: answered(user, labeling.flag_and_next(
            user, body.get("pair_id"), body.get("reason"), body.get("note") or "", "Flagged.")),
        "undo": undo,
    }

    if candidates is not None:
        actions["jobs"] = lambda user, body: {"job": candidates.submit(user, body)}

        @router.get("/jobs")
        async def jobs(request: Request):
            return await run(request, lambda user, _: {"jobs": candidates.jobs(user)})

    @router.get("/item")
    async def item(request: Request):
        return await run(request, lambda user, _: labeling.next_item(user).as_json())

    @router.post("/{action}")
    async def act(action: str, request: Request):
        if action == "logout":
            return await run(request, lambda user, _: {"sessions_ended": end_sessions(labeling.store, user)})
        if action not in actions:
            return JSONResponse({"error": f"unknown action {action!r}; use {', '.join(actions)}"}, status_code=404)
        return await run(request, actions[action])

    return router
