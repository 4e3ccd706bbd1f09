"""emotion_voice against Rasa Pro 3.21's own voice-stream code: its Twilio Media Streams
channel (loaded from credentials by Rasa Pro's own loader), its audio loop
(``_consume_audio_bytes``), its recogniser loop (``receive_asr_events``) and its input
events, fed 8 kHz mu-law media frames as Twilio sends them. The analysis runs on our real
action server (in the project's main environment) with a checkpoint whose head is set to
angry 0.9. Mocked, because it cannot run here: Rasa Pro's voice licence check, and the
recogniser's cloud service (a scripted ASREngine ends each turn after a set number of
bytes, as an endpointing recogniser would). Also EmotionRestInput under Rasa Pro, whose
agent a recording stub stands in for (test_assistant drives a trained one)."""

import asyncio
import base64
import contextlib
import json
import sys
from dataclasses import asdict
from urllib.parse import urlsplit

import aiohttp
import pytest
import rasa.core.processor  # noqa: F401  (imports Rasa Pro's modules in the order its server does)
import soxr
from conftest import ESTABLISHED, ROOT, encode, free_port, sockets_to, speech_like
from rasa.core.channels.channel import register
from rasa.core.channels.conversation_queue.queue import InMemoryConversationQueue
from rasa.core.channels.voice_ready.utils import CallParameters
from rasa.core.channels.voice_stream import voice_channel
from rasa.core.channels.voice_stream.asr.asr_engine import ASREngine, ASREngineConfig, ASRLanguageMapEntry
from rasa.core.channels.voice_stream.asr.asr_event import NewTranscript
from rasa.core.channels.voice_stream.call_state import CallState, _call_state
from rasa.core.run import _create_single_channel
from rasa.core.voice.event_composition.events.input_events import FinalTranscriptInputEvent
from rasa.engine.storage.resource import Resource
from rasa.shared.core.domain import Domain
from rasa.shared.nlu.training_data.message import Message
from sanic import Sanic

CALM = ROOT / "domain_snippets" / "calm"
sys.path.insert(0, str(CALM))
from emotion_calm import EmotionCommandGenerator, EmotionHandoffCommand  # noqa: E402
from test_calm import new_tracker  # noqa: E402

FRAME_BYTES = 160  # Twilio sends 20 ms of 8 kHz mu-law per media message


@pytest.fixture
def action_server(pro_action_server):
    return pro_action_server.wait()


@pytest.fixture
def analysis_api(action_server):
    return action_server.url + "/v1/analyze"


@pytest.fixture(autouse=True)
def no_licence_check(monkeypatch):
    monkeypatch.setattr(voice_channel, "validate_voice_license_scope", lambda: None)


def twilio_channel(analyze_url: str, **emotion):
    return _create_single_channel("emotion_voice.TwilioMediaStreams", {
        "server_url": "bot.example.com", "asr": {"name": "deepgram"}, "tts": {"name": "azure"},
        "emotion": {"analyze_url": analyze_url, **emotion}})


def mulaw_turn(seconds: float, seed: int) -> bytes:
    """A caller's turn as the call carries it: 8 kHz mu-law."""
    return encode(soxr.resample(speech_like(seconds, seed=seed), 16000, 8000), 8000, "RAW", "ULAW")


def twilio_frames(ulaw: bytes) -> list[str]:
    """That turn as Twilio's media messages."""
    return [json.dumps({"event": "media", "streamSid": "MZ1", "media": {"payload": base64.b64encode(ulaw[i:i + FRAME_BYTES]).decode()}})
            for i in range(0, len(ulaw), FRAME_BYTES)]


class Recogniser(ASREngine[ASREngineConfig]):
    """Ends a turn with a final transcript once it has heard that turn's bytes."""

    def __init__(self, turns: list[tuple[int, str]]) -> None:
        super().__init__("en", voice_channel.MULAW_8KHZ)
        self.turns, self.heard = list(turns), 0
        self.events: asyncio.Queue = asyncio.Queue()

    @classmethod
    def name(cls) -> str:
        return "scripted"

    @staticmethod
    def get_default_config(rasa_language: str) -> ASREngineConfig:
        return ASREngineConfig(language_map={rasa_language: ASRLanguageMapEntry()})

    async def send_audio_chunks(self, chunk) -> None:
        self.heard += len(chunk.data)
        if self.turns and self.heard >= self.turns[0][0]:
            self.heard = 0
            await self.events.put(NewTranscript(self.turns.pop(0)[1]))
            if not self.turns:
                await self.events.put(None)

    async def stream_asr_events(self):
        while (event := await self.events.get()) is not None:
            yield event


