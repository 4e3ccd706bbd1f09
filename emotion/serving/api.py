"""The analysis API on the action server: ``POST /v1/analyze`` and the ``/predict`` alias.

Voice gateways, QA tools and the ``EmotionRestInput`` channel call it, so that audio is
analysed before the message reaches Rasa and never enters the tracker. Requests share
the engine's micro-batcher with Rasa turns. Sanic only; no Rasa.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from sanic import response
from sanic.headers import parse_content_header
from sanic.request import parse_multipart_form

from emotion.engine.audio import channel_count
from emotion.engine.core import EmotionEngine
from emotion.engine.fetch import parse_audio_ref, parse_channel
from emotion.engine.results import sign_result
from emotion.errors import AudioTooLarge, BadReference, EmotionError, ModelUnavailable, Overloaded
from emotion.rules import EscalationRule, Turn, replay_turns
from emotion.serving import metrics
from emotion.serving.http import error
from emotion.settings import GRANULARITIES, Settings

log = logging.getLogger(__name__)

# HTTP status per error code: bad input is 4xx, never a 500.
STATUS = {
    "bad_request": 400, "bad_reference": 400, "decode_failed": 400, "invalid_audio": 400, "bad_config": 400,
    "fetch_failed": 422, "refused": 403, "too_large": 413, "unauthorized": 401, "request_timeout": 408,
    "model_unavailable": 503, "overloaded": 503, "timeout": 504, "inference_failed": 500, "internal": 500,
}
RETRY_AFTER_S = "5"
# Room for multipart headers and form fields around the audio itself.
_FORM_OVERHEAD_BYTES = 64 * 1024
# Frame embeddings are frames x width numbers of JSON: 2M of them is ~40 MB, about 40 s of
# plus_large's frames. Longer turns ask for segments, or the utterance embedding.
MAX_FRAME_EMBEDDING_VALUES = 2 * 1024 * 1024


class BadRequest(EmotionError):
    code = "bad_request"


class RequestTimedOut(EmotionError):
    code = "request_timeout"


class _Uploads:
    """Bytes of request bodies this process holds, being received or waiting for their
    turn's answer: admission counts them, so stalled uploads cannot pile up memory."""

    def __init__(self) -> None:
        self.held = 0

    def take(self, n: int, budget: int) -> None:
        if self.held + n > budget:
            raise Overloaded(f"the analysis API holds {self.held} bytes of uploads; the limit is {budget}")
        self.held += n


_UPLOADS = _Uploads()


def add_routes(app, settings: Callable[[], tuple[EmotionEngine, Settings]],
               rules: Callable[[], Sequence[EscalationRule]] = lambda: ()) -> None:
    """``settings`` gives the process's engine and server settings when a request comes,
    ``rules`` its escalation rules (for ``rule_hits``)."""

    async def analyze(request):
        return await _answer(request, *settings(), functools.partial(_analyze, rules=rules))

    async def predict(request):
        return await _answer(request, *settings(), _predict)

    # stream=True: the body is read by us, chunk by chunk, against our own byte cap.
    app.add_route(analyze, "/v1/analyze", methods=["POST"], name="emotion_analyze", stream=True)
    app.add_route(predict, "/predict", methods=["POST"], name="emotion_predict", stream=True)


async def _answer(request, engine: EmotionEngine, config: Settings, handler):
    path = "predict" if handler is _predict else "api"
    held = 0
    try:
        if engine.error:
            raise ModelUnavailable(engine.error)
        if not engine.warm:
            raise ModelUnavailable("the emotion model is still loading")
        refused = engine.overload_reason
        if refused:  # before the body is read
            raise Overloaded(f"emotion engine is overloaded: {refused}")
        body, held = await _read_body(request, engine.settings.max_audio_bytes + _FORM_OVERHEAD_BYTES, config)
        reply, result = await handler(request, body, engine, config)
        metrics.record_turn(path, timings_ms=result.timings_ms)
        return reply
    except EmotionError as exc:
        metrics.record_turn(path, error_code=exc.code)
        return error_response(exc.code, exc.message)
    except Exception:  # a bug costs this request, never the server
        log.exception("analysis request crashed")
        metrics.record_turn(path, error_code="internal")
        return error_response("internal", "internal error while analysing the audio")
    finally:
        _UPLOADS.held -= held


def error_response(code: str, message: str, headers: dict | None = None):
    status = STATUS.get(code, 400)
    headers = dict(headers or {})
    if status == 503:
        headers["Retry-After"] = RETRY_AFTER_S
    return error(status, code, message, headers)


