"""End to end with the real Rasa Open Source 3.6 server running the example bot.

Rasa lives in its own virtual environment (scripts/install-rasa-oss.sh; RASA_VENV
overrides where): it is the client our action server must satisfy.
"""

import json
import os
import subprocess
import time

import httpx
import pytest
from conftest import EXAMPLE_BOT as BOT
from conftest import ROOT, TIME_WAIT, Door, b64, encode, free_port, rasa_bin, sockets_to, speech_like, wav_bytes

from emotion.settings import LABELS

# Two more doors into the same channel class, for turns whose analysis must come from
# elsewhere: the angry-0.9 server's API, and a port where nothing listens.
TEST_CHANNELS = """
from emotion_channel import EmotionRestInput


class AngryApi(EmotionRestInput):
    @classmethod
    def name(cls):
        return "emotion_rest_angry"


class InlineOnly(EmotionRestInput):
    @classmethod
    def name(cls):
        return "emotion_rest_inline"


class NoApi(EmotionRestInput):
    @classmethod
    def name(cls):
        return "emotion_rest_down"
"""


@pytest.fixture(scope="module")
def bot(rasa_training, server_sdk36, alert_server):
    """The example bot, trained once, served by Rasa Open Source 3.6 with rasa-sdk 3.6's
    action server (the angry-0.9 one) as its action endpoint, through a door a test can shut.
    Its EmotionRestInput channel asks the angry-0.6 server's API; emotion_rest_angry asks the
    angry-0.9 one's, and emotion_rest_down a port where nothing listens."""
    bot_dir = rasa_training.wait()
    door = Door(server_sdk36.port)
    (bot_dir / "endpoints.yml").write_text(f'action_endpoint:\n  url: "http://127.0.0.1:{door.port}/webhook"\n')
    (bot_dir / "test_channels.py").write_text(TEST_CHANNELS)
    credentials = (BOT / "credentials.yml").read_text().replace("http://localhost:5055", alert_server.url)
    credentials += (f'test_channels.AngryApi:\n  analyze_url: "{server_sdk36.url}/v1/analyze"\n'
                    f'test_channels.InlineOnly:\n  analyze_url: "{server_sdk36.url}/v1/analyze"\n  inline_audio_only: true\n'
                    f'test_channels.NoApi:\n  analyze_url: "http://127.0.0.1:{free_port()}/v1/analyze"\n')
    (bot_dir / "credentials.yml").write_text(credentials)
    env = {**os.environ, "RASA_TELEMETRY_ENABLED": "false"}
    port = free_port()
    log = open(bot_dir.parent / "rasa.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(rasa_bin()), "run", "--enable-api", "-m", "models/bot.tar.gz", "--port", str(port), "-i", "127.0.0.1",
         "--credentials", "credentials.yml"],
        cwd=bot_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"Rasa exited; see {log.name}"
        try:
            if httpx.get(url + "/status", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"Rasa did not start; see {log.name}"
        time.sleep(0.5)
    yield {"url": url, "actions": server_sdk36, "api": alert_server, "door": door}
    proc.terminate()
    proc.wait(30)
    log.close()


def result(emotion: str, confidence: float) -> dict:
    """An utterance result as the analysis API returns it (metadata.emotion)."""
    rest = (1 - confidence) / (len(LABELS) - 1)
    scores = {label: confidence if label == emotion else rest for label in LABELS}
    return {"emotion": emotion, "confidence": confidence, "scores": scores, "duration_s": 1.0, "model": "x"}


def say(bot, sender, text, audio=None, channel="rest", emotion=None):
    body = {"sender": sender, "message": text}
    if audio is not None:
        body["metadata"] = {"audio": audio}
    if emotion is not None:
        body["metadata"] = {"emotion": emotion}
    r = httpx.post(bot["url"] + f"/webhooks/{channel}/webhook", json=body, timeout=60)
    assert r.status_code == 200
    return r.json()


def tracker(bot, sender):
    return httpx.get(f"{bot['url']}/conversations/{sender}/tracker", timeout=10).json()


def actions_run(t):
    return [e["name"] for e in t["events"] if e["event"] == "action"]


@pytest.mark.parametrize("runtime", ["onnx", "int8"])
def test_an_angry_caller_is_handed_off_on_each_cpu_runtime(bot, runtime, server_newest, server_int8):
    """The bot's own action server runs torch; through the same door, Rasa reaches the one on
    ONNX Runtime in fp32, then the one with int8 weights (Rasa 3.6 connects anew per call)."""
    actions = {"onnx": server_newest, "int8": server_int8}[runtime]
    ready = httpx.get(actions.url + "/ready", timeout=10).json()
    assert (ready["runtime"], ready["dtype"]) == ("onnx", "int8" if runtime == "int8" else "float32")
    bot["door"].target = actions.port
    try:
        replies = say(bot, f"caller-{runtime}", "I want a refund", {"base64": b64(wav_bytes(2.0))})
    finally:
        bot["door"].target = bot["actions"].port
    handoff = next(r["custom"]["handoff"] for r in replies if "custom" in r)
    assert handoff["emotion"] == "angry" and handoff["confidence"] == pytest.approx(0.9)
    assert tracker(bot, f"caller-{runtime}")["paused"] is True


def test_angry_caller_at_0_9_is_handed_off_whatever_the_intent(bot):
    replies = say(bot, "caller-angry", "I want a refund", {"base64": b64(wav_bytes(2.0))})
    handoff = next(r["custom"]["handoff"] for r in replies if "custom" in r)
    assert handoff["emotion"] == "angry" and handoff["confidence"] == pytest.approx(0.9)
    assert handoff["reason"].startswith("angry_caller")
    assert handoff["last_user_text"] == "I want a refund"
    assert any("connecting you with a colleague" in r.get("text", "") for r in replies)
    assert not any("refund" in r.get("text", "") for r in replies)  # the intent's own reply lost
    t = tracker(bot, "caller-angry")
    assert t["paused"] is True
    assert "action_handoff_to_human" in actions_run(t)
    assert t["slots"]["escalate"] is False and t["slots"]["emotion"] == "angry"

    # Telephony audio from a phone gateway: 8 kHz mu-law, headerless.
    raw = encode(speech_like(2.0, 8000), 8000, "RAW", "ULAW")
    replies = say(bot, "caller-phone", "this is terrible service", {"base64": b64(raw), "encoding": "mulaw", "sample_rate": 8000})
    assert any("custom" in r for r in replies)
    assert tracker(bot, "caller-phone")["paused"] is True

    # A typed turn: no audio, no tag, the bot's ordinary reply.
    replies = say(bot, "caller-typed", "I want to complain")
    assert [r.get("text") for r in replies] == ["I'm sorry to hear that. Let me look into it."]
    t = tracker(bot, "caller-typed")
    assert t["paused"] is False and t["slots"]["emotion"] is None

    # Bad audio: the bot carries on, the turn says why.
    replies = say(bot, "caller-bad", "I want a refund", {"base64": b64(b"not audio")})
    assert [r.get("text") for r in replies] == ["I can help with a refund. What is your order number?"]
    t = tracker(bot, "caller-bad")
    assert t["slots"]["emotion_error"].startswith("[decode_failed]") and t["paused"] is False


def test_angry_caller_at_0_6_is_not_handed_off(bot):
    replies = say(bot, "caller-mild", "I want to complain", emotion=result("angry", 0.6))
    assert [r.get("text") for r in replies] == ["I'm sorry to hear that. I'll make this a priority."]  # the angry variation
    t = tracker(bot, "caller-mild")
    assert t["paused"] is False and "action_handoff_to_human" not in actions_run(t)
    assert t["slots"]["emotion"] == "angry" and t["slots"]["emotion_confidence"] == pytest.approx(0.6)
    assert t["slots"]["escalate"] is False


def test_voice_client_sends_a_turn(bot, tmp_path):
    audio = tmp_path / "turn.wav"
    audio.write_bytes(wav_bytes(2.0))
    import sys

    api = bot["actions"].url + "/v1/analyze"
    for via in ("api", "metadata"):
        sender = f"caller-client-{via}"
        proc = subprocess.run([sys.executable, "-m", "emotion", "send-turn", "--rasa", bot["url"], "--sender", sender, "--via", via,
                               "--api", api, "--text", "where is my order", "--mulaw", str(audio)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "bot (custom): {\"handoff\"" in proc.stdout
        assert '"emotion": "angry"' in proc.stdout and "conversation paused" in proc.stdout
        assert ("base64" in json.dumps(tracker(bot, sender))) is (via == "metadata")


def test_audio_analysed_by_the_channel_never_enters_the_tracker(bot):
    wav = wav_bytes(5.7)
    sizes = []
    closed_before = sockets_to(bot["api"].port).count(TIME_WAIT)  # the server's readiness checks closed these
    for turn in range(20):
        replies = say(bot, "caller-channel", "I want to complain", {"base64": b64(wav)}, channel="emotion_rest")
        assert [r.get("text") for r in replies] == ["I'm sorry to hear that. I'll make this a priority."]
        t = tracker(bot, "caller-channel")
        sizes.append(len(json.dumps(t)))
        assert t["slots"]["emotion"] == "angry" and t["slots"]["emotion_confidence"] == pytest.approx(0.6)
        assert t["slots"]["emotion_error"] is None and len(t["slots"]["emotion_history"]) == turn + 1
    text = json.dumps(t)
    assert b64(wav)[:64] not in text and '"audio"' not in text and "base64" not in text
    assert t["latest_message"]["metadata"]["emotion"]["emotion"] == "angry"
    per_turn = (sizes[-1] - sizes[0]) / (len(sizes) - 1)
    assert per_turn < 5000, f"tracker grew {per_turn:.0f} bytes per turn"
    # The channel keeps its connection to the API: one per turn would leave 20 more in TIME_WAIT.
    assert sockets_to(bot["api"].port).count(TIME_WAIT) - closed_before <= 3  # an idle one may close (4 s)


def test_an_angry_caller_through_the_channel_is_handed_off(bot):
    replies = say(bot, "caller-channel-angry", "I want a refund", {"base64": b64(wav_bytes(2.0))}, channel="emotion_rest_angry")
    assert next(r["custom"]["handoff"] for r in replies if "custom" in r)["emotion"] == "angry"
    assert tracker(bot, "caller-channel-angry")["paused"] is True


def test_a_result_the_caller_sends_to_the_channel_is_dropped(bot, angry_alerts):
    """Only the channel puts metadata.emotion on a message: a caller who posts one of their
    own, with no audio, to emotion_rest is neither handed off nor reported to a supervisor."""
    replies = say(bot, "caller-forger", "I want a refund", channel="emotion_rest", emotion=result("angry", 0.99))
    assert [r.get("text") for r in replies] == ["I can help with a refund. What is your order number?"]
    t = tracker(bot, "caller-forger")
    assert t["paused"] is False and "action_handoff_to_human" not in actions_run(t)
    assert t["slots"]["escalate"] is False and t["slots"]["emotion"] is None
    assert "emotion" not in t["latest_message"]["metadata"]
    # A genuine angry turn next. The action server posts its alerts one at a time, in order:
    # once this one has arrived, one for the forged turn would have arrived before it.
    say(bot, "caller-after-forger", "I want a refund", {"base64": b64(wav_bytes(1.0))}, channel="emotion_rest_angry")
    deadline = time.monotonic() + 30
    while "caller-after-forger" not in (alerted := [json.loads(a["body"])["conversation_id"] for a in angry_alerts.posted]):
        assert time.monotonic() < deadline, "the genuine angry turn sent no alert"
        time.sleep(0.05)
    assert "caller-forger" not in alerted


def test_the_bot_answers_when_the_analysis_api_or_the_action_server_is_down(bot):
    for i in range(3):  # actions up, nothing on the API's port
        replies = say(bot, "caller-no-api", "I want a refund", {"base64": b64(wav_bytes(1.0, seed=i))}, channel="emotion_rest_down")
        assert [r.get("text") for r in replies] == ["I can help with a refund. What is your order number?"]
        t = tracker(bot, "caller-no-api")
        assert t["slots"]["emotion_error"].startswith("[analysis_unavailable] the analysis API is unreachable")
        assert t["slots"]["emotion"] is None and t["paused"] is False
    bot["door"].shut()  # the action server is now unreachable for Rasa, as if it were down
    try:
        replies = say(bot, "caller-nothing-up", "I want a refund", {"base64": b64(wav_bytes(1.0))}, channel="emotion_rest_down")
        assert [r.get("text") for r in replies] == ["I can help with a refund. What is your order number?"]
    finally:
        bot["door"].open()


def test_a_new_session_forgets_the_last_calls_cooldown(bot):
    """The example bot carries slots over to new sessions; yesterday's escalation must not
    hold today's angry caller in its cooldown."""
    say(bot, "caller-twice", "I want a refund", {"base64": b64(wav_bytes(1.0))})
    assert tracker(bot, "caller-twice")["paused"] is True
    # The agent hands the caller back; the caller calls again the next day.
    httpx.post(f"{bot['url']}/conversations/caller-twice/tracker/events", json={"event": "resume"}, timeout=60).raise_for_status()
    # What Rasa runs when a session expires (session_expiration_time) and the caller speaks again.
    httpx.post(f"{bot['url']}/conversations/caller-twice/execute", json={"name": "action_session_start"}, timeout=60).raise_for_status()
    t = httpx.get(f"{bot['url']}/conversations/caller-twice/tracker", params={"include_events": "ALL"}, timeout=10).json()
    assert [e["event"] for e in t["events"]].count("session_started") == 2, [(e["event"], e.get("name"), e.get("text")) for e in t["events"]][-12:]
    assert t["slots"]["emotion_history"][-1]["escalated"] == "angry_caller"  # carried over by the bot
    replies = say(bot, "caller-twice", "I want a refund", {"base64": b64(wav_bytes(1.0))})
    assert any("custom" in r for r in replies), replies
    t = tracker(bot, "caller-twice")
    assert t["slots"]["emotion_history"] == [{"emotion": "angry", "confidence": 0.9, "escalated": "angry_caller"}]


def test_replies_follow_the_callers_emotion(bot):
    replies = say(bot, "caller-happy", "hello", emotion=result("happy", 0.8))
    assert [r.get("text") for r in replies] == ["Glad to hear it! This is Acme support. How can I help?"]
    replies = say(bot, "caller-happy", "I want to complain", emotion=result("happy", 0.8))
    assert [r.get("text") for r in replies] == ["I'm sorry to hear that. Let me look into it."]  # happy: the plain one
    assert [r.get("text") for r in say(bot, "caller-typed-hello", "hello")] == ["Hello, this is Acme support. How can I help?"]


def test_a_channel_for_callers_takes_inline_audio_only(bot, http_server):
    """With inline_audio_only, a url or path reference from a caller is refused before the
    action server would fetch it under the channel's token; inline audio is analysed."""
    http_server.routes["/turn.wav"] = (200, {}, wav_bytes(1.0))
    for audio in ({"url": http_server.url + "/turn.wav"}, {"path": "turn.wav"}):
        replies = say(bot, "caller-refs", "I want a refund", audio, channel="emotion_rest_inline")
        assert [r.get("text") for r in replies] == ["I can help with a refund. What is your order number?"]
        t = tracker(bot, "caller-refs")
        assert t["slots"]["emotion_error"] == "[refused] this channel takes the audio inline (metadata.audio.base64) only"
    assert http_server.requests == []
    replies = say(bot, "caller-inline", "I want a refund", {"base64": b64(wav_bytes(1.0))}, channel="emotion_rest_inline")
    assert any("custom" in r for r in replies) and tracker(bot, "caller-inline")["paused"] is True
