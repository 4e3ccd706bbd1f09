"""The Rasa actions: tag each user turn with an emotion, and hand an upset caller to a human.

Importing this module from a bot's own ``actions`` package is all it takes: rasa-sdk
registers every imported ``Action`` subclass, and importing it registers the plugin.
"""

from __future__ import annotations

import logging
from typing import Any

from rasa_sdk import Action, Tracker
from rasa_sdk.events import ConversationPaused, SlotSet
from rasa_sdk.executor import CollectingDispatcher

from emotion.engine.fetch import parse_audio_ref
from emotion.engine.results import EmotionResult, result_from_metadata
from emotion.errors import EmotionError, loggable
from emotion.rules import Turn, take_turn
from emotion.serving import metrics
from emotion.serving.plugin import PLUGIN

log = logging.getLogger(__name__)

ANALYZE_ACTION = "action_analyze_emotion"
HANDOFF_ACTION = "action_handoff_to_human"
# Rasa Pro's voice channels speak every bot message, custom payloads included.
VOICE_CHANNELS = frozenset({"audiocodes", "audiocodes_stream", "browser_audio", "chirp", "genesys", "jambonz", "jambonz_stream",
                            "json_audio", "signalwire", "twilio_media_streams", "twilio_voice", "vonage", "websockets_voice"})


class ActionAnalyzeEmotion(Action):
    """Tags the latest user turn with an emotion: from ``metadata.emotion`` when the
    gateway or ``EmotionRestInput`` analysed it already (with ``EMOTION_RESULT_KEY``, only
    a result the analysis API signed), else from ``metadata.audio``.

    Runs as the custom mapping action of the emotion slots, so Rasa calls it after every
    user message; it returns only SlotSet events, which is all Rasa keeps there.
    """

    def name(self) -> str:
        return ANALYZE_ACTION

    async def run(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: dict[str, Any]) -> list[dict[str, Any]]:
        message = tracker.latest_message or {}
        metadata = message.get("metadata") or {}
        if "emotion" not in metadata and "audio" not in metadata:
            metrics.record_turn("webhook", outcome="no_audio")
            return []
        try:
            engine = PLUGIN.engine
            if "emotion" in metadata:
                config = PLUGIN.config
                result = result_from_metadata(metadata["emotion"], engine.labels, key=config.result_key,
                                              max_age_s=config.result_max_age_s)
            else:
                result = await engine.analyze_ref(parse_audio_ref(metadata["audio"]))
            return _tagged(tracker, message, result)
        except EmotionError as exc:
            return _failed(tracker, exc.code, exc.message)
        except Exception:  # a bug must cost this turn its tag, never the conversation
            log.exception("conversation=%s emotion analysis crashed", loggable(tracker.sender_id))
            return _failed(tracker, "internal", "internal error while analysing the audio")


def _tagged(tracker: Tracker, message: dict, result: EmotionResult) -> list[dict[str, Any]]:
    config = PLUGIN.config
    history = [t for t in map(Turn.from_dict, session_history(tracker)) if t]
    intent = (message.get("intent") or {}).get("name")
    decision, history = take_turn(history, Turn(result.emotion, result.confidence), PLUGIN.rules, message.get("text"),
                                  intent=intent, channel=tracker.get_latest_input_channel())
    if decision.fired:
        metrics.ESCALATIONS.labels(decision.rule).inc()
        if PLUGIN.alerts is not None:
            PLUGIN.alerts.send({
                "rule": decision.rule, "action": decision.action,
                **handoff_context(tracker, decision.reason, result.emotion, round(result.confidence, 4),
                                  [t.as_dict() for t in history[-config.history_turns :]]),
            })
    metrics.record_turn("webhook", timings_ms=result.timings_ms)
    log.info(
        "conversation=%s emotion=%s confidence=%.3f duration_s=%.2f escalate=%s timings_ms=%s%s",
        loggable(tracker.sender_id), result.emotion, result.confidence, result.duration_s, decision.rule,
        {k: round(v, 1) for k, v in result.timings_ms.items()},
        f" text={loggable(message.get('text'))}" if config.log_text else "",
    )
    return [
        SlotSet("emotion", result.emotion),
        SlotSet("emotion_confidence", round(result.confidence, 4)),
        SlotSet("emotion_scores", {k: round(v, 4) for k, v in result.scores.items()}),
        SlotSet("emotion_history", [t.as_dict() for t in history[-config.history_turns :]]),
        SlotSet("emotion_error", None),
        SlotSet("escalate", decision.escalate),
        SlotSet("escalation_reason", decision.reason),
    ]


