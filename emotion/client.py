"""``python -m emotion send-turn``: what a voice gateway does, in a few lines.

Posts the turn's transcript to Rasa's REST channel with the audio in ``metadata.audio``,
prints the bot's replies, then the emotion slots from Rasa's tracker API.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import httpx

from emotion.audio import decode_audio, encode_audio
from emotion.errors import FetchFailed

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
    body = {"sender": args.sender, "message": args.text, "metadata": {"audio": build_audio(args)}}
    with httpx.Client(base_url=args.rasa.rstrip("/"), timeout=60) as client:
        replies = client.post("/webhooks/rest/webhook", json=body)
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
