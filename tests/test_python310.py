"""The action server under rasa-sdk 3.6.2 on Python 3.10 (the rasa/rasa-sdk:3.6.2 image's
pair), in an environment without torch: it starts, says why it cannot load the model, tags
turns that arrive with their result, hands off, and answers bad requests with a 4xx."""

import httpx
from conftest import b64, rasa_call, slot_events, wav_bytes

from emotion.settings import LABELS

RESULT = {"emotion": "angry", "confidence": 0.9, "scores": {**{k: 0.0125 for k in LABELS if k != "angry"}, "angry": 0.9},
          "duration_s": 2.0, "model": "x"}


def test_it_serves_on_python_3_10_and_says_why_there_is_no_model(server_py310):
    srv = server_py310
    ready = httpx.get(srv.url + "/ready")
    assert ready.status_code == 503 and "No module named 'torch'" in ready.json()["error"]
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    slots = slot_events(httpx.post(srv.url + "/webhook", json=rasa_call("c-310", {"emotion": RESULT}), timeout=30).json())
    assert slots["emotion"] == "angry" and slots["escalate"] is True and slots["escalation_reason"].startswith("angry_caller")
    call = rasa_call("c-310", None, action="action_handoff_to_human",
                     slots={"escalate": True, "escalation_reason": slots["escalation_reason"], "emotion": "angry"})
    body = httpx.post(srv.url + "/webhook", json=call, timeout=30).json()
    assert body["responses"][0]["custom"]["handoff"]["emotion"] == "angry" and "pause" in {e["event"] for e in body["events"]}
    audio_turn = slot_events(httpx.post(srv.url + "/webhook", json=rasa_call("c-310", {"audio": {"base64": b64(wav_bytes(1.0))}})).json())
    assert audio_turn["emotion_error"].startswith("[model_unavailable]") and audio_turn["escalate"] is False
    for method, path, body in (("GET", "/v1/analyze", None), ("POST", "/webhook", [1]), ("GET", "/favicon.ico", None),
                               ("POST", "/webhook", {"next_action": "action_analyze_emotion", "tracker": {"events": None}})):
        r = httpx.request(method, srv.url + path, json=body)
        assert 400 <= r.status_code < 500 and r.json()["error"]["code"], (method, path, r.text)