def session_history(tracker: Tracker) -> list:
    """``emotion_history`` as this session wrote it. Slots a bot carries over into a new
    session are set again right after ``session_started``, before the caller speaks; those
    belong to an earlier call, so this session's history starts empty."""
    events = [e for e in tracker.events or [] if isinstance(e, dict)]
    starts = [i for i, e in enumerate(events) if e.get("event") == "session_started"]
    if not starts:  # no session events sent: trust the slot
        return tracker.get_slot("emotion_history") or []
    history: list = []
    spoken = False
    for e in events[starts[-1]:]:
        spoken = spoken or e.get("event") == "user"
        if spoken and e.get("event") == "slot" and e.get("name") == "emotion_history":
            history = e.get("value") or []
    return history


def handoff_context(tracker: Tracker, reason, emotion, confidence, history) -> dict[str, Any]:
    """What a human agent (or a supervisor's alert) needs to pick up the call."""
    user_texts = [e.get("text") for e in tracker.events or [] if isinstance(e, dict) and e.get("event") == "user" and e.get("text")]
    return {
        "conversation_id": tracker.sender_id,
        "reason": reason,
        "emotion": emotion,
        "confidence": confidence,
        "emotion_history": history,
        "last_user_text": user_texts[-1] if user_texts else None,
        "recent_user_texts": user_texts[-5:],
    }


def _failed(tracker: Tracker, code: str, message: str) -> list[dict[str, Any]]:
    metrics.record_turn("webhook", error_code=code)
    # The code and message may be a gateway's (metadata.emotion.error): escaped, one line.
    log.warning("conversation=%s emotion error [%s]: %s", loggable(tracker.sender_id), loggable(code), loggable(message))
    # A turn that was not analysed clears the tag and never escalates.
    return [
        SlotSet("emotion", None),
        SlotSet("emotion_confidence", None),
        SlotSet("emotion_scores", None),
        SlotSet("emotion_error", f"[{code}] {message}"),
        SlotSet("escalate", False),
        SlotSet("escalation_reason", None),
    ]


class ActionHandoffToHuman(Action):
    """Hands the caller to a human: a transfer payload for the channel, the handoff
    message, a paused conversation, and ``escalate`` reset."""

    def name(self) -> str:
        return HANDOFF_ACTION

    async def run(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: dict[str, Any]) -> list[dict[str, Any]]:
        # Rasa Pro's pattern_human_handoff runs this for an upset caller and for one who
        # asked for a human alike; only the first has an escalation reason.
        reason = tracker.get_slot("escalation_reason") if tracker.get_slot("escalate") else None
        context = handoff_context(tracker, reason or "the caller asked for a human agent", tracker.get_slot("emotion"),
                                  tracker.get_slot("emotion_confidence"), tracker.get_slot("emotion_history") or [])
        events = [SlotSet("escalate", False), SlotSet("handoff_context", context)]
        if tracker.get_latest_input_channel() not in VOICE_CHANNELS:
            dispatcher.utter_message(json_message={"handoff": context})
        # On voice channels a custom payload would be read out to the caller: the context
        # stays in the handoff_context slot, where the transfer (a contact-centre
        # platform reading the tracker, or the channel's own transfer) picks it up.
        dispatcher.utter_message(response="utter_handoff")
        log.info("conversation=%s handed off: %s", loggable(tracker.sender_id), context["reason"])
        return [*events, ConversationPaused()]