async def _read_body(request, cap: int, config: Settings) -> tuple[bytes, int]:
    """The body, read within the byte cap and the turn's time limit (a client that sends a
    byte now and then does not hold a connection and its buffer for ever), and the bytes
    it holds in the upload budget (the caller gives them back)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise AudioTooLarge(f"request body is {declared} bytes; the limit is {cap}")
    budget = config.max_upload_bytes_in_flight
    held = int(declared) if declared.isdigit() else 0
    _UPLOADS.take(held, budget)
    chunks, total = [], 0
    deadline = time.monotonic() + config.turn_timeout_s
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(request.stream.read(), deadline - time.monotonic())
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise RequestTimedOut(f"the request body did not arrive within {config.turn_timeout_s:g} s") from None
            if chunk is None:
                break
            total += len(chunk)
            if total > cap:
                raise AudioTooLarge(f"request body is over the {cap} byte limit")
            if total > held:  # no length declared, or more than declared
                _UPLOADS.take(total - held, budget)
                held = total
            chunks.append(chunk)
    except BaseException:
        _UPLOADS.held -= held
        raise
    return b"".join(chunks), held


async def _analyze(request, body: bytes, engine: EmotionEngine, config: Settings, *, rules=lambda: ()):
    kind = parse_content_header(request.headers.get("content-type", ""))[0].lower()
    audio = None  # the uploaded bytes, whose header says how many channels there are
    if kind == "multipart/form-data":
        fields, upload = _form(request, body, "audio_file")
        clash = sorted(k for k, v in request.args.items() if k in fields and fields[k] != v[0])
        if clash:
            raise BadRequest(f"{', '.join(clash)} given both as form field and query parameter, with different values")
        options = _options({**dict(request.args), **fields})
        audio = upload.body
        result = await _analyze_bytes(engine, audio, options)
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
        audio = body
        result = await _analyze_bytes(engine, audio, options)
    else:
        raise BadRequest(f"unsupported Content-Type {kind or 'none'!r}: send multipart/form-data, audio/*, "
                         "application/octet-stream or application/json")
    out = result.as_dict()
    out["model"] = engine.settings.model
    if config.result_key:
        # Over what Rasa takes from it (SIGNED_FIELDS); segments and embeddings are the caller's own.
        out["signature"] = sign_result(out, config.result_key)
    out["granularity"] = options["granularity"]
    if options["embedding"] and result.frame_embeddings is not None:
        if result.frame_embeddings.size > MAX_FRAME_EMBEDDING_VALUES:
            raise AudioTooLarge(f"frame embeddings of this audio are {result.frame_embeddings.size} numbers; the limit is "
                                f"{MAX_FRAME_EMBEDDING_VALUES}: ask for segment granularity or the utterance embedding")
        out["frame_embeddings"] = result.frame_embeddings
    if audio is not None:
        channels = await asyncio.to_thread(channel_count, audio, options["encoding"])
        if channels is not None:
            out["channels"] = channels
    if options["rule_hits"]:
        # Off the event loop too: an hour of 20 ms frames is 180,000 turns to replay.
        out["rule_hits"] = await asyncio.to_thread(_rule_hits, result, rules(), config.history_turns)
    # Off the event loop: a long turn's frames are megabytes of JSON.
    body = await asyncio.to_thread(_json, out)
    return response.raw(body, content_type="application/json"), result


async def _analyze_bytes(engine: EmotionEngine, data: bytes, options: dict[str, Any]):
    return await engine.analyze_bytes(data, granularity=options["granularity"], embeddings=options["embedding"],
                                      encoding=options["encoding"], sample_rate_hz=options["sample_rate"],
                                      channel=options["channel"])


async def _predict(request, body: bytes, engine: EmotionEngine, _config: Settings):
    _fields, upload = _form(request, body, "file")
    result = await engine.analyze_bytes(upload.body)
    return response.json({"filename": upload.name, "emotion": result.emotion, "confidence": round(result.confidence, 6),
                          "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}), result


def _rule_hits(result, rules: Sequence[EscalationRule], history_turns: int) -> list[dict[str, Any]]:
    """Where the server's rules fire, each segment (or frame) taken as a turn of one
    conversation, in order, by the same evaluation the analyze action runs; without a
    transcript, intent or input channel, so a rule that needs one of them never fires here.
    An utterance result is one turn."""
    parts = result.segments if result.segments is not None else [result]
    decisions = replay_turns([Turn(p.emotion, p.confidence) for p in parts], rules, history_turns=history_turns)
    return [{"segment": i, "start_s": round(getattr(p, "start_s", 0.0), 3),
             "end_s": round(getattr(p, "end_s", result.duration_s), 3), "rule": d.rule, "action": d.action, "reason": d.reason}
            for i, (p, d) in enumerate(zip(parts, decisions)) if d.fired]


def _json(out: dict) -> bytes:
    frames = out.pop("frame_embeddings", None)
    if frames is not None:
        out["frame_embeddings"] = frames.tolist()
    return json.dumps(out, separators=(",", ":")).encode()


def _form(request, body: bytes, field: str):
    """The form fields and the uploaded file in ``field`` of a multipart/form-data body."""
    kind, params = parse_content_header(request.headers.get("content-type", ""))
    expected = f"send multipart/form-data with the audio file in the field {field!r}"
    if kind.lower() != "multipart/form-data" or not params.get("boundary"):
        raise BadRequest(f"{request.path} takes an upload: {expected}")
    try:
        fields, files = parse_multipart_form(body, params["boundary"].encode())
    except Exception as exc:
        raise BadRequest(f"malformed multipart body ({type(exc).__name__}): {expected}") from None
    if field not in files:
        raise BadRequest(f"no file in the field {field!r}: {expected}")
    return {k: v[0] for k, v in fields.items()}, files[field][0]


def _options(raw: dict[str, Any]) -> dict[str, Any]:
    raw = {k: (v[0] if isinstance(v, list) and v else v) for k, v in raw.items()}
    granularity = raw.get("granularity") or "utterance"
    if granularity not in GRANULARITIES:
        raise BadRequest(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    embedding, hits = _flag(raw, "return_embedding"), _flag(raw, "rule_hits")
    encoding, rate = raw.get("encoding") or None, raw.get("sample_rate") or None
    if rate is not None:
        try:
            rate = int(rate)
        except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity
            raise BadReference(f"sample_rate {rate!r}: expected a whole number of Hz") from None
    return {"granularity": granularity, "embedding": embedding, "encoding": encoding, "sample_rate": rate,
            "channel": parse_channel(raw.get("channel")), "rule_hits": hits}


def _flag(raw: dict[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", ""):
            raise BadRequest(f"{key} {value!r}: expected true or false")
        return value.lower() in ("true", "1")
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false")
    return value
