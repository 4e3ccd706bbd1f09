"""The Rasa glue: two actions and the action-server plugin (analysis API, readiness, metrics).

Importing this module from a bot's own ``actions`` package is all it takes: rasa-sdk
registers every imported ``Action`` subclass, and the plugin below attaches to the
Sanic app that ``rasa run actions`` builds in each worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pluggy
from rasa_sdk import Action, Tracker
from rasa_sdk.events import ConversationPaused, SlotSet
from rasa_sdk.executor import CollectingDispatcher
from rasa_sdk.plugin import plugin_manager
from sanic import response
from sanic.exceptions import SanicException

from emotion import api, engine_process, metrics
from emotion.alerts import AlertSender
from emotion.config import LABELS, EngineConfig, ServerConfig
from emotion.engine import EmotionEngine
from emotion.engine_process import ENGINE_SOCKET_ENV, EngineClient
from emotion.errors import ConfigError, EmotionError
from emotion.rules import EscalationRule, Turn, evaluate_rules, load_rules
from emotion.sources import parse_audio_ref
from emotion.windows import EmotionResult, result_from_metadata

log = logging.getLogger(__name__)

ANALYZE_ACTION = "action_analyze_emotion"
# Rasa Pro's voice channels speak every bot message, custom payloads included.
VOICE_CHANNELS = frozenset({"audiocodes", "audiocodes_stream", "browser_audio", "chirp", "genesys", "jambonz", "jambonz_stream",
                            "json_audio", "signalwire", "twilio_media_streams", "twilio_voice", "vonage", "websockets_voice"})
REVIEW_PAGE = Path(__file__).with_name("ui") / "review.html"
HANDOFF_ACTION = "action_handoff_to_human"
ENGINE_PROCESS = "EmotionEngine"  # Sanic names it Sanic-EmotionEngine-0
_hookimpl = pluggy.HookimplMarker("rasa_sdk")


class EmotionPlugin:
    """Owns this process's engine, rules and settings, read from the environment once.

    One per process: rasa-sdk pickles action instances into every Sanic worker, so the
    model must not live on them; the actions reach it through ``PLUGIN``.
    """

    def __init__(self) -> None:
        self._engine: EmotionEngine | None = None
        self.config: ServerConfig | None = None
        self.rules: list[EscalationRule] = []
        self.alerts: AlertSender | None = None

    @property
    def engine(self) -> EmotionEngine:
        if self._engine is None:
            engine_config, config = EngineConfig.from_env(), ServerConfig.from_env()
            self.rules = load_rules(config.rules_path, history_turns=config.history_turns, labels=engine_config.labels or LABELS)
            self.config = config
            if config.alert_url:
                self.alerts = AlertSender(config.alert_url, timeout_s=config.alert_timeout_s, retries=config.alert_retries,
                                          on_outcome=lambda outcome: metrics.ALERTS.labels(outcome).inc())
            path = os.environ.get(ENGINE_SOCKET_ENV)
            if path:  # a Sanic worker, with the model in the engine process
                self._engine = EngineClient(engine_config, path)
            else:
                self._engine = EmotionEngine(engine_config)
                self._engine.on_batch = metrics.record_batch
            self._engine.freeze_heap = True  # this process is the server's own
        return self._engine

    @_hookimpl
    def attach_sanic_app_extensions(self, app) -> None:
        try:
            app.register_listener(self._start_engine_process, "main_process_ready")
        except SanicException:  # Sanic before 22.9 (rasa-sdk 3.6): no worker manager, a model per worker
            pass
        else:
            app.register_listener(self._after_engine_process, "main_process_stop")
        app.register_listener(self._before_start, "before_server_start")
        app.register_listener(self._after_stop, "after_server_stop")
        app.add_route(self._ready, "/ready", methods=["GET"], name="emotion_ready")
        app.add_route(self._metrics, "/metrics", methods=["GET"], name="emotion_metrics")
        app.add_route(self._review_page, "/ui", methods=["GET"], name="emotion_ui")
        api.add_routes(app, self.settings)

    def settings(self) -> tuple[EmotionEngine, ServerConfig]:
        engine = self.engine  # reads the settings on first use
        return engine, self.config

    def _start_engine_process(self, app) -> None:
        """In the main process, before the workers start: with several workers (or
        EMOTION_ENGINE_PROCESS=on) the model gets a process of its own that they all share."""
        wanted = ServerConfig.from_env().engine_process
        if wanted == "off" or (wanted == "auto" and app.state.workers <= 1):
            return
        path = os.path.join(tempfile.mkdtemp(prefix="emotion-"), "engine.sock")  # 0700: see engine_process
        os.environ[ENGINE_SOCKET_ENV] = path  # the workers, spawned next, inherit it
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # /metrics sums over all processes
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(os.path.dirname(path), "metrics")
            os.mkdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        app.manager.manage(ENGINE_PROCESS, engine_process.serve, {"path": path}, restartable=True)
        log.info("emotion model runs in its own process, shared by %d Sanic worker(s)", app.state.workers)

    @staticmethod
    def _after_engine_process(_app) -> None:
        path = os.environ.pop(ENGINE_SOCKET_ENV, None)
        if path:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    async def _before_start(self, app, _loop) -> None:
        try:
            engine = self.engine
        except ConfigError as exc:
            # Settings and rules are the operator's: refuse to start rather than run with a guess.
            log.critical("invalid emotion configuration: %s", exc.message)
            raise RuntimeError(f"invalid emotion configuration: {exc.message}") from None
        # rasa-sdk builds its tracer provider from endpoints.yml in an earlier listener.
        provider = getattr(app.ctx, "tracer_provider", None)
        if provider is not None:
            engine.tracer = provider.get_tracer("emotion")
        if isinstance(engine, EngineClient) and _restarts_engine_process(app):
            engine.on_lost = lambda: app.add_task(_restart_engine_process(app))
        if self.config.fail_fast:
            try:
                await engine.start()
            except EmotionError as exc:
                log.critical("emotion model failed to load, stopping (EMOTION_FAIL_FAST): %s", exc.message)
                raise RuntimeError(f"EMOTION_FAIL_FAST: {exc.message}") from None
        else:
            app.add_task(engine.start_or_log(), name="emotion_load")

    async def _after_stop(self, app, _loop) -> None:
        if self._engine is not None:
            await self._engine.close()
        if self.alerts is not None:
            await self.alerts.close()

    async def _ready(self, _request):
        status = await self.engine.current_status()
        return response.json(status, status=200 if status["ready"] else 503)

    async def _review_page(self, _request):
        self.settings()
        rules = [{"name": r.name, "emotions": sorted(r.emotions), "min_confidence": r.min_confidence} for r in self.rules]
        page = REVIEW_PAGE.read_text(encoding="utf-8")
        return response.html(page.replace("__RULES__", json.dumps(rules).replace("</", "<\\/")))

    async def _metrics(self, _request):
        if not self.settings()[1].metrics:
            return response.json({"error": "metrics are off (EMOTION_METRICS=false)"}, status=404)
        return response.raw(metrics.page(await self.engine.current_status()), content_type=metrics.CONTENT_TYPE_LATEST)


async def _restart_engine_process(app) -> None:
    name = next(name for name in app.m.workers if ENGINE_PROCESS in name)
    for _ in range(100):  # Sanic restarts only what its manager has seen end
        if app.m.workers[name].get("state") in ("FAILED", "COMPLETED"):
            app.m.restart(name=name)
            return
        await asyncio.sleep(0.1)
    log.error("emotion: the engine process %s did not end; not restarting it", name)


def _restarts_engine_process(app) -> bool:
    """One worker, the first, asks Sanic to restart a lost engine process: one restart
    and one model load, however many workers notice."""
    servers = sorted(name for name, state in app.m.workers.items() if state.get("server"))
    return bool(servers) and app.m.name == servers[0]


PLUGIN = EmotionPlugin()


class ActionAnalyzeEmotion(Action):
    """Tags the latest user turn with an emotion: from ``metadata.emotion`` when the
    gateway or ``EmotionRestInput`` analysed it already, else from ``metadata.audio``.

    Runs as the custom mapping action of the emotion slots, so Rasa calls it after every
    user message; it returns only SlotSet events, which is all Rasa keeps there.
    """

    def name(self) -> str:
        return ANALYZE_ACTION

    async def run(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: dict[str, Any]) -> list[dict[str, Any]]:
        message = tracker.latest_message or {}
        metadata = message.get("metadata") or {}
        if "emotion" not in metadata and "audio" not in metadata:
            metrics.TURNS.labels("no_audio").inc()
            return []
        try:
            engine = PLUGIN.engine
            if "emotion" in metadata:
                result = result_from_metadata(metadata["emotion"], engine.labels)
            else:
                result = await engine.analyze_ref(parse_audio_ref(metadata["audio"]))
        except EmotionError as exc:
            return _failed(tracker, exc.code, exc.message)
        except Exception:  # a bug must cost this turn its tag, never the conversation
            log.exception("conversation=%s emotion analysis crashed", tracker.sender_id)
            return _failed(tracker, "internal", "internal error while analysing the audio")
        return _tagged(tracker, message, result)


def _tagged(tracker: Tracker, message: dict, result: EmotionResult) -> list[dict[str, Any]]:
    config = PLUGIN.config
    history = [t for t in map(Turn.from_dict, session_history(tracker)) if t]
    history.append(Turn(result.emotion, result.confidence))
    intent = (message.get("intent") or {}).get("name")
    decision = evaluate_rules(history, PLUGIN.rules, message.get("text"), intent=intent, channel=tracker.get_latest_input_channel())
    if decision.fired:
        # Alerts count for cooldowns too, so a supervisor is not paged on every turn.
        history[-1] = Turn(result.emotion, result.confidence, decision.rule)
        metrics.ESCALATIONS.labels(decision.rule).inc()
        if PLUGIN.alerts is not None:
            PLUGIN.alerts.send({
                "rule": decision.rule, "action": decision.action,
                **handoff_context(tracker, decision.reason, result.emotion, round(result.confidence, 4),
                                  [t.as_dict() for t in history[-config.history_turns :]]),
            })
    metrics.TURNS.labels("tagged").inc()
    metrics.record_timings(result.timings_ms)
    log.info(
        "conversation=%s emotion=%s confidence=%.3f duration_s=%.2f escalate=%s timings_ms=%s%s",
        tracker.sender_id, result.emotion, result.confidence, result.duration_s, decision.rule,
        {k: round(v, 1) for k, v in result.timings_ms.items()},
        f" text={message.get('text')!r}" if config.log_text else "",
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
    events = tracker.events or []
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
    user_texts = [e.get("text") for e in tracker.events if e.get("event") == "user" and e.get("text")]
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
    metrics.TURNS.labels("error").inc()
    metrics.ERRORS.labels(code).inc()
    log.warning("conversation=%s emotion error [%s]: %s", tracker.sender_id, code, message)
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
        log.info("conversation=%s handed off: %s", tracker.sender_id, context["reason"])
        return [*events, ConversationPaused()]


def _register() -> None:
    manager = plugin_manager()
    if not manager.has_plugin("emotion"):
        manager.register(PLUGIN, name="emotion")


_register()
