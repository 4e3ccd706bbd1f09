"""The analysis API on the action server: ``POST /v1/analyze`` and the ``/predict`` alias.

Voice gateways, QA tools and the ``EmotionRestInput`` channel call it, so that audio is
analysed before the message reaches Rasa and never enters the tracker. Requests share
the engine's micro-batcher with Rasa turns. Sanic only; no Rasa.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from sanic import response
from sanic.headers import parse_content_header
from sanic.request import parse_multipart_form

from emotion.engine.core import EmotionEngine
from emotion.engine.fetch import parse_audio_ref, parse_channel
from emotion.engine.results import sign_result
from emotion.errors import AudioTooLarge, BadReference, EmotionError, ModelUnavailable, Overloaded
from emotion.settings import GRANULARITIES, Settings

log = logging.getLogger(__name__)

# HTTP status per error code: bad input is 4xx, never a 500.
STATUS = {
    "bad_request": 400, "bad_reference": 400, "decode_failed": 400, "invalid_audio": 400, "bad_config": 400,
    "fetch_failed": 422, "refused": 403, "too_large": 413, "unauthorized": 401,
    "model_unavailable": 503, "overloaded": 503, "timeout": 504, "inference_failed": 500, "internal": 500,
}
RETRY_AFTER_S = "5"
# Room for multipart headers and form fields around the audio itself.
_FORM_OVERHEAD_BYTES = 64 * 1024


class BadRequest(EmotionError):
    code = "bad_request"


def add_routes(app, settings: Callable[[], tuple[EmotionEngine, Settings]]) -> None:
    """``settings`` gives the process's engine and server settings when a request comes."""

    async def analyze(request):
        return await _answer(request, *settings(), _analyze)

    async def predict(request):
        return await _answer(request, *settings(), _predict)

    # stream=True: the body is read by us, chunk by chunk, against our own byte cap.
    app.add_route(analyze, "/v1/analyze", methods=["POST"], name="emotion_analyze", stream=True)
    app.add_route(predict, "/predict", methods=["POST"], name="emotion_predict", stream=True)


async def _answer(request, engine: EmotionEngine, config: Settings, handler):
    try:
        if config.api_token and not _authorized(request, config.api_token):
            return error_response("unauthorized", "a bearer token is required (Authorization: Bearer ...)",
                                  headers={"WWW-Authenticate": "Bearer"})
        if engine.error:
            raise ModelUnavailable(engine.error)
        if not engine.warm:
            raise ModelUnavailable("the emotion model is still loading")
        refused = engine.overload_reason
        if refused:  # before the body is read
            raise Overloaded(f"emotion engine is overloaded: {refused}")
        body = await _read_body(request, engine.config.max_audio_bytes + _FORM_OVERHEAD_BYTES)
        return await handler(request, body, engine, config)
    except EmotionError as exc:
        return error_response(exc.code, exc.message)
    except Exception:  # a bug costs this request, never the server
        log.exception("analysis request crashed")
        return error_response("internal", "internal error while analysing the audio")


def error_response(code: str, message: str, headers: dict | None = None):
    status = STATUS.get(code, 400)
    headers = dict(headers or {})
    if status == 503:
        headers["Retry-After"] = RETRY_AFTER_S
    return response.json({"error": {"code": code, "message": message}}, status=status, headers=headers)


def _authorized(request, token: str) -> bool:
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


async def _read_body(request, cap: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise AudioTooLarge(f"request body is {declared} bytes; the limit is {cap}")
    chunks, total = [], 0
    while True:
        chunk = await request.stream.read()
        if chunk is None:
            break
        total += len(chunk)
        if total > cap:
            raise AudioTooLarge(f"request body is over the {cap} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _analyze(request, body: bytes, engine: EmotionEngine, config: Settings):
    kind = parse_content_header(request.headers.get("content-type", ""))[0].lower()
    if kind == "multipart/form-data":
        fields, files = _form(request, body)
        upload = files.get("audio_file")
        if upload is None:
            raise BadRequest("multipart requests carry the audio in the field 'audio_file'")
        options = _options(fields)
        result = await _analyze_bytes(engine, upload.body, options)
    elif kind == "application/json":
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or "audio" not in data:
            raise BadRequest('JSON requests look like {"audio": {"url" | "path" | "base64": ...}, "granularity": ...}')
        options = _options({k: v for k, v in data.items() if k != "audio"})
        result = await engine.analyze_ref(parse_audio_ref(data["audio"]), granularity=options["granularity"],
                                          embeddings=options["embedding"])
    elif kind.startswith("audio/") or kind == "application/octet-stream":
        options = _options(dict(request.args))
        result = await _analyze_bytes(engine, body, options)
    else:
        raise BadRequest(f"unsupported Content-Type {kind or 'none'!r}: send multipart/form-data, audio/*, "
                         "application/octet-stream or application/json")
    out = result.as_dict()
    out["model"] = engine.config.model
    if config.result_key:
        # Over what Rasa takes from it (SIGNED_FIELDS); segments and embeddings are the caller's own.
        out["signature"] = sign_result(out, config.result_key)
    out["granularity"] = options["granularity"]
    if options["embedding"] and result.frame_embeddings is not None:
        out["frame_embeddings"] = result.frame_embeddings.tolist()
    return response.json(out)


async def _analyze_bytes(engine: EmotionEngine, data: bytes, options: dict[str, Any]):
    return await engine.analyze_bytes(data, granularity=options["granularity"], embeddings=options["embedding"],
                                      encoding=options["encoding"], sample_rate_hz=options["sample_rate"],
                                      channel=options["channel"])


async def _predict(request, body: bytes, engine: EmotionEngine, _config: Settings):
    fields, files = _form(request, body)
    upload = files.get("file")
    if upload is None:
        raise BadRequest("/predict takes a multipart upload in the field 'file'")
    result = await engine.analyze_bytes(upload.body)
    return response.json({"filename": upload.name, "emotion": result.emotion, "confidence": round(result.confidence, 6),
                          "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _form(request, body: bytes):
    _kind, params = parse_content_header(request.headers.get("content-type", ""))
    boundary = params.get("boundary")
    if not boundary:
        raise BadRequest("multipart/form-data needs a boundary")
    try:
        fields, files = parse_multipart_form(body, boundary.encode())
    except Exception as exc:
        raise BadRequest(f"malformed multipart body: {type(exc).__name__}") from None
    return {k: v[0] for k, v in fields.items()}, {k: v[0] for k, v in files.items()}


def _options(raw: dict[str, Any]) -> dict[str, Any]:
    raw = {k: (v[0] if isinstance(v, list) and v else v) for k, v in raw.items()}
    granularity = raw.get("granularity") or "utterance"
    if granularity not in GRANULARITIES:
        raise BadRequest(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    embedding = raw.get("return_embedding", False)
    if isinstance(embedding, str):
        if embedding.lower() not in ("true", "false", "1", "0", ""):
            raise BadRequest(f"return_embedding {embedding!r}: expected true or false")
        embedding = embedding.lower() in ("true", "1")
    elif not isinstance(embedding, bool):
        raise BadRequest("return_embedding must be true or false")
    encoding, rate = raw.get("encoding") or None, raw.get("sample_rate") or None
    if rate is not None:
        try:
            rate = int(rate)
        except (TypeError, ValueError):
            raise BadReference(f"sample_rate {rate!r}: expected a whole number of Hz") from None
    return {"granularity": granularity, "embedding": embedding, "encoding": encoding, "sample_rate": rate,
            "channel": parse_channel(raw.get("channel"))}
