"""The real rasa-sdk action server with our actions, over HTTP, with the JSON Rasa sends."""

import asyncio
import time

import httpx
import pytest
from conftest import RESULT_KEY, TOKEN, b64, encode, rasa_call, run_server_to_exit, slot_events, speech_like, wav_bytes

from emotion.engine.results import sign_result
from emotion.settings import LABELS


def post(server, body):
    token = server.env.get("EMOTION_API_TOKEN")  # Rasa sends it with action_endpoint: token
    r = httpx.post(server.url + "/webhook", json=body, timeout=30, headers={"Authorization": f"Bearer {token}"} if token else {})
    assert r.status_code == 200, r.text
    return r.json()


def assert_tagged(body, emotion="angry", confidence=0.9):
    slots = slot_events(body)
    assert slots["emotion"] == emotion
    assert slots["emotion_confidence"] == pytest.approx(confidence, abs=1e-4)
    assert set(slots["emotion_scores"]) == set(LABELS)
    assert slots["emotion_error"] is None
    return slots


def test_ready_reports_model_device_and_dtype(server):
    status = httpx.get(server.url + "/ready").json()
    assert status["ready"] is True and status["device"] == "cpu" and status["dtype"] == "float32"
    assert status["model"].endswith("angry90")


def test_actions_are_registered(server):
    names = {a["name"] for a in httpx.get(server.url + "/actions").json()}
    assert {"action_analyze_emotion", "action_handoff_to_human"} <= names


def test_base64_turn_is_tagged_and_escalates(server):
    slots = assert_tagged(post(server, rasa_call("c-b64", {"audio": {"base64": b64(wav_bytes(2.0))}})))
    assert slots["escalate"] is True
    assert slots["escalation_reason"].startswith("angry_caller: angry 0.90")
    assert slots["emotion_history"] == [{"emotion": "angry", "confidence": 0.9, "escalated": "angry_caller"}]


def test_url_turn(server, http_server):
    http_server.routes["/turn.ogg"] = (200, {"Content-Type": "audio/ogg"}, encode(speech_like(2.0, 48000), 48000, "OGG", "OPUS"))
    assert_tagged(post(server, rasa_call("c-url", {"audio": {"url": http_server.url + "/turn.ogg"}})))


def test_path_turn(server):
    assert_tagged(post(server, rasa_call("c-path", {"audio": {"path": "turn.wav"}})))


def test_telephony_mulaw_turn(server):
    raw = encode(speech_like(2.0, 8000), 8000, "RAW", "ULAW")
    assert_tagged(post(server, rasa_call("c-ulaw", {"audio": {"base64": b64(raw), "encoding": "mulaw", "sample_rate": 8000}})))


def test_typed_turn_is_left_untouched(server):
    assert post(server, rasa_call("c-text", None))["events"] == []


def test_history_is_kept_and_bounded(server):
    history = [{"emotion": "neutral", "confidence": 0.5, "escalated": None}] * 25
    slots = slot_events(post(server, rasa_call("c-hist", {"audio": {"path": "turn.wav"}}, slots={"emotion_history": history})))
    assert len(slots["emotion_history"]) == 20
    assert slots["emotion_history"][-1]["emotion"] == "angry"


@pytest.mark.parametrize("audio,code", [
    ({"base64": b64(b"this is not audio")}, "decode_failed"),
    ({"base64": "%%%not-base64%%%"}, "bad_reference"),
    ({"base64": b64(encode(speech_like(0.01), 16000, "WAV", "PCM_16"))}, "invalid_audio"),
    ({"path": "../../etc/passwd"}, "refused"),
    ({"url": "http://169.254.169.254/latest/meta-data"}, "refused"),
    ({"url": "http://127.0.0.1:9/nothing-listens-here"}, "fetch_failed"),
    ({"nothing": 1}, "bad_reference"),
    ("a string", "bad_reference"),
])
def test_bad_audio_gets_emotion_error_and_the_server_keeps_serving(server, audio, code):
    body = post(server, rasa_call("c-bad", {"audio": audio}))
    slots = slot_events(body)
    assert slots["emotion_error"].startswith(f"[{code}]")
    assert slots["emotion"] is None and slots["escalate"] is False
    assert "Traceback" not in str(body)
    assert_tagged(post(server, rasa_call("c-good", {"audio": {"path": "turn.wav"}})))


