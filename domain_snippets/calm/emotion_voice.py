"""Rasa Pro's voice-stream channels, with each caller turn tagged by its emotion.

Rasa Pro's voice channels (Twilio Media Streams, AudioCodes, Jambonz, Genesys, browser
audio...) stream the caller's audio to the speech recogniser and send Rasa the transcript
with the call parameters: the audio never reaches a message. These subclasses keep the
caller's audio of the current turn in memory; when the recogniser ends the turn (its final
transcript), they send that audio to the action server's analysis API and put the result
in the message's ``metadata.emotion``, where ``EmotionCommandGenerator`` and
``action_analyze_emotion`` read it. The audio itself never enters the message or the
tracker. If the API is down or slow, the turn goes on with ``metadata.emotion =
{"error": {...}}`` after at most ``timeout_s``.

Each class keeps its channel's name, so its webhook paths stay the same. Copy this file and
``emotion_channel.py`` next to ``config.yml`` and, in ``credentials.yml``, replace the
channel's name by ours, adding an ``emotion`` block::

    emotion_voice.TwilioMediaStreams:      # was: twilio_media_streams
      server_url: "bot.example.com"
      asr: {name: deepgram}
      tts: {name: azure}
      emotion:
        analyze_url: "http://localhost:5055/v1/analyze"
        token: "..."         # optional: EMOTION_API_TOKEN of the action server
        timeout_s: 2         # optional; the turn waits at most this long
        max_turn_s: 30       # optional; longer turns keep their last 30 s
"""

from __future__ import annotations

import base64
import importlib
import logging
from contextvars import ContextVar
from typing import Any

from emotion_channel import EmotionAnalyzer
from rasa.core.channels.voice_stream.asr.asr_event import NewTranscript
from rasa.core.channels.voice_stream.audio_bytes import AudioEncoding, AudioFormat, RasaAudioBytes
from rasa.core.channels.voice_stream.call_state import call_state
from rasa.core.channels.voice_stream.voice_channel import NewAudioAction

# Our class name -> Rasa Pro's channel; built on first use, so a channel whose optional
# dependency is missing (Twilio's needs `twilio`) costs nothing until it is configured.
CHANNELS = {
    "TwilioMediaStreams": ("twilio_media_streams", "TwilioMediaStreamsInputChannel"),
    "Audiocodes": ("audiocodes", "AudiocodesVoiceInputChannel"),
    "Jambonz": ("jambonz", "JambonzStreamInputChannel"),
    "Genesys": ("genesys", "GenesysInputChannel"),
    "BrowserAudio": ("browser_audio", "BrowserAudioInputChannel"),
    "SignalWire": ("signalwire", "SignalWireInputChannel"),
    "Vonage": ("vonage", "VonageInputChannel"),
    "JsonAudio": ("json_audio", "JsonAudioInputChannel"),
}
logger = logging.getLogger(__name__)
_BUFFER = "emotion_turn_audio"
# The result for the turn being handed to Rasa; a context variable because one channel
# object serves every call, and each call runs in its own task.
_turn_emotion: ContextVar[dict[str, Any] | None] = ContextVar("emotion_turn_result", default=None)


class TurnAudio:
    """The caller's audio since the last final transcript: its last ``max_seconds``."""

    def __init__(self, max_seconds: float) -> None:
        self.max_seconds = max_seconds
        self.data = bytearray()
        self.format: AudioFormat | None = None

    def add(self, chunk: RasaAudioBytes) -> None:
        if chunk.format != self.format:
            self.data.clear()
            self.format = chunk.format
        self.data += chunk.data
        excess = len(self.data) - int(self.max_seconds * chunk.format.bytes_per_second)
        if excess > 0:
            width = max(1, chunk.format.bit_depth // 8)
            del self.data[:excess + -excess % width]  # whole samples only

    def take(self) -> dict[str, Any] | None:
        """The turn's audio as an analysis API reference, and an empty buffer."""
        if not self.data or self.format is None:
            return None
        encoding = "mulaw" if self.format.encoding == AudioEncoding.MULAW else "pcm_s16le"
        ref = {"base64": base64.b64encode(bytes(self.data)).decode(), "encoding": encoding,
               "sample_rate": self.format.sample_rate}
        self.data.clear()
        return ref


class EmotionVoiceMixin:
    """Goes before a Rasa Pro ``VoiceInputChannel`` in the bases."""

    analyzer: EmotionAnalyzer
    max_turn_s: float

    @classmethod
    def from_credentials(cls, credentials: dict[str, Any] | None) -> Any:
        credentials = dict(credentials or {})
        settings = credentials.pop("emotion", None) or {}
        analyzer = EmotionAnalyzer.from_credentials(settings, f"emotion_voice.{cls.__name__}: emotion")
        max_turn_s = float(settings.get("max_turn_s", 30.0))
        if not max_turn_s > 0:
            raise ValueError(f"emotion_voice.{cls.__name__}: emotion.max_turn_s must be above 0, got {max_turn_s}")
        channel = super().from_credentials(credentials)
        channel.analyzer, channel.max_turn_s = analyzer, max_turn_s
        return channel

    def conversation_blueprint(self, agent: Any) -> Any:
        return self.analyzer.close_with(super().conversation_blueprint(agent))

    def _turn_audio(self) -> TurnAudio:
        # Rasa Pro keeps per-call state in call_state, one per call's task.
        buffer = call_state.channel_data.get(_BUFFER)
        if buffer is None:
            buffer = call_state.channel_data[_BUFFER] = TurnAudio(self.max_turn_s)
        return buffer

    async def map_input_message(self, message: Any, ws: Any) -> Any:
        action = await super().map_input_message(message, ws)
        if isinstance(action, NewAudioAction):
            self._turn_audio().add(action.audio_bytes)
        return action

    async def handle_asr_event(self, asr_event: Any, input_queue: Any, call_parameters: Any) -> None:
        if not (isinstance(asr_event, NewTranscript) and asr_event.text):
            return await super().handle_asr_event(asr_event, input_queue, call_parameters)
        audio = self._turn_audio().take()
        token = _turn_emotion.set(await self.analyzer.analyze(audio) if audio else None)
        try:
            await super().handle_asr_event(asr_event, input_queue, call_parameters)
        finally:
            _turn_emotion.reset(token)

    def build_turn_metadata(self, call_parameters: Any) -> dict[str, Any]:
        metadata = super().build_turn_metadata(call_parameters)
        # Rasa Pro 3.21 puts only the call parameters here, and none is named emotion; should
        # a later one pass something the caller's side sent, it is still not a result of ours.
        if metadata.pop("emotion", None) is not None:
            logger.warning("emotion_voice: dropped a metadata.emotion the channel did not obtain from the analysis API")
        emotion = _turn_emotion.get()
        if emotion is not None:
            metadata["emotion"] = emotion
        return metadata


def __getattr__(name: str) -> type:
    if name not in CHANNELS:
        raise AttributeError(f"module emotion_voice has no channel {name!r}; it has {', '.join(CHANNELS)}")
    module, base = CHANNELS[name]
    channel = getattr(importlib.import_module(f"rasa.core.channels.voice_stream.{module}"), base)
    cls = type(name, (EmotionVoiceMixin, channel), {"__module__": __name__})
    globals()[name] = cls
    return cls
