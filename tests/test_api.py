"""The analysis API (/v1/analyze, /predict) on the real action server, over HTTP."""

import asyncio
import socket
import time

import httpx
import numpy as np
import pytest
from conftest import RESULT_KEY, TOKEN, b64, encode, rasa_call, slot_events, speech_like, wav_bytes

from emotion.engine.results import result_from_metadata
from emotion.errors import BadResult
from emotion.settings import LABELS


def analyze(server, **kwargs):
    return httpx.post(server.url + "/v1/analyze", timeout=30, **kwargs)


def assert_result(body, granularity="utterance"):
    assert body["emotion"] == "angry" and body["confidence"] == pytest.approx(0.9, abs=1e-5)
    assert set(body["scores"]) == set(LABELS) and sum(body["scores"].values()) == pytest.approx(1, abs=1e-4)
    assert body["granularity"] == granularity and body["model"].endswith("angry90") and body["duration_s"] > 0


def test_multipart_upload(server):
    r = analyze(server, files={"audio_file": ("turn.wav", wav_bytes(4.0), "audio/wav")},
                data={"granularity": "segment", "return_embedding": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_result(body, "segment")
    assert [(s["start_s"], s["end_s"]) for s in body["segments"]] == [(0.0, 3.0), (1.5, 4.0)]
    assert len(body["embedding"]) == 32  # the tiny checkpoint's width


def test_frames_with_embeddings(server):
    r = analyze(server, files={"audio_file": ("t.flac", encode(speech_like(1.0), 16000, "FLAC"), "audio/flac")},
                data={"granularity": "frame", "return_embedding": "1"})
    body = r.json()
    assert_result(body, "frame")
    assert len(body["segments"]) == 49 and len(body["frame_embeddings"]) == 49
    assert body["segments"][1]["start_s"] == pytest.approx(0.02)


def test_raw_body_and_headerless_telephony(server):
    assert_result(analyze(server, content=wav_bytes(2.0), headers={"Content-Type": "audio/wav"}).json())
    ulaw = encode(speech_like(2.0, 8000), 8000, "RAW", "ULAW")
    r = analyze(server, content=ulaw, params={"encoding": "mulaw", "sample_rate": "8000"},
                headers={"Content-Type": "application/octet-stream"})
    assert_result(r.json())
    assert r.json()["duration_s"] == pytest.approx(2.0, abs=0.01)


def test_json_references_follow_the_metadata_rules(server, http_server):
    assert_result(analyze(server, json={"audio": {"path": "turn.wav"}}).json())
    assert_result(analyze(server, json={"audio": {"base64": b64(wav_bytes(1.0))}}).json())
    http_server.routes["/t.ogg"] = (200, {}, encode(speech_like(2.0, 48000), 48000, "OGG", "VORBIS"))
    assert_result(analyze(server, json={"audio": {"url": http_server.url + "/t.ogg"}}).json())


@pytest.mark.parametrize("kwargs,status,code", [
    ({"content": b"not audio at all", "headers": {"Content-Type": "audio/wav"}}, 400, "decode_failed"),
    ({"content": encode(speech_like(0.05), 16000, "WAV", "PCM_16"), "headers": {"Content-Type": "audio/wav"}}, 400, "invalid_audio"),
    ({"files": {"audio_file": ("a.wav", wav_bytes(1.0))}, "data": {"granularity": "word"}}, 400, "bad_request"),
    ({"files": {"audio_file": ("a.wav", wav_bytes(1.0))}, "data": {"return_embedding": "maybe"}}, 400, "bad_request"),
    ({"files": {"file": ("a.wav", wav_bytes(1.0))}}, 400, "bad_request"),
    ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
    ({"json": {"audio": {"base64": "AAAA", "url": "http://x"}}}, 400, "bad_reference"),
    ({"json": {"audio": {"base64": "AAAA", "encoding": "mulaw", "sample_rate": float("nan")}}}, 400, "bad_reference"),
    ({"json": {"audio": {"path": "../../etc/passwd"}}}, 403, "refused"),
    ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 400, "bad_request"),
    ({"content": b"RIFF", "params": {"encoding": "gsm"}, "headers": {"Content-Type": "audio/basic"}}, 400, "bad_reference"),
    ({"content": encode(speech_like(31.0, 8000), 8000, "WAV", "PCM_U8"), "headers": {"Content-Type": "audio/wav"}}, 200, None),
])
def test_errors_are_json_with_the_right_status(server, kwargs, status, code):
    if "json" in kwargs and isinstance(kwargs["json"]["audio"].get("sample_rate"), float):
        import json

        kwargs = {"content": json.dumps(kwargs["json"]).encode(), "headers": {"Content-Type": "application/json"}}
    r = analyze(server, **kwargs)
    assert r.status_code == status, r.text
    if code:
        assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert "Traceback" not in r.text


def test_too_long_audio_is_413(server):
    long = encode(speech_like(1.0, 8000).repeat(301), 8000, "FLAC")  # 301 s, small once compressed
    r = analyze(server, content=long, headers={"Content-Type": "audio/flac"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def raw_post(server, head: bytes, chunks, read_timeout_s=10.0):
    """Send a request by hand, chunk after chunk, stopping when the server answers or
    closes; return (status line, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head)
        sock.settimeout(0.0)
        for chunk in chunks:
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except BlockingIOError:
                pass
            except OSError:
                break
            try:
                sock.setblocking(True)
                sock.sendall(chunk)
                sent += len(chunk)
                sock.settimeout(0.0)
            except OSError:
                break
        sock.settimeout(read_timeout_s)
        reply = sock.recv(4096).split(b"\r\n", 1)[0]
    return reply, sent


def test_an_oversized_upload_is_refused_without_reading_it(server):
    from conftest import rss_mb

    before = rss_mb(server.proc.pid)
    declared = 500 * 1024 * 1024
    head = (f"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nContent-Length: {declared}\r\n\r\n").encode()
    # Answered before the body was sent: 413 while under 64 MiB of the 500 MiB had gone.
    reply, sent = raw_post(server, head, (b"\0" * 65536 for _ in range(declared // 65536)))
    assert b"413" in reply and sent < 64 * 1024 * 1024

    # No length declared: the stream is cut at the cap (2 MiB here), not read to its end.
    head = b"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"10000\r\n" + b"\0" * 65536 + b"\r\n"
    reply, sent = raw_post(server, head, (chunk for _ in range(8000)))
    assert b"413" in reply and sent < 64 * 1024 * 1024
    assert rss_mb(server.proc.pid) - before < 100
    assert analyze(server, content=wav_bytes(1.0), headers={"Content-Type": "audio/wav"}).status_code == 200


def test_many_concurrent_requests_and_one_bad_one(server):
    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            bodies = [wav_bytes(0.5 + (i % 5) * 0.7, seed=i) for i in range(64)]
            bodies[17] = b"garbage"
            return await asyncio.gather(*(client.post(server.url + "/v1/analyze", content=b, headers={"Content-Type": "audio/wav"})
                                          for b in bodies))

    replies = asyncio.run(main())
    assert replies[17].status_code == 400 and replies[17].json()["error"]["code"] == "decode_failed"
    assert all(r.status_code == 200 and r.json()["emotion"] == "angry" for i, r in enumerate(replies) if i != 17)


def test_the_api_result_is_what_rasa_takes_as_metadata(server):
    body = analyze(server, content=wav_bytes(2.0), headers={"Content-Type": "audio/wav"}).json()
    slots = slot_events(httpx.post(server.url + "/webhook", json=rasa_call("c-meta", {"emotion": body}), timeout=30).json())
    assert slots["emotion"] == "angry" and slots["escalate"] is True and slots["emotion_error"] is None
    assert slots["emotion_scores"] == {k: round(v, 4) for k, v in body["scores"].items()}
    assert "signature" not in body  # no EMOTION_RESULT_KEY: results go unsigned


def test_with_a_result_key_each_result_is_signed(locked_server):
    """A result signed by the API verifies with the shared key, whatever way the audio came;
    the same result with a field changed, or checked with another key, does not."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for kwargs in ({"json": {"audio": {"base64": b64(wav_bytes(1.0))}}}, {"content": wav_bytes(1.0), "params": {"granularity": "segment"}}):
        r = analyze(locked_server, headers={**headers, "Content-Type": "application/json" if "json" in kwargs else "audio/wav"}, **kwargs)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body["signature"]) == {"issued_at", "hmac"} and abs(body["signature"]["issued_at"] - time.time()) < 60
        assert result_from_metadata(body, LABELS, key=RESULT_KEY).emotion == "angry"
        for changed, key in (({**body, "duration_s": body["duration_s"] + 1}, RESULT_KEY), ({**body, "model": "other"}, RESULT_KEY),
                             (body, RESULT_KEY + "-but-another")):
            with pytest.raises(BadResult, match="does not match"):
                result_from_metadata(changed, LABELS, key=key)


def test_a_locked_down_server_the_token_the_predict_alias_and_no_metrics(locked_server):
    srv = locked_server
    assert httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    assert httpx.get(srv.url + "/ready").status_code == 200
    files = {"file": ("call.wav", wav_bytes(1.0), "audio/wav")}
    refused = httpx.post(srv.url + "/predict", files=files)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert httpx.post(srv.url + "/v1/analyze", files={"audio_file": ("a.wav", wav_bytes(1.0))},
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.post(srv.url + "/predict", files=files, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    body = r.json()
    assert body["filename"] == "call.wav" and body["emotion"] in LABELS and 0 < body["confidence"] <= 1
    assert body["timestamp"].endswith("Z")


def test_503_with_retry_after_when_the_model_is_unavailable(broken_server):
    srv = broken_server
    r = analyze(srv, content=wav_bytes(1.0), headers={"Content-Type": "audio/wav"})
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert r.json()["error"]["code"] == "model_unavailable" and "no model directory" in r.json()["error"]["message"]


def test_one_channel_of_a_stereo_recording(server):
    stereo = encode(np.stack([speech_like(2.0, seed=1), speech_like(2.0, seed=2)], axis=1), 16000, "WAV", "PCM_16")
    for params in ({"channel": "1"}, {"channel": "mix"}):
        body = analyze(server, content=stereo, params=params, headers={"Content-Type": "audio/wav"}).json()
        assert_result(body)
        assert body["channels"] == 2  # from the header: a client can offer each
    r = analyze(server, content=stereo, params={"channel": "2"}, headers={"Content-Type": "audio/wav"})
    assert r.status_code == 400 and "the audio has 2 channels" in r.json()["error"]["message"]
    r = analyze(server, json={"audio": {"base64": b64(stereo), "channel": 5}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_reference"
    slots = slot_events(httpx.post(server.url + "/webhook", json=rasa_call("c-stereo", {"audio": {"base64": b64(stereo), "channel": 3}})).json())
    assert slots["emotion_error"].startswith("[bad_reference] channel 3 asked for; the audio has 2 channels")


def test_where_the_servers_rules_fire(server):
    """rule_hits: the server's own rules (the default, angry >= 0.7 with a 10-turn cooldown)
    on each segment taken as a turn, in order; an utterance is one turn."""
    r = analyze(server, files={"audio_file": ("turn.wav", wav_bytes(4.0), "audio/wav")}, data={"granularity": "segment", "rule_hits": "true"})
    assert r.json()["rule_hits"] == [{"segment": 0, "start_s": 0.0, "end_s": 3.0, "rule": "angry_caller", "action": "handoff",
                                      "reason": "angry_caller: angry 0.90 >= 0.70"}]
    body = analyze(server, json={"audio": {"base64": b64(wav_bytes(1.0))}, "rule_hits": True}).json()
    assert [(h["segment"], h["start_s"], h["end_s"]) for h in body["rule_hits"]] == [(0, 0.0, body["duration_s"])]
    assert "rule_hits" not in analyze(server, content=wav_bytes(1.0), headers={"Content-Type": "audio/wav"}).json()
    r = analyze(server, content=wav_bytes(1.0), params={"rule_hits": "maybe"}, headers={"Content-Type": "audio/wav"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "rule_hits 'maybe': expected true or false"