def test_handoff_sends_context_pauses_and_resets(server):
    history = [{"emotion": "angry", "confidence": 0.9, "escalated": "angry_caller"}]
    call = rasa_call("c-hand", None, text="this is the third time I call", action="action_handoff_to_human",
                     slots={"escalate": True, "escalation_reason": "angry_caller: angry 0.90 >= 0.70", "emotion": "angry",
                            "emotion_confidence": 0.9, "emotion_history": history})
    body = post(server, call)
    custom = body["responses"][0]["custom"]["handoff"]
    assert custom["reason"].startswith("angry_caller") and custom["emotion"] == "angry" and custom["confidence"] == 0.9
    assert custom["emotion_history"] == history
    assert custom["last_user_text"] == "this is the third time I call"
    assert body["responses"][1]["response"] == "utter_handoff"
    events = {e["event"] for e in body["events"]}
    assert "pause" in events
    assert slot_events(body)["escalate"] is False


def test_concurrent_turns_are_all_answered(server):
    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            calls = [rasa_call(f"c-{i}", {"audio": {"base64": b64(wav_bytes(1.0 + i % 3, seed=i))}}) for i in range(24)]
            return await asyncio.gather(*(client.post(server.url + "/webhook", json=c) for c in calls))

    for r in asyncio.run(main()):
        assert r.status_code == 200
        assert_tagged(r.json())


def test_metrics_are_exposed(server):
    text = httpx.get(server.url + "/metrics").text
    assert 'emotion_turns_total{outcome="tagged",path="webhook"}' in text
    assert 'emotion_escalations_total{rule="angry_caller"}' in text
    assert "emotion_batch_size_bucket" in text and "emotion_stage_seconds_bucket" in text
    assert "emotion_model_ready 1.0" in text


def test_a_model_that_failed_to_load(broken_server):
    srv = broken_server
    ready = httpx.get(srv.url + "/ready")
    assert ready.status_code == 503 and "no model directory" in ready.json()["error"]
    assert httpx.get(srv.url + "/health").status_code == 200
    slots = slot_events(post(srv, rasa_call("c-1", {"audio": {"base64": b64(wav_bytes(1.0))}})))
    assert slots["emotion_error"].startswith("[model_unavailable]") and slots["escalate"] is False


def test_fail_fast_stops_the_server(tmp_path):
    proc = run_server_to_exit({"EMOTION_MODEL": str(tmp_path / "missing"), "EMOTION_FAIL_FAST": "true"})
    assert proc.returncode != 0
    assert "EMOTION_FAIL_FAST: no model directory at" in proc.stdout + proc.stderr


def test_bad_rules_file_is_refused_at_startup(tmp_path, tiny_model):
    rules = tmp_path / "rules.yml"
    rules.write_text("rules:\n  - name: a\n    emotions: [furious]\n")
    proc = run_server_to_exit({"EMOTION_MODEL": str(tiny_model), "EMOTION_RULES": str(rules)})
    assert proc.returncode != 0
    assert "rules.yml, line 2: rule 'a': unknown emotion(s) ['furious']" in proc.stdout + proc.stderr


GOOD_RESULT = {"emotion": "angry", "confidence": 0.8, "scores": {**{k: 0.025 for k in LABELS if k != "angry"}, "angry": 0.8},
               "duration_s": 2.0, "model": "x"}


def test_a_result_in_the_metadata_is_taken_without_analysing_again(server):
    before = httpx.get(server.url + "/metrics").text.count("emotion_stage_seconds_count")
    slots = slot_events(post(server, rasa_call("c-res", {"emotion": GOOD_RESULT, "audio": {"base64": b64(b"not audio")}})))
    assert slots["emotion"] == "angry" and slots["emotion_confidence"] == 0.8 and slots["escalate"] is True
    assert slots["emotion_error"] is None and slots["escalation_reason"].startswith("angry_caller: angry 0.80")
    assert httpx.get(server.url + "/metrics").text.count("emotion_stage_seconds_count") == before