class TwilioSocket:
    """The call's websocket: each turn's media frames, then a wait until the recogniser's
    final reaches Rasa's input queue, as a caller waits for the bot."""

    def __init__(self, turns: list[list[str]], queue: "CountingQueue") -> None:
        self.turns, self.queue = turns, queue

    async def __aiter__(self):
        for number, frames in enumerate(self.turns, 1):
            for frame in frames:
                yield frame
            await self.queue.wait_for(number)
        yield json.dumps({"event": "stop"})


class CountingQueue(InMemoryConversationQueue):
    """Rasa Pro's input queue, keeping the final transcripts it was given."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.finals: list[FinalTranscriptInputEvent] = []

    async def put(self, event) -> None:
        await super().put(event)
        if isinstance(event, FinalTranscriptInputEvent):
            self.finals.append(event)

    async def wait_for(self, count: int) -> None:
        while len(self.finals) < count:
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def served(channel, agent=None):
    """``channel`` served as Rasa Pro serves it: registered by Rasa Pro's own ``register``
    on a Sanic server, whose stop runs the listeners a channel added."""
    port = free_port()
    app = Sanic(f"emotion_test_{port}")  # Sanic keeps every app by name for the process's life
    app.config.TOUCHUP = False  # Sanic rewrites its handler at a first start; a second app in one process fails
    app.ctx.agent = agent
    register([channel], app, "/webhooks/")
    server = await app.create_server(host="127.0.0.1", port=port, return_asyncio_server=True)
    await server.startup()
    await server.before_start()
    await server.after_start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.before_stop()
        server.close()
        await server.after_stop()


def run_call(channel, turns: list[tuple[float, str]]) -> list[FinalTranscriptInputEvent]:
    async def call_then_stop():
        try:
            return await call(channel, turns)
        finally:
            await channel.analyzer.close()  # what stopping Rasa's server does (tested below)

    return asyncio.run(call_then_stop())


async def call(channel, turns: list[tuple[float, str]]) -> list[FinalTranscriptInputEvent]:
    """One call through Rasa Pro's own audio and recogniser loops."""
    _call_state.set(CallState())
    audio = [mulaw_turn(seconds, seed) for seed, (seconds, _) in enumerate(turns)]
    recogniser = Recogniser([(len(ulaw), text) for ulaw, (_, text) in zip(audio, turns)])
    queue = CountingQueue("CA1", channel.name())
    call = CallParameters(call_id="CA1", user_phone="+15550100", stream_id="MZ1")
    socket = TwilioSocket([twilio_frames(ulaw) for ulaw in audio], queue)
    await asyncio.wait_for(asyncio.gather(
        channel._consume_audio_bytes(socket, recogniser, queue, call),
        channel.receive_asr_events(recogniser, None, socket, call, queue)), timeout=60)
    return queue.finals


def test_each_turn_is_cut_at_the_recognisers_final_and_tagged(analysis_api):
    channel = twilio_channel(analysis_api)
    assert channel.name() == "twilio_media_streams"  # the same webhook paths as Rasa Pro's channel
    finals = run_call(channel, [(1.5, "my bill is wrong"), (2.5, "I want a refund now")])
    assert [f.text for f in finals] == ["my bill is wrong", "I want a refund now"]
    for final, seconds in zip(finals, (1.5, 2.5)):
        emotion = final.metadata["emotion"]
        assert emotion["emotion"] == "angry" and emotion["confidence"] == pytest.approx(0.9, abs=1e-4)
        assert emotion["duration_s"] == pytest.approx(seconds, abs=0.01)  # this turn's audio, no more
        assert final.metadata["call_id"] == "CA1"  # Rasa Pro's call parameters are kept
        assert len(json.dumps(final.metadata)) < 1000  # a result, never the audio


def test_the_tagged_voice_turn_hands_off_on_that_turn(analysis_api):
    finals = run_call(twilio_channel(analysis_api), [(2.0, "this is the third time I call")])
    generator = EmotionCommandGenerator.create({"rules": str(CALM.parent / "emotion_rules.yml")}, None, Resource("emotion"), None)
    message = Message(data={"text": finals[0].text, "metadata": finals[0].metadata})
    commands = asyncio.run(generator.predict_commands(message, None, new_tracker(Domain.from_path(CALM / "domain.yml"))))
    assert commands == [EmotionHandoffCommand("angry_caller", "angry_caller: angry 0.90 >= 0.70")]


def test_long_turns_keep_their_last_seconds(analysis_api):
    finals = run_call(twilio_channel(analysis_api, max_turn_s=1), [(3.0, "let me explain everything")])
    assert finals[0].metadata["emotion"]["duration_s"] == pytest.approx(1.0, abs=0.01)


