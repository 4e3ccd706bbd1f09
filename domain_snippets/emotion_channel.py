"""A Rasa input channel that analyses the caller's audio on the way in.

It is Rasa's REST channel (same request and response bodies, custom payloads included),
served at ``/webhooks/emotion_rest/webhook``. When a message carries ``metadata.audio``,
the channel sends it to the action server's analysis API (``POST /v1/analyze``) and
replaces it with ``metadata.emotion`` before the message enters Rasa, so the tracker (and
the tracker store, and every request Rasa sends to the action server) never holds the
audio. If the API is down or slow, the message goes on with
``metadata.emotion = {"error": {...}}`` and the bot answers as usual. A ``metadata.emotion``
the client sent is dropped, always: only the channel's own analysis goes on to Rasa.

Runs inside the Rasa server and needs only Rasa (and the aiohttp that Rasa ships). Copy
this file next to your bot's ``config.yml`` and add to ``credentials.yml``::

    emotion_channel.EmotionRestInput:
      analyze_url: "http://localhost:5055/v1/analyze"
      token: "..."        # optional: EMOTION_API_TOKEN of the action server
      timeout_s: 3        # optional
      inline_audio_only: true   # optional: refuse url/path references from callers
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from rasa.core.channels.channel import UserMessage
from rasa.core.channels.rest import RestInput
from sanic import Blueprint
from sanic.request import Request

logger = logging.getLogger(__name__)

# What Rasa keeps of an analysis: the utterance result, never segments or embeddings, and
# the API's signature of it (EMOTION_RESULT_KEY), untouched.
RESULT_KEYS = ("emotion", "confidence", "scores", "duration_s", "model", "signature")


class EmotionAnalyzer:
    """A client of the action server's analysis API, configured from credentials."""

    def __init__(self, analyze_url: str, token: str | None = None, timeout_s: float = 3.0) -> None:
        self.analyze_url = analyze_url
        self.token = token
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_credentials(cls, credentials: dict[str, Any] | None, where: str) -> EmotionAnalyzer:
        credentials = credentials or {}
        if not credentials.get("analyze_url"):
            raise ValueError(f"{where} needs analyze_url (e.g. http://localhost:5055/v1/analyze)")
        return cls(credentials["analyze_url"], credentials.get("token"), float(credentials.get("timeout_s", 3.0)))

    async def analyze(self, audio: Any) -> dict[str, Any]:
        """The utterance result for an audio reference, or ``{"error": {code, message}}``."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            async with self._client().post(self.analyze_url, json={"audio": audio}, headers=headers) as response:
                try:
                    data = await response.json(content_type=None)
                except ValueError:
                    data = None
                if response.status == 200 and isinstance(data, dict):
                    return {k: data[k] for k in RESULT_KEYS if k in data}
                if isinstance(data, dict) and isinstance(data.get("error"), dict):
                    return {"error": data["error"]}
                return _error("analysis_unavailable", f"the analysis API answered HTTP {response.status}")
        except asyncio.TimeoutError:
            return _error("timeout", f"the analysis API did not answer within {self.timeout_s:g} s")
        except aiohttp.ClientError as exc:
            logger.warning("emotion analysis API unreachable at %s: %s", self.analyze_url, exc)
            return _error("analysis_unavailable", f"the analysis API is unreachable: {type(exc).__name__}")

    def _client(self) -> aiohttp.ClientSession:
        # One session, its connections kept alive: a connection per turn leaves each closed
        # one in TIME_WAIT for a minute, and a few hundred turns a second then use up the
        # host's ephemeral ports. No cap on connections: the action server answers overload
        # itself, at once, where a full pool here would only wait out the timeout. Idle ones
        # close after 4 s, before the action server would (5 s on rasa-sdk 3.6's Sanic), so
        # no turn goes out on a connection the server is just closing.
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._loop = loop
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                                  connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def close_with(self, blueprint: Blueprint) -> Blueprint:
        """Closes the session when the server that serves ``blueprint`` stops."""

        @blueprint.listener("after_server_stop")
        async def close_analyzer(*_: Any) -> None:
            await self.close()

        return blueprint


class EmotionRestInput(RestInput):
    @classmethod
    def name(cls) -> str:
        return "emotion_rest"

    @classmethod
    def from_credentials(cls, credentials: dict[str, Any] | None) -> EmotionRestInput:
        analyzer = EmotionAnalyzer.from_credentials(credentials, "emotion_channel.EmotionRestInput")
        return cls(analyzer, inline_audio_only=bool((credentials or {}).get("inline_audio_only", False)))

    def __init__(self, analyzer: EmotionAnalyzer, inline_audio_only: bool = False) -> None:
        self.analyzer = analyzer
        # A url or path reference is fetched by the action server, under this channel's token:
        # a channel open to callers should pass on only the audio they send.
        self.inline_audio_only = inline_audio_only

    def blueprint(self, on_new_message: Callable[[UserMessage], Awaitable[Any]]) -> Blueprint:
        blueprint = super().blueprint(on_new_message)

        @blueprint.middleware("request")
        async def analyze_audio(request: Request) -> None:
            if request.method != "POST" or not request.path.endswith("/webhook"):
                return
            try:
                body = request.json
            except Exception:  # the REST channel answers a bad body itself
                return
            metadata = body.get("metadata") if isinstance(body, dict) else None
            if not isinstance(metadata, dict) or not ("audio" in metadata or "emotion" in metadata):
                return
            if "emotion" in metadata:
                # A result is ours to put there; a caller's own would tag (and escalate) their
                # turn as they pleased. Its content is theirs too: not logged.
                logger.warning("emotion_rest: dropped the metadata.emotion the client sent (sender %r)",
                               str(body.get("sender"))[:64])
            forwarded = {k: v for k, v in metadata.items() if k not in ("audio", "emotion")}
            audio = metadata.get("audio")
            if self.inline_audio_only and isinstance(audio, dict) and any(audio.get(k) for k in ("url", "path")):
                forwarded["emotion"] = _error("refused", "this channel takes the audio inline (metadata.audio.base64) only")
            elif "audio" in metadata:
                forwarded["emotion"] = await self.analyzer.analyze(audio)
            # The REST channel reads the parsed body: from here on it holds no audio and no
            # result but the channel's own.
            request.parsed_json = {**body, "metadata": forwarded}

        return self.analyzer.close_with(blueprint)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}
