"""``python -m emotion send-turn``: what a voice gateway does, in a few lines.

By default (``--via api``) it has the action server's analysis API tag the audio, then
posts the transcript to Rasa's REST channel with the result as ``metadata.emotion``, so
Rasa never holds the audio. ``--via channel`` posts the audio to the EmotionRestInput
channel, which does the same inside Rasa; ``--via metadata`` sends the audio itself in
``metadata.audio``. Then it prints the bot's replies and the emotion slots.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import httpx

from emotion.engine.audio import decode_audio, encode_audio
from emotion.errors import FetchFailed

# The utterance result, as EmotionRestInput forwards it (with the API's signature, when it signs).
RESULT_KEYS = ("emotion", "confidence", "scores", "duration_s", "model", "signature")
SLOTS = ("emotion", "emotion_confidence", "escalate", "escalation_reason", "emotion_error")


def build_audio(args: argparse.Namespace) -> dict:
    if args.url:
        return {"url": args.audio}
    try:
        data = Path(args.audio).read_bytes()
    except OSError as exc:
        raise FetchFailed(f"cannot read {args.audio}: {exc.strerror}") from None
    if args.mulaw:
        import soxr

        wave = soxr.resample(decode_audio(data, min_seconds=0.0), 16000, 8000)
        ulaw = encode_audio(wave, 8000, "RAW", "ULAW")
        return {"base64": base64.b64encode(ulaw).decode(), "encoding": "mulaw", "sample_rate": 8000}
    return {"base64": base64.b64encode(data).decode()}


def send_turn(args: argparse.Namespace) -> int:
    try:
        return _send_turn(args)
    except httpx.TransportError as exc:  # nothing listening there, or no answer in time
        raise FetchFailed(f"cannot reach {exc.request.url}: {type(exc).__name__}: {exc}") from None
    except httpx.HTTPStatusError as exc:
        raise FetchFailed(f"{exc.request.url} answered HTTP {exc.response.status_code}") from None


def _send_turn(args: argparse.Namespace) -> int:
    audio, channel = build_audio(args), "rest"
    if args.via == "api":
        headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
        reply = httpx.post(args.api, json={"audio": audio}, headers=headers, timeout=60)
        try:
            result = reply.json()
        except ValueError:  # another server at that address, or a proxy's error page
            result = None
        if not isinstance(result, dict):
            raise FetchFailed(f"the analysis API answered HTTP {reply.status_code}, not JSON")
        if reply.status_code != 200:
            print(f"analysis API: HTTP {reply.status_code} {json.dumps(result.get('error'), ensure_ascii=False)}")
        metadata = {"emotion": {k: result[k] for k in RESULT_KEYS if k in result} if reply.status_code == 200 else result}
    else:
        metadata = {"audio": audio}
        channel = "emotion_rest" if args.via == "channel" else "rest"
    body = {"sender": args.sender, "message": args.text, "metadata": metadata}
    with httpx.Client(base_url=args.rasa.rstrip("/"), timeout=60) as client:
        replies = client.post(f"/webhooks/{channel}/webhook", json=body)
        replies.raise_for_status()
        for reply in replies.json():
            if "text" in reply:
                print(f"bot: {reply['text']}")
            if "custom" in reply:
                print(f"bot (custom): {json.dumps(reply['custom'], ensure_ascii=False)}")
        tracker = client.get(f"/conversations/{args.sender}/tracker")
        tracker.raise_for_status()
        state = tracker.json()
        slots = state.get("slots", {})
        print("slots: " + json.dumps({k: slots.get(k) for k in SLOTS}, ensure_ascii=False))
        if state.get("paused"):
            print("conversation paused: handed off to a human")
    return 0