def test_a_call_keeps_one_connection_to_the_api_which_closes_when_rasa_stops(analysis_api):
    """A connection per turn would leave each closed one in TIME_WAIT for a minute: a few
    hundred turns a second would use up the ephemeral ports."""
    port = urlsplit(analysis_api).port

    async def serve_one_call():
        channel = twilio_channel(analysis_api)
        async with served(channel):
            finals = await call(channel, [(1.0, "hello"), (1.0, "my bill"), (1.0, "is wrong")])
            during = sockets_to(port)
        return finals, during, sockets_to(port)

    finals, during, after = asyncio.run(serve_one_call())
    assert [f.metadata["emotion"]["emotion"] for f in finals] == ["angry"] * 3
    assert during.count(ESTABLISHED) == 1, during  # three turns, one connection
    assert ESTABLISHED not in after, after


def test_calls_go_on_across_a_restart_of_the_action_server(action_server, analysis_api):
    """A deploy restarts the action server under live calls: the old server closes the
    connection the channel kept, and the next turn goes out on a new one."""
    channel = twilio_channel(analysis_api)

    async def call_restart_call():
        async with served(channel):
            before = await call(channel, [(1.0, "hello")])
            await asyncio.to_thread(action_server.restart)
            return before + await call(channel, [(1.0, "my bill"), (1.0, "is wrong")])

    finals = asyncio.run(call_restart_call())
    assert [f.metadata["emotion"].get("emotion") for f in finals] == ["angry"] * 3, [f.metadata for f in finals]


def test_the_rest_channel_tags_messages_in_rasa_pro_too(analysis_api):
    """EmotionRestInput served by Rasa Pro's own registration on its Sanic; the agent that
    handles the message stands in for a trained bot: this test is about what the channel hands it."""
    received = []

    class Agent:
        async def handle_message(self, message):
            received.append(message)
            await message.output_channel.send_text_message(message.sender_id, "How can I help?")

    async def serve_one_message():
        wav = encode(speech_like(1.5), 16000, "WAV", "PCM_16")
        body = {"sender": "c1", "message": "I want a refund",
                "metadata": {"audio": {"base64": base64.b64encode(wav).decode()}, "call_id": "CA9"}}
        channel = _create_single_channel("emotion_channel.EmotionRestInput", {"analyze_url": analysis_api})
        async with served(channel, Agent()) as url, aiohttp.ClientSession() as client:
            async with client.post(f"{url}/webhooks/emotion_rest/webhook", json=body) as r:
                return r.status, await r.json()

    assert asyncio.run(serve_one_message()) == (200, [{"recipient_id": "c1", "text": "How can I help?"}])
    [message] = received
    assert message.text == "I want a refund" and set(message.metadata) == {"call_id", "emotion"}
    assert message.metadata["emotion"]["emotion"] == "angry" and message.metadata["emotion"]["confidence"] == pytest.approx(0.9, abs=1e-4)
    assert len(json.dumps(message.metadata)) < 1000  # the result, not the audio


def test_with_the_api_down_the_turn_goes_on_with_the_reason(tmp_path):
    finals = run_call(twilio_channel(f"http://127.0.0.1:{free_port()}/v1/analyze", timeout_s=2), [(1.0, "hello")])
    assert finals[0].text == "hello"
    assert finals[0].metadata["emotion"]["error"]["code"] == "analysis_unavailable"


def test_configuration_errors_are_named_at_startup():
    with pytest.raises(ValueError, match="emotion_voice.TwilioMediaStreams: emotion needs analyze_url"):
        _create_single_channel("emotion_voice.TwilioMediaStreams", {
            "server_url": "bot.example.com", "asr": {"name": "deepgram"}, "tts": {"name": "azure"}})
    with pytest.raises(Exception, match="Failed to find input channel class"):
        _create_single_channel("emotion_voice.Skype", {"emotion": {"analyze_url": "http://127.0.0.1:1/v1/analyze"}})


def test_every_listed_channel_is_a_rasa_pro_voice_channel():
    import emotion_voice

    for name in emotion_voice.CHANNELS:
        cls = getattr(emotion_voice, name)
        assert issubclass(cls, voice_channel.VoiceInputChannel) and cls.name() == cls.__mro__[2].name()


def test_no_audio_no_tag(analysis_api):
    """A turn the recogniser ends with no caller audio buffered (a typed test turn) gets no emotion."""
    async def call():
        _call_state.set(CallState())
        queue = CountingQueue("CA2", "twilio_media_streams")
        await twilio_channel(analysis_api).handle_asr_event(NewTranscript("hi"), queue,
                                                             CallParameters(call_id="CA2", user_phone="+1"))
        return queue.finals

    finals = asyncio.run(call())
    assert "emotion" not in finals[0].metadata and finals[0].metadata == asdict(CallParameters(call_id="CA2", user_phone="+1"))

