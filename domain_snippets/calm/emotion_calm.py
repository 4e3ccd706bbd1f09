"""Rasa Pro (CALM): hand an upset caller to a human on the turn the emotion is heard.

Rasa Pro runs its command generators on a message before any custom action, so a slot
set by ``action_analyze_emotion`` comes too late for this turn, and a flow guard only
makes a flow startable. This command generator, placed after the intent classifier (if
any) and before the LLM command generator, takes the turn's emotion: the result that
arrived with the message (``metadata.emotion``, from a gateway, ``EmotionRestInput`` or
the voice channels), or else the audio the message refers to (``metadata.audio``: url,
path or base64), which it has analysed itself. It applies the escalation rules to this
session's emotion history, and when a handoff rule fires emits ``EmotionHandoffCommand``,
which enters Rasa Pro's own ``pattern_human_handoff``. A caller who asks for a human goes
through the same pattern (the ``talk_to_human`` flow links to it). In ``config.yml``::

    pipeline:
      # - name: ...your intent classifier, if rules name intents...
      - name: emotion_calm.EmotionCommandGenerator
        rules: emotion_rules.yml     # read at training; the trained model keeps them
        analyze_url: "http://localhost:5055/v1/analyze"   # or: in_process: true
      - name: CompactLLMCommandGenerator

Where the audio is analysed: ``analyze_url``, the action server's analysis API (with
``EMOTION_API_TOKEN``, or ``token``, and ``timeout_s``), when the actions run on our action
server; or ``in_process: true`` when Rasa Pro runs the actions itself (``actions_module``
in endpoints.yml): the model then loads in Rasa Pro's process as the assistant loads. Set
in the environment instead (``EMOTION_ANALYZE_URL``, ``EMOTION_IN_PROCESS=true``), the
trained model runs unchanged wherever the action server lives. The result replaces the
audio in the message's metadata, so the action takes it without analysing again.

Runs inside the Rasa Pro server, with ``emotion_channel.py`` beside it. Over the API it
needs this project's ``emotion`` package without its heavy dependencies (``pip install
--no-deps rasa-emotion2vec``); in process, with them (torch and FunASR). A bad rules file,
a bad setting or a model that cannot load stops the assistant from loading
(``InvalidConfigException``), naming the file, line and reason.

With ``EMOTION_RESULT_KEY`` set on the action server, set the same in Rasa Pro's environment
(or ``result_key`` here, though config.yml is stored in the trained model): then only results
the analysis API signed, within ``EMOTION_RESULT_MAX_AGE_S`` (``result_max_age_s``, 300 s),
are taken.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rasa.dialogue_understanding.commands.command import Command
from rasa.dialogue_understanding.generator.command_generator import CommandGenerator
from rasa.dialogue_understanding.patterns.human_handoff import HumanHandoffPatternFlowStackFrame
from rasa.engine.graph import ExecutionContext, GraphComponent
from rasa.engine.recipes.default_recipe import DefaultV1Recipe
from rasa.engine.storage.resource import Resource
from rasa.engine.storage.storage import ModelStorage
from rasa.nlu.classifiers.classifier import IntentClassifier
from rasa.shared.core.events import Event, SessionStarted, SlotSet, UserUttered
from rasa.shared.core.flows import FlowsList
from rasa.shared.core.trackers import DialogueStateTracker
from rasa.shared.exceptions import InvalidConfigException
from rasa.shared.nlu.training_data.message import Message
from rasa.shared.nlu.training_data.training_data import TrainingData

from emotion.engine.results import result_from_metadata
from emotion.errors import ConfigError, EmotionError, loggable
from emotion.rules import DEFAULT_RULES_YAML, Turn, evaluate_rules, parse_rules
from emotion.settings import LABELS, MIN_RESULT_KEY_CHARS, RESULT_MAX_AGE_S

log = logging.getLogger(__name__)


@dataclass
class EmotionHandoffCommand(Command):
    """Start Rasa Pro's ``pattern_human_handoff`` now, because an escalation rule fired."""

    rule: str = ""
    reason: str = ""

    @classmethod
    def command(cls) -> str:
        return "emotion handoff"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmotionHandoffCommand:
        return cls(rule=data.get("rule", ""), reason=data.get("reason", ""))

    def run_command_on_tracker(self, tracker: DialogueStateTracker, all_flows: FlowsList,
                               original_tracker: DialogueStateTracker) -> list[Event]:
        stack = tracker.stack
        stack.push(HumanHandoffPatternFlowStackFrame())
        # The handoff action reads the reason; action_analyze_emotion sets the same later.
        return [*tracker.create_stack_updated_events(stack), SlotSet("escalate", True), SlotSet("escalation_reason", self.reason)]

    def __hash__(self) -> int:
        return hash((self.rule, self.reason))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EmotionHandoffCommand) and (other.rule, other.reason) == (self.rule, self.reason)

    # Never written by an LLM: no DSL form.
    def to_dsl(self) -> str:
        return "emotion handoff"

    @classmethod
    def from_dsl(cls, match: re.Match, **kwargs: Any) -> EmotionHandoffCommand:
        return cls()

    @staticmethod
    def regex_pattern() -> str:
        return r"^emotion handoff$"


