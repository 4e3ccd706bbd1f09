"""What the action server does before any route's handler, and with what no handler caught:
the token, well-formed webhook bodies, and every error as JSON. A bad request gets a 4xx
that says what is wrong, never a 5xx, a traceback, or its own body echoed back.
"""

from __future__ import annotations

import hmac
import json
import logging
import zlib
from collections.abc import Callable

from sanic import response
from sanic.exceptions import SanicException

from emotion.settings import Settings

log = logging.getLogger(__name__)

# Routes the token guards when one is set. /health and /actions stay open (liveness, action
# names); /ready answers without the token too, saying only whether it is ready.
PROTECTED = ("/webhook", "/v1/", "/predict", "/metrics")
# rasa-sdk inflates a deflate body whole: 51 KB became 50 MB. Rasa's trackers are far smaller.
MAX_INFLATED_BYTES = 32 * 1024 * 1024


def install(app, settings: Callable[[], Settings]) -> None:
    app.register_middleware(_guard(settings), "request")
    app.error_handler.add(SanicException, _http_error)
    # In place of rasa-sdk's catch-all, which answers every error 500 with the request's
    # body in the answer. Sanic refuses a second handler for one class, so it is swapped.
    app.error_handler.cached_handlers[(Exception, None)] = _unexpected


def error(status: int, code: str, message: str, headers: dict | None = None):
    return response.json({"error": {"code": code, "message": message}}, status=status, headers=headers)


def authorized(request, token: str | None) -> bool:
    """The bearer token (``Authorization: Bearer ...``) or, as Rasa's ``action_endpoint:
    token`` sends it, the ``token`` query parameter."""
    if not token:
        return True
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    given = value.strip() if scheme.lower() == "bearer" else request.args.get("token", "")
    return hmac.compare_digest(given.encode(), token.encode())


def unauthorized(request):
    sent = request.headers.get("authorization") or request.args.get("token")
    message = ("the bearer token is not valid" if sent
               else "a bearer token is required (Authorization: Bearer ..., or ?token=... as Rasa's action_endpoint sends it)")
    return error(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def _guard(settings: Callable[[], Settings]):
    async def guard(request):
        if request.path.startswith(PROTECTED) and not authorized(request, settings().api_token):
            return unauthorized(request)
        if request.path == "/webhook" and request.method == "POST":
            await request.receive_body()  # Sanic runs request middleware before it reads the body
            return _check_webhook(request)
        return None

    return guard


def _check_webhook(request):
    """Refuses what rasa-sdk's webhook would turn into a 500, and inflates a deflate body
    within a cap, as Rasa sends it compressed."""
    body = request.body
    if request.headers.get("content-encoding", "").lower() == "deflate":
        inflater = zlib.decompressobj()
        try:
            body = inflater.decompress(body, MAX_INFLATED_BYTES + 1)
        except zlib.error:
            return error(400, "bad_request", "the deflate-encoded body does not inflate")
        if len(body) > MAX_INFLATED_BYTES or inflater.unconsumed_tail:
            return error(413, "too_large", f"the inflated body is over {MAX_INFLATED_BYTES} bytes")
        request.body = body
        del request.headers["content-encoding"]
    try:
        call = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return error(400, "bad_request", "the body is not JSON")
    problem = _webhook_problem(call)
    if problem:
        return error(400, "bad_request", problem)
    return None


def _webhook_problem(call) -> str | None:
    if not isinstance(call, dict):
        return "an action call is a JSON object"
    if not isinstance(call.get("next_action"), str):
        return "next_action must be the action's name"
    if not isinstance(call.get("version", ""), str):
        return "version must be a string"
    if not isinstance(call.get("domain", {}), dict):
        return "domain must be an object"
    tracker = call.get("tracker")
    if not isinstance(tracker, dict):
        return "tracker must be an object"
    events = tracker.get("events", [])
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        return "tracker.events must be a list of event objects"
    for key in ("slots", "latest_message"):
        if tracker.get(key) is not None and not isinstance(tracker[key], dict):
            return f"tracker.{key} must be an object"
    if not isinstance((tracker.get("latest_message") or {}).get("metadata") or {}, dict):
        return "tracker.latest_message.metadata must be an object"
    return None


async def _http_error(request, exception: SanicException):
    status = getattr(exception, "status_code", 500)
    if status >= 500:
        return await _unexpected(request, exception)
    code = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 408: "timeout"}.get(status, "bad_request")
    message = {404: f"no route {request.path}", 405: f"{request.method} is not allowed on {request.path}",
               413: "the request body is too large"}.get(status, str(exception)[:200])
    return error(status, code, message, headers=getattr(exception, "headers", None))


async def _unexpected(request, exception: BaseException):
    # A bug of ours or of a library: the log has the traceback, the caller a plain answer.
    log.error("request %s %s failed", request.method, request.path, exc_info=exception)
    return error(500, "internal", "internal error")
