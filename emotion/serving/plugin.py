"""The action-server plugin: owns the process's engine, rules and settings, and adds the
analysis API, readiness, metrics and the review page to the Sanic app that ``rasa run
actions`` builds in each worker (rasa-sdk's ``attach_sanic_app_extensions`` hook).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pluggy
from rasa_sdk.plugin import plugin_manager
from sanic import response
from sanic.exceptions import SanicException

from emotion.engine.backend import Backend, InProcessBackend
from emotion.engine.core import EmotionEngine
from emotion.engine.fetch import parse_audio_ref
from emotion.engine.results import SIGNED_FIELDS, sign_result
from emotion.errors import ConfigError, EmotionError
from emotion.rules import EscalationRule, load_rules, rule_as_dict
from emotion.serving import api, engine_process, http, metrics
from emotion.serving.alerts import AlertSender
from emotion.serving.engine_process import ENGINE_SOCKET_ENV, EngineProcessBackend
from emotion.settings import LABELS, Settings

log = logging.getLogger(__name__)

REVIEW_PAGE = Path(__file__).with_name("ui") / "review.html"
ENGINE_PROCESS = "EmotionEngine"  # Sanic names it Sanic-EmotionEngine-0
_hookimpl = pluggy.HookimplMarker("rasa_sdk")


class EmotionPlugin:
    """Owns this process's engine, rules and settings, read from the environment once.

    One per process: rasa-sdk pickles action instances into every Sanic worker, so the
    model must not live on them; the actions reach it through ``PLUGIN``.
    """

    def __init__(self) -> None:
        self._engine: EmotionEngine | None = None
        self.config: Settings | None = None
        self.rules: list[EscalationRule] = []
        self.alerts: AlertSender | None = None

    @property
    def engine(self) -> EmotionEngine:
        """This process's engine: built as the server starts (``_before_start``), or on
        first use where no server started it."""
        if self._engine is None:
            self._engine = self._build_engine()
        return self._engine

    def _build_engine(self, app=None) -> EmotionEngine:
        config = Settings.from_env()
        self.rules = load_rules(config.rules_path, history_turns=config.history_turns, labels=config.labels or LABELS)
        self.config = config
        if config.alert_url:
            self.alerts = AlertSender(config.alert_url, timeout_s=config.alert_timeout_s, retries=config.alert_retries,
                                      on_outcome=lambda outcome: metrics.ALERTS.labels(outcome).inc())
        tracer = None
        # rasa-sdk builds its tracer provider from endpoints.yml in a listener before ours.
        provider = getattr(app.ctx, "tracer_provider", None) if app is not None else None
        if provider is not None:
            tracer = provider.get_tracer("emotion")
        backend: Backend
        path = os.environ.get(ENGINE_SOCKET_ENV)
        if path:  # a Sanic worker, with the model in the engine process
            on_lost = None
            if app is not None and _restarts_engine_process(app):
                on_lost = lambda: app.add_task(_restart_engine_process(app))  # noqa: E731
            backend = EngineProcessBackend(config, path, on_lost=on_lost)
        else:
            backend = InProcessBackend(config, on_batch=metrics.record_batch)
        return EmotionEngine(config, backend=backend, tracer=tracer, freeze_heap=True)  # this process is the server's own

    def start_in_rasa(self, rules: list[EscalationRule]) -> EmotionEngine:
        """For actions run inside Rasa Pro (``actions_module`` in endpoints.yml), where no action
        server starts and so no hook of ours runs: Rasa Pro's assistant calls this as it loads
        (``EmotionCommandGenerator`` with ``in_process``). The settings are read and checked, the
        actions take the assistant's ``rules`` (those its trained model carries), and the model
        loads here, in this thread, so the first caller's turn finds it warm. Raises
        ``ConfigError`` for a bad setting, ``ModelUnavailable`` for a model that cannot load:
        either stops the assistant."""
        engine = self.engine
        if self.config.rules_path is not None and self.rules != list(rules):
            raise ConfigError(f"EMOTION_RULES={self.config.rules_path} holds other rules than the assistant was trained with: "
                              "unset it (the assistant's rules then apply to the actions too) or train with that file")
        self.rules = list(rules)
        if isinstance(engine.backend, InProcessBackend):
            engine.backend.load()
        return engine

    async def analyze_for_rasa(self, audio, timeout_s: float) -> dict:
        """``metadata.audio`` analysed in this process, answered as ``/v1/analyze`` answers it:
        the utterance result (signed with ``EMOTION_RESULT_KEY`` when set), or
        ``{"error": {code, message}}``. Never raises."""
        engine = self.engine
        try:
            result = await asyncio.wait_for(engine.analyze_ref(parse_audio_ref(audio)), timeout_s)
        except EmotionError as exc:
            return {"error": exc.as_dict()}
        except asyncio.TimeoutError:
            return {"error": {"code": "timeout", "message": f"the analysis took longer than {timeout_s:g} s"}}
        except Exception:  # a bug must cost this turn its tag, never the conversation
            log.exception("emotion analysis crashed")
            return {"error": {"code": "internal", "message": "internal error while analysing the audio"}}
        out = {k: v for k, v in result.as_dict().items() if k in SIGNED_FIELDS}
        out["model"] = engine.settings.model
        if self.config.result_key:
            out["signature"] = sign_result(out, self.config.result_key)
        return out

    @_hookimpl
    def attach_sanic_app_extensions(self, app) -> None:
        try:
            app.register_listener(self._start_engine_process, "main_process_ready")
        except (SanicException, KeyError):  # Sanic before 22.9 (rasa-sdk 3.6): no worker manager, a model per worker
            pass  # 21.12 has no such event at all and answers KeyError
        else:
            app.register_listener(self._after_engine_process, "main_process_stop")
        app.register_listener(self._before_start, "before_server_start")
        app.register_listener(self._after_stop, "after_server_stop")
        app.add_route(self._ready, "/ready", methods=["GET"], name="emotion_ready")
        app.add_route(self._metrics, "/metrics", methods=["GET"], name="emotion_metrics")
        app.add_route(self._review_page, "/ui", methods=["GET"], name="emotion_ui", strict_slashes=False)  # /ui/ too
        api.add_routes(app, self.settings, lambda: self.rules)
        http.install(app, lambda: self.settings()[1])

    def settings(self) -> tuple[EmotionEngine, Settings]:
        engine = self.engine  # reads the settings on first use
        return engine, self.config

    def _start_engine_process(self, app) -> None:
        """In the main process, before the workers start: with several workers (or
        EMOTION_ENGINE_PROCESS=on) the model gets a process of its own that they all share."""
        wanted = Settings.from_env().engine_process
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
        _ensure_logging()
        try:
            # Built here, where the app says what the engine needs: rasa-sdk's tracer
            # provider, and which worker restarts a lost engine process.
            if self._engine is None:
                self._engine = self._build_engine(app)
            engine = self._engine
        except ConfigError as exc:
            # Settings and rules are the operator's: refuse to start rather than run with a guess.
            log.critical("invalid emotion configuration: %s", exc.message)
            raise RuntimeError(f"invalid emotion configuration: {exc.message}") from None
        if self.config.fail_fast:
            try:
                await engine.start()
            except EmotionError as exc:
                log.critical("emotion model failed to load, stopping (EMOTION_FAIL_FAST): %s", exc.message)
                raise RuntimeError(f"EMOTION_FAIL_FAST: {exc.message}") from None
            await self._announce(engine)
        else:
            app.add_task(self._load(engine), name="emotion_load")

    async def _load(self, engine: EmotionEngine) -> None:
        await engine.start_or_log()
        await self._announce(engine)

    @staticmethod
    async def _announce(engine: EmotionEngine) -> None:
        status = await engine.status()
        if status["ready"]:
            mode = "the engine process" if status.get("engine_process") else "this process"
            log.info("emotion model ready: %s on %s (%s) in %s, labels %s; runtime %s", status["model"], status["device"],
                     status["dtype"], mode, ",".join(status["labels"] or ()), status.get("runtime"))

    async def _after_stop(self, app, _loop) -> None:
        if self._engine is not None:
            await self._engine.close()
        if self.alerts is not None:
            await self.alerts.close()

    async def _ready(self, request):
        status = await self.engine.status()
        if not http.authorized(request, self.config.api_token):  # an orchestrator's probe: ready or not, nothing more
            status = {"ready": status["ready"]}
        return response.json(status, status=200 if status["ready"] else 503)

    async def _review_page(self, _request):
        self.settings()
        rules = [rule_as_dict(r) for r in self.rules]
        nonce = secrets.token_urlsafe(16)
        page = REVIEW_PAGE.read_text(encoding="utf-8").replace("__NONCE__", nonce)
        return response.html(page.replace("__RULES__", json.dumps(rules).replace("</", "<\\/")), headers={
            "Content-Security-Policy": f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
                                       "connect-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
                                       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    async def _metrics(self, _request):
        if not self.settings()[1].metrics:
            return response.json({"error": "metrics are off (EMOTION_METRICS=false)"}, status=404)
        return response.raw(metrics.page(await self.engine.status()), content_type=metrics.CONTENT_TYPE_LATEST)


async def _restart_engine_process(app) -> None:
    name = next((name for name in app.m.workers if ENGINE_PROCESS in name), None)
    if name is None:  # the worker manager no longer lists it (the server is stopping)
        log.error("emotion: the engine process is not among the server's processes; not restarting it")
        return
    for _ in range(100):  # Sanic restarts only what its manager has seen end
        if app.m.workers.get(name, {}).get("state") in ("FAILED", "COMPLETED"):
            app.m.restart(name=name)
            return
        await asyncio.sleep(0.1)
    log.error("emotion: the engine process %s did not end; not restarting it", name)


def _ensure_logging() -> None:
    """rasa-sdk configures logging in the process it starts, not in the Sanic workers it
    spawns: there our INFO lines (the model is ready, each turn) went nowhere, and warnings
    came out bare. Where nothing handles them, the package gets a handler of its own."""
    root, ours = logging.getLogger(), logging.getLogger("emotion")
    if root.handlers or ours.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s %(name)s  - %(message)s"))
    ours.addHandler(handler)
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)


def _restarts_engine_process(app) -> bool:
    """One worker, the first, asks Sanic to restart a lost engine process: one restart
    and one model load, however many workers notice."""
    servers = sorted(name for name, state in app.m.workers.items() if state.get("server"))
    return bool(servers) and app.m.name == servers[0]


PLUGIN = EmotionPlugin()


def _register() -> None:
    manager = plugin_manager()
    if not manager.has_plugin("emotion"):
        manager.register(PLUGIN, name="emotion")


_register()
