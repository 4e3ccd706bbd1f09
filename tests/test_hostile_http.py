"""Hostile and malformed requests on every route of the real action server: a 4xx that
says why, never a 5xx, a traceback or the request's own body echoed back; the token on
every route that carries caller data; no forged log lines or metric labels."""

import json
import socket
import time
import zlib
from pathlib import Path

import httpx
import pytest
from conftest import TOKEN, b64, rasa_call, slot_events, wav_bytes

MARKER = "MARKER-4c1d"  # put in request bodies: never to come back in an answer
ROUTES = ("/webhook", "/v1/analyze", "/predict", "/ready", "/metrics", "/ui", "/ui/", "/health", "/actions",
          "/favicon.ico", "/no/such/route")
BODIES = {
    "none": {},
    "broken json": {"content": b'{"next_action": "' + MARKER.encode(), "headers": {"Content-Type": "application/json"}},
    "a list": {"json": [MARKER]},
    "text": {"content": MARKER.encode(), "headers": {"Content-Type": "text/plain"}},
    "events null": {"json": {**rasa_call("c", None), "tracker": {**rasa_call("c", None)["tracker"], "events": None}}},
    "an event that is no object": {"json": {**rasa_call("c", None), "tracker": {**rasa_call("c", None)["tracker"],
                                                                                 "events": [MARKER]}}},
    "tracker a string": {"json": {**rasa_call("c", None), "tracker": MARKER}},
    "no action": {"json": {"tracker": {}, "note": MARKER}},
    "metadata a list": {"json": rasa_call("c", [MARKER])},  # type: ignore[arg-type]
    "version a number": {"json": {**rasa_call("c", None), "version": 3.6}},
    "sample_rate Infinity": {"content": b'{"audio": {"base64": "AAAA", "encoding": "mulaw"}, "sample_rate": Infinity}',
                             "headers": {"Content-Type": "application/json"}},
    "multipart without boundary": {"content": MARKER.encode(), "headers": {"Content-Type": "multipart/form-data"}},
    "gzip-encoded": {"content": b"\x1f\x8b" + MARKER.encode(), "headers": {"Content-Encoding": "gzip",
                                                                        "Content-Type": "application/json"}},
}


def test_no_request_gets_a_5xx_a_traceback_or_its_body_back(server):
    seen = set()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for route in ROUTES:
            for method in ("GET", "POST", "PUT", "DELETE"):
                for name, body in BODIES.items():
                    if method == "GET" and body:
                        continue
                    r = client.request(method, route, **body)
                    where = f"{method} {route} with {name}: {r.status_code} {r.text[:300]}"
                    assert r.status_code < 500, where
                    assert "Traceback" not in r.text and MARKER not in r.text, where
                    if r.status_code >= 400:
                        assert r.json()["error"]["code"] and r.json()["error"]["message"], where
                    seen.add(r.status_code)
    assert {200, 400, 404, 405} <= seen
    # And it still tags the next turn.
    assert slot_events(client_post(server, rasa_call("c-after", {"audio": {"path": "turn.wav"}})))["emotion"] == "angry"


def client_post(server, body, **kwargs):
    r = httpx.post(server.url + "/webhook", json=body, timeout=30, **kwargs)
    assert r.status_code == 200, r.text
    return r.json()


def raw(server, request: bytes, read_timeout_s: float = 30.0) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request)
        sock.settimeout(read_timeout_s)
        return sock.recv(65536)