NAME = "emotion_calm.EmotionCommandGenerator"
STORED_RULES = "emotion_rules.yml"  # the rules as read at training, in the model's resource
TRUE = ("1", "true", "yes", "on")


@DefaultV1Recipe.register([DefaultV1Recipe.ComponentType.COMMAND_GENERATOR], is_trainable=True)
class EmotionCommandGenerator(GraphComponent, CommandGenerator):
    # Trainable only so that the trained model carries the rules: training reads the rules
    # file and stores it as this component's resource, and loading reads it from there, so
    # a model trained on one machine keeps its rules in a container where the file is not.
    @staticmethod
    def get_default_config() -> dict[str, Any]:
        # None: read from the environment (EMOTION_ANALYZE_URL, EMOTION_IN_PROCESS,
        # EMOTION_API_TOKEN, EMOTION_LABELS, EMOTION_RESULT_KEY, EMOTION_RESULT_MAX_AGE_S), as
        # the action server does; config.yml is stored in the trained model, the environment not.
        return {"rules": None, "history_turns": 20, "analyze_url": None, "in_process": None, "token": None, "timeout_s": 3.0,
                "labels": None, "result_key": None, "result_max_age_s": None}

    def __init__(self, config: dict[str, Any], model_storage: ModelStorage, resource: Resource,
                 execution_context: ExecutionContext, rules: tuple[str, str] | None = None) -> None:
        super().__init__(config)
        self.config = {**self.get_default_config(), **config}
        self._model_storage = model_storage
        self._resource = resource
        self._context = execution_context
        self._labels = _labels(self.config["labels"])
        # (text, where): from the model when loaded, else from the file named in the config.
        self._rules_text, self._rules_where = rules or read_rules_file(self.config["rules"])
        self.rules = _checked(lambda: parse_rules(self._rules_text, where=self._rules_where,
                                                  history_turns=self._history_turns(), labels=self._labels))
        # Read at load and never written back to the config: the trained model keeps config.yml,
        # and the key must not travel in it. Stripped, as the action server strips its variables.
        self._result_key = _option(self.config, "result_key", "EMOTION_RESULT_KEY")
        if self._result_key is not None and len(self._result_key) < MIN_RESULT_KEY_CHARS:
            raise InvalidConfigException(f"{NAME}: result_key: expected at least {MIN_RESULT_KEY_CHARS} characters, got "
                                         f"{len(self._result_key)}")
        max_age = _option(self.config, "result_max_age_s", "EMOTION_RESULT_MAX_AGE_S") or RESULT_MAX_AGE_S
        self._result_max_age_s = _number(max_age, "result_max_age_s", 1, 86_400)
        self._timeout_s = _number(self.config["timeout_s"], "timeout_s", 0.1, 60)
        self._analyze_url = _option(self.config, "analyze_url", "EMOTION_ANALYZE_URL")
        if self._analyze_url is not None and not self._analyze_url.startswith(("http://", "https://")):
            raise InvalidConfigException(f"{NAME}: analyze_url={self._analyze_url!r}: expected the action server's analysis "
                                         "API, e.g. http://localhost:5055/v1/analyze")
        in_process = self.config["in_process"]
        if in_process is None:
            in_process = os.environ.get("EMOTION_IN_PROCESS", "").strip().lower() in TRUE
        self._in_process = bool(in_process)
        if self._in_process and self._analyze_url:
            raise InvalidConfigException(f"{NAME}: both analyze_url ({self._analyze_url}) and in_process are set: the audio "
                                         "is analysed either by the action server's analysis API or in Rasa Pro's process")
        self._analyzer: Any = None

    def _history_turns(self) -> int:
        return int(_number(self.config["history_turns"], "history_turns", 1, 1000))

    @classmethod
    def create(cls, config, model_storage, resource, execution_context) -> EmotionCommandGenerator:
        # At training (and for a component made outside a trained model): the rules file is
        # read and checked here, so a bad one stops `rasa train` too.
        return cls(config, model_storage, resource, execution_context)

    @classmethod
    def load(cls, config, model_storage, resource, execution_context, **kwargs: Any) -> EmotionCommandGenerator:
        try:
            with model_storage.read_from(resource) as directory:
                stored = (directory / STORED_RULES).read_text(encoding="utf-8")
        except (ValueError, OSError):
            raise InvalidConfigException(f"{NAME}: the trained model carries no escalation rules (trained with an older "
                                         "version of this component): train the assistant again") from None
        source = config.get("rules") or "the default rules"
        component = cls(config, model_storage, resource, execution_context, rules=(stored, f"{source} (as trained)"))
        component.start()
        return component

    @classmethod
    def fingerprint_addon(cls, config: dict[str, Any]) -> str | None:
        # The rules file is not part of the training data: its bytes are, so that editing it
        # trains this component again rather than reusing a cached one with the old rules.
        try:
            text, _ = read_rules_file(config.get("rules"))
        except InvalidConfigException as exc:
            return f"unreadable: {exc}"  # create() then says why
        return hashlib.sha256(text.encode()).hexdigest()

    def train(self, training_data: TrainingData) -> Resource:
        with self._model_storage.write_to(self._resource) as directory:
            (Path(directory) / STORED_RULES).write_text(self._rules_text, encoding="utf-8")
        return self._resource

    def start(self) -> None:
        """As the assistant loads: where the audio is analysed (there must be a place: a
        turn with ``metadata.audio`` must never pass unheard), whether intent rules can fire,
        and in process the model, its settings and its labels, loaded now."""
        uses_intents = [r.name for r in self.rules if r.intents]
        if uses_intents and _intent_classified_before(self._context) is False:
            raise InvalidConfigException(
                f"{NAME}: rule(s) {', '.join(uses_intents)} in {self._rules_where} name intents, but no intent classifier runs "
                "before this component in the pipeline, so they could never fire: put it after the intent classifier")
        if self._in_process:
            self._analyzer = _InProcess(self._start_in_process(), self._timeout_s)
        elif self._analyze_url:
            from emotion_channel import EmotionAnalyzer  # beside this file, as for the channels

            token = _option(self.config, "token", "EMOTION_API_TOKEN")
            self._analyzer = EmotionAnalyzer(self._analyze_url, token, self._timeout_s)
        else:
            raise InvalidConfigException(
                f"{NAME} needs somewhere to analyse the audio a message refers to (metadata.audio): analyze_url, the action "
                "server's analysis API (e.g. http://localhost:5055/v1/analyze, or EMOTION_ANALYZE_URL), or in_process: true "
                "(or EMOTION_IN_PROCESS=true) when Rasa Pro runs the custom actions itself (actions_module)")

    def _start_in_process(self) -> Any:
        try:
            from emotion.serving.plugin import PLUGIN
        except ImportError as exc:
            raise InvalidConfigException(
                f"{NAME}: in_process needs this project with its dependencies in Rasa Pro's environment (torch first, then "
                f"pip install rasa-emotion2vec): {exc}") from None
        try:
            engine = PLUGIN.start_in_rasa(self.rules)
        except EmotionError as exc:
            raise InvalidConfigException(f"{NAME}: in_process: {exc.message}") from None
        unknown = sorted({e for r in self.rules for e in r.emotions} - set(engine.labels))
        if unknown:
            raise InvalidConfigException(f"{NAME}: {self._rules_where} names label(s) {', '.join(unknown)} that the model "
                                         f"({engine.settings.model}) does not have: it has {', '.join(engine.labels)}")
        self._labels = tuple(engine.labels)
        return PLUGIN

    async def predict_commands(self, message: Message, flows: FlowsList, tracker: DialogueStateTracker | None = None,
                               **kwargs: Any) -> list[Command]:
        commands = self._get_prior_commands(message)
        metadata = message.get("metadata")
        if tracker is None or not isinstance(metadata, dict):
            return commands
        if "emotion" in metadata:
            value = metadata["emotion"]
        elif "audio" in metadata:
            value = await self._analyze(metadata["audio"])
            # The turn's result in place of its audio, in the metadata Rasa Pro then copies
            # into the user event: action_analyze_emotion takes it without analysing again,
            # and inline audio stays out of the tracker from this turn on.
            del metadata["audio"]
            metadata["emotion"] = value
        else:
            return commands  # a typed turn
        try:
            result = result_from_metadata(value, self._labels, key=self._result_key, max_age_s=self._result_max_age_s)
        except EmotionError as exc:
            # action_analyze_emotion reports it in emotion_error; no handoff from a non-result.
            log.warning("conversation=%s no emotion for this turn [%s]: %s", loggable(tracker.sender_id), exc.code,
                        loggable(exc.message))
            return commands
        history = [t for t in map(Turn.from_dict, session_history(tracker)) if t]
        history.append(Turn(result.emotion, result.confidence))
        intent = (message.get("intent") or {}).get("name")
        decision = evaluate_rules(history, self.rules, message.get("text"), intent=intent,
                                  channel=tracker.get_latest_input_channel())
        if decision.escalate:
            log.info("conversation=%s emotion handoff: %s", loggable(tracker.sender_id), decision.reason)
            commands.append(EmotionHandoffCommand(decision.rule, decision.reason))
        return commands

    async def close(self) -> None:
        """Closes the connection to the analysis API (Rasa Pro calls no component at its stop;
        the process's exit closes it there)."""
        if self._analyzer is not None and hasattr(self._analyzer, "close"):
            await self._analyzer.close()

    async def _analyze(self, audio: Any) -> dict[str, Any]:
        if self._analyzer is None:  # a component made outside a loaded assistant (create)
            log.error("%s: a message with metadata.audio, and no analyze_url or in_process configured", NAME)
            return {"error": {"code": "bad_config", "message": f"{NAME} has no analyze_url or in_process"}}
        try:
            return await self._analyzer.analyze(audio)
        except Exception:  # a bug must cost this turn its tag, never the handoff of the next
            log.exception("%s: analysing metadata.audio crashed", NAME)
            return {"error": {"code": "internal", "message": "internal error while analysing the audio"}}