@pytest.mark.parametrize("emotion,message", [
    ({**GOOD_RESULT, "scores": {**GOOD_RESULT["scores"], "furious": 0.0}}, "labels the model does not have: ['furious']"),
    ({**GOOD_RESULT, "scores": {**GOOD_RESULT["scores"], "angry": 0.9}}, "sum to 1"),
    ({**GOOD_RESULT, "scores": {**GOOD_RESULT["scores"], "angry": 1.5, "sad": -0.675}}, "in [0, 1]"),
    ({**GOOD_RESULT, "confidence": 0.3}, "its score as confidence"),
    ({**GOOD_RESULT, "emotion": "calm"}, "a scored label"),
    ({"emotion": "angry"}, "scores must be an object"),
    ("angry", "must be an object"),
])
def test_a_bad_result_in_the_metadata_is_refused(server, emotion, message):
    slots = slot_events(post(server, rasa_call("c-badres", {"emotion": emotion})))
    assert slots["emotion_error"].startswith("[bad_result]") and message in slots["emotion_error"]
    assert slots["emotion"] is None and slots["escalate"] is False


def test_an_analysis_error_in_the_metadata_becomes_emotion_error(server):
    error = {"error": {"code": "decode_failed", "message": "could not decode audio: format not recognised"}}
    slots = slot_events(post(server, rasa_call("c-err", {"emotion": error})))
    assert slots["emotion_error"] == "[decode_failed] could not decode audio: format not recognised"


def test_a_failed_turn_clears_the_last_escalation_reason(server):
    slots = slot_events(post(server, rasa_call("c-stale", {"audio": {"base64": "%%%"}},
                                               slots={"escalation_reason": "angry_caller: angry 0.90 >= 0.70"})))
    assert slots["escalation_reason"] is None and slots["escalate"] is False


MILD_RESULT = {"emotion": "neutral", "confidence": 0.8, "scores": {**{k: 0.025 for k in LABELS if k != "neutral"}, "neutral": 0.8},
               "duration_s": 2.0, "model": "x"}


def signed(result, key=RESULT_KEY, age_s=0.0):
    return {**result, "signature": sign_result(result, key, issued_at=int(time.time() - age_s))}