def test_a_body_over_the_servers_limit_is_413_not_500(server):
    reply = raw(server, b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 300000000\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413") and b"Traceback" not in reply


def test_deflate_bodies_inflate_within_a_cap(server):
    call = rasa_call("c-deflate", {"audio": {"path": "turn.wav"}})
    r = httpx.post(server.url + "/webhook", content=zlib.compress(json.dumps(call).encode()),
                   headers={"Content-Encoding": "deflate", "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 200 and slot_events(r.json())["emotion"] == "angry"
    bomb = zlib.compress(b"{" + b" " * 200_000_000 + b"}", 9)  # ~200 KB that inflates to 200 MB
    r = httpx.post(server.url + "/webhook", content=bomb, headers={"Content-Encoding": "deflate"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    r = httpx.post(server.url + "/webhook", content=b"not deflate", headers={"Content-Encoding": "deflate"}, timeout=30)
    assert r.status_code == 400


def test_the_token_guards_the_webhook_the_api_and_metrics(locked_server):
    srv, bearer = locked_server, {"Authorization": f"Bearer {TOKEN}"}
    call = rasa_call("c-locked", {"audio": {"base64": b64(wav_bytes(1.0))}})
    missing = httpx.post(srv.url + "/webhook", json=call)
    assert missing.status_code == 401 and "a bearer token is required" in missing.json()["error"]["message"]
    wrong = httpx.post(srv.url + "/webhook", json=call, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "the bearer token is not valid"
    assert slot_events(client_post(srv, call, headers=bearer))["emotion"] == "angry"
    # Rasa's action_endpoint `token:` sends it as a query parameter.
    assert httpx.post(srv.url + "/webhook", params={"token": TOKEN}, json=call, timeout=30).status_code == 200
    assert httpx.get(srv.url + "/metrics").status_code == 401
    assert httpx.get(srv.url + "/metrics", headers=bearer).status_code == 404  # metrics are off there
    # /ready tells a probe without the token whether it is ready, and nothing more.
    assert httpx.get(srv.url + "/ready").json() == {"ready": True}
    assert httpx.get(srv.url + "/ready", headers=bearer).json()["model"].endswith("angry90")
    assert httpx.get(srv.url + "/health").status_code == 200


def test_a_slow_upload_is_cut_at_the_turn_limit(locked_server):
    """A client sending a byte now and then holds no connection past EMOTION_TURN_TIMEOUT_S (3 s here)."""
    head = (f"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: audio/wav\r\n"
            "Content-Length: 100000\r\n\r\n").encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", locked_server.port)) as sock:
        sock.sendall(head)
        sock.settimeout(0.5)
        reply = b""
        while not reply and time.monotonic() - started < 30:
            sock.send(b"R")
            try:
                reply = sock.recv(4096)
            except TimeoutError:
                pass
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_stalled_uploads_count_against_the_upload_budget(locked_server):
    """Uploads that declare their length and send nothing hold their bytes in the budget
    (1 MiB here): past it a new upload is refused at once, and once they are gone it is served."""
    head = (f"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: audio/wav\r\n"
            "Content-Length: 300000\r\n\r\n").encode()
    stalled = [socket.create_connection(("127.0.0.1", locked_server.port)) for _ in range(3)]
    try:
        for sock in stalled:
            sock.sendall(head)
        time.sleep(0.5)  # let the server read their headers
        r = httpx.post(locked_server.url + "/v1/analyze", content=wav_bytes(5.0), timeout=30,
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "audio/wav"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
        assert "bytes of uploads" in r.json()["error"]["message"]
    finally:
        for sock in stalled:
            sock.close()
    for _ in range(100):  # the server notices the closed connections
        r = httpx.post(locked_server.url + "/v1/analyze", content=wav_bytes(5.0), timeout=30,
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "audio/wav"})
        if r.status_code == 200:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text


def test_a_gateways_error_code_is_not_a_metric_label_and_caller_text_cannot_forge_log_lines(server):
    sender = "caller\nINFO forged line"
    call = rasa_call(sender, {"emotion": {"error": {"code": "made_up_code_42", "message": "bad\r\nthing"}}})
    slots = slot_events(client_post(server, call))
    assert slots["emotion_error"].startswith("[made_up_code_42]")
    metrics = httpx.get(server.url + "/metrics").text
    assert "made_up_code_42" not in metrics and 'code="upstream_error",path="webhook"' in metrics
    log = Path(server.log.name).read_text(encoding="utf-8")
    assert "conversation=caller\\x0aINFO forged line emotion error [made_up_code_42]: bad\\x0d\\x0athing" in log
    assert "\nINFO forged line" not in log


def test_the_api_counts_turns_errors_and_stage_times_by_path(server):
    httpx.post(server.url + "/v1/analyze", content=wav_bytes(1.0), headers={"Content-Type": "audio/wav"}, timeout=30)
    httpx.post(server.url + "/v1/analyze", content=b"junk", headers={"Content-Type": "audio/wav"}, timeout=30)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'emotion_turns_total{outcome="tagged",path="api"}' in metrics
    assert 'emotion_errors_total{code="decode_failed",path="api"}' in metrics
    assert 'emotion_stage_seconds_count{path="api",stage="inference"}' in metrics


def test_the_server_says_in_its_log_that_the_model_is_ready(server):
    log = Path(server.log.name).read_text(encoding="utf-8")
    assert "emotion model ready: " in log and "angry90 on cpu (float32) in this process, labels angry," in log


def test_options_of_a_multipart_request_may_come_as_query_parameters(server):
    files = {"audio_file": ("a.wav", wav_bytes(4.0), "audio/wav")}
    r = httpx.post(server.url + "/v1/analyze", files=files, params={"granularity": "segment"}, timeout=30)
    assert r.status_code == 200 and r.json()["granularity"] == "segment"
    r = httpx.post(server.url + "/v1/analyze", files=files, params={"granularity": "segment"}, data={"granularity": "frame"})
    assert r.status_code == 400 and "granularity given both as form field and query parameter" in r.json()["error"]["message"]


@pytest.mark.parametrize("kwargs", [
    {"content": wav_bytes(1.0), "headers": {"Content-Type": "audio/wav"}},
    {"files": {"audio": ("a.wav", wav_bytes(1.0), "audio/wav")}},
])
def test_predict_names_its_field(server, kwargs):
    r = httpx.post(server.url + "/predict", timeout=30, **kwargs)
    assert r.status_code == 400 and "in the field 'file'" in r.json()["error"]["message"]


def test_the_review_page_is_sent_with_a_content_security_policy(server):
    for path in ("/ui", "/ui/"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        policy = r.headers["Content-Security-Policy"]
        nonce = policy.split("'nonce-", 1)[1].split("'", 1)[0]
        assert f'<script nonce="{nonce}">' in r.text and "frame-ancestors 'none'" in policy