class _InProcess:
    """The analysis in Rasa Pro's own process, with the model the assistant loaded."""

    def __init__(self, plugin: Any, timeout_s: float) -> None:
        self.plugin, self.timeout_s = plugin, timeout_s

    async def analyze(self, audio: Any) -> dict[str, Any]:
        return await self.plugin.analyze_for_rasa(audio, self.timeout_s)


def read_rules_file(source: str | None) -> tuple[str, str]:
    """The rules file's text and name (``None``: the default rules). At training a relative
    path is read from the working directory, where ``rasa train`` runs (the bot's root)."""
    if not source:
        return DEFAULT_RULES_YAML, "the default rules"
    try:
        return Path(source).read_text(encoding="utf-8"), str(source)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidConfigException(f"{NAME}: cannot read the rules file {source} (from {os.getcwd()}): "
                                     f"{exc.strerror if isinstance(exc, OSError) else exc}") from None


def _checked(parse):
    try:
        return parse()
    except ConfigError as exc:
        raise InvalidConfigException(f"{NAME}: {exc.message}") from None


def _option(config: dict[str, Any], key: str, env: str) -> str | None:
    return str(config[key] or os.environ.get(env) or "").strip() or None


def _number(value: Any, key: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not low <= number <= high:
        raise InvalidConfigException(f"{NAME}: {key}={value!r}: expected a number in [{low:g}, {high:g}]")
    return number


def _labels(value: Any) -> tuple[str, ...]:
    """The labels results and rules may speak: ``labels``, else EMOTION_LABELS (as on the
    action server), else all of emotion2vec's nine."""
    if value is None:
        value = os.environ.get("EMOTION_LABELS", "").strip() or None
    if value is None:
        return LABELS
    labels = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    unknown = [lab for lab in labels if lab not in LABELS]
    if unknown or len(labels) < 2:
        raise InvalidConfigException(f"{NAME}: labels={','.join(map(str, labels))}: expected two or more of {', '.join(LABELS)}")
    return tuple(labels)


def _intent_classified_before(context: ExecutionContext | None) -> bool | None:
    """Whether an intent classifier runs before this node in the assistant's graph (None:
    no graph to tell, as for a component made outside a trained model)."""
    schema, name = getattr(context, "graph_schema", None), getattr(context, "node_name", None)
    if schema is None or name not in schema.nodes:
        return None
    node, seen = schema.nodes[name], set()
    while (previous := node.needs.get("messages")) and previous not in seen and previous in schema.nodes:
        seen.add(previous)
        node = schema.nodes[previous]
        if isinstance(node.uses, type) and issubclass(node.uses, IntentClassifier):
            return True
    return False


def session_history(tracker: DialogueStateTracker) -> list:
    """``emotion_history`` as this session wrote it (what action_analyze_emotion uses):
    slots carried into a new session, set before the caller first speaks, are not counted."""
    history: list = []
    spoken = False
    for event in tracker.events:
        if isinstance(event, SessionStarted):
            history, spoken = [], False
        spoken = spoken or isinstance(event, UserUttered)
        if spoken and isinstance(event, SlotSet) and event.key == "emotion_history":
            history = event.value or []
    return history