def test_with_a_result_key_signed_fresh_results_are_taken(locked_server):
    """locked_server has EMOTION_RESULT_KEY: a result the API signed, or one signed with the
    same key a minute ago, tags the turn and escalates as any result does."""
    api = httpx.post(locked_server.url + "/v1/analyze", json={"audio": {"base64": b64(wav_bytes(1.0))}},
                     headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    assert_tagged(post(locked_server, rasa_call("c-signed-api", {"emotion": api})))
    for sender, result in (("c-signed-api", api), ("c-signed-here", signed(GOOD_RESULT, age_s=60))):
        slots = slot_events(post(locked_server, rasa_call(sender, {"emotion": result})))
        assert slots["emotion"] == "angry" and slots["escalate"] is True and slots["emotion_error"] is None
    # An analysis error is the channel's own word that there is no result: taken unsigned.
    error = {"error": {"code": "timeout", "message": "the analysis API did not answer within 3 s"}}
    assert slot_events(post(locked_server, rasa_call("c-signed-err", {"emotion": error})))["emotion_error"].startswith("[timeout]")


@pytest.mark.parametrize("emotion,message", [
    (GOOD_RESULT, "not signed"),
    ({**GOOD_RESULT, "signature": "forged"}, "signature must be"),
    ({**GOOD_RESULT, "signature": signed(MILD_RESULT)["signature"]}, "does not match"),  # a mild turn's signature, reused
    ({**signed(GOOD_RESULT), "confidence": 0.8000001}, "does not match"),
    (signed(GOOD_RESULT, key="another-key-of-enough-length"), "does not match"),
    (signed(GOOD_RESULT, age_s=301), "older than 300 s"),
    (signed(GOOD_RESULT, age_s=-3600), "issued in the future"),
], ids=["unsigned", "malformed", "tampered", "changed", "other-key", "stale", "future"])
def test_with_a_result_key_unsigned_tampered_and_stale_results_are_refused(locked_server, emotion, message):
    slots = slot_events(post(locked_server, rasa_call("c-unsigned", {"emotion": emotion})))
    assert slots["emotion_error"].startswith("[bad_result]") and message in slots["emotion_error"], slots["emotion_error"]
    assert slots["emotion"] is None and slots["escalate"] is False and slots["escalation_reason"] is None


def test_a_new_session_starts_with_no_history_and_no_cooldown(server):
    """Slots carried over into a new session (carry_over_slots_to_new_session) belong to
    the earlier call: the cooldown of yesterday's escalation must not silence today's."""
    yesterday = [{"emotion": "angry", "confidence": 0.9, "escalated": "angry_caller"}]
    call = rasa_call("c-session", {"emotion": GOOD_RESULT}, slots={"emotion_history": yesterday})
    user = call["tracker"]["events"][-1]
    call["tracker"]["events"] = [
        {"event": "user", "text": "yesterday", "timestamp": 1},
        {"event": "slot", "name": "emotion_history", "value": yesterday, "timestamp": 2},
        {"event": "session_started", "timestamp": 3},
        {"event": "slot", "name": "emotion_history", "value": yesterday, "timestamp": 4},  # carried over
        {"event": "action", "name": "action_listen", "timestamp": 5},
        user,
    ]
    slots = slot_events(post(server, call))
    assert slots["escalate"] is True
    assert slots["emotion_history"] == [{"emotion": "angry", "confidence": 0.8, "escalated": "angry_caller"}]

    # Within a session the history (and so the cooldown) is kept.
    call["tracker"]["events"] += [{"event": "slot", "name": "emotion_history", "value": slots["emotion_history"]},
                                  {"event": "action", "name": "action_listen"}, user]
    slots = slot_events(post(server, call))
    assert slots["escalate"] is False and len(slots["emotion_history"]) == 2


def test_escalations_alert_a_supervisor_in_the_background(alert_server, alert_receiver):
    """The receiver is a real loopback server that answers, then fails, then never answers.
    It holds each alert until the turn has been answered: the turn never waits for it, its
    slots are whole either way, and retries stop at EMOTION_ALERT_RETRIES."""
    import json
    import threading

    turn_answered = threading.Event()

    def held(status):
        def answer(w):
            turn_answered.wait(30)
            w.write(b"{}" if status == 200 else b"down!")
        return answer

    receivers = {"ok": (200, {"Content-Length": "2"}, held(200)), "error_500": (500, {"Content-Length": "5"}, held(500)),
                 "hangs": (200, {"Content-Length": "2"}, lambda w: threading.Event().wait(30))}
    for receiver, answer in receivers.items():
        alert_receiver.routes["/alerts"] = answer
        alert_receiver.posted.clear()
        turn_answered.clear()
        outcomes = _alert_outcomes(alert_server)
        call = rasa_call(f"c-alert-{receiver}", {"audio": {"base64": b64(wav_bytes(1.0))}}, text="this is the third time")
        slots = slot_events(post(alert_server, call))
        turn_answered.set()  # the turn came back while its alert was still held at the receiver
        assert slots["emotion"] == "angry" and slots["escalate"] is False  # alert only: the bot keeps the caller
        assert slots["emotion_history"][-1]["escalated"] == "watch"
        # The sender counts each alert once it is done with it: delivered, or failed after its retries.
        done = _wait_for(lambda before=outcomes: _alert_outcomes(alert_server) != before, 30)
        assert done, receiver
        expected = 1 if receiver == "ok" else 3
        assert len(alert_receiver.posted) == expected, receiver
        assert _alert_outcomes(alert_server)["sent" if receiver == "ok" else "failed"] == outcomes.get(
            "sent" if receiver == "ok" else "failed", 0) + 1
        alert = json.loads(alert_receiver.posted[0]["body"])
        assert alert["conversation_id"] == f"c-alert-{receiver}" and alert["rule"] == "watch" and alert["action"] == "alert"
        assert alert["emotion"] == "angry" and alert["last_user_text"] == "this is the third time"
        assert alert["emotion_history"] == slots["emotion_history"]
    # The next turn is answered while the receiver still hangs on a new alert.
    alert_receiver.routes["/alerts"] = receivers["hangs"]
    assert slot_events(post(alert_server, rasa_call("c-alert-next", {"audio": {"base64": b64(wav_bytes(1.0))}})))["emotion"] == "angry"


def _alert_outcomes(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("emotion_alerts_total{")}


def _wait_for(condition, timeout_s: float) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_on_a_voice_channel_the_handoff_context_is_never_spoken(server):
    """Rasa Pro's voice channels read every bot message aloud, custom payloads too."""
    call = rasa_call("c-voice", None, text="get me a person", action="action_handoff_to_human",
                     slots={"escalate": False, "emotion": "neutral", "emotion_confidence": 0.8, "emotion_history": []})
    call["tracker"]["events"][-1]["input_channel"] = "twilio_media_streams"
    body = post(server, call)
    assert [r.get("response") for r in body["responses"]] == ["utter_handoff"]
    context = slot_events(body)["handoff_context"]
    assert context["reason"] == "the caller asked for a human agent" and context["last_user_text"] == "get me a person"
    assert "pause" in {e["event"] for e in body["events"]}
