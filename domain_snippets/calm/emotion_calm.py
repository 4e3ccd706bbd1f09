"""Rasa Pro (CALM): hand an upset caller to a human on the turn the emotion is heard.

Rasa Pro runs its command generators on a message before any custom action, so a slot
set by ``action_analyze_emotion`` comes too late for this turn, and a flow guard only
makes a flow startable. This command generator, placed before the LLM one, reads the
result that arrived with the message (``metadata.emotion``, put there by the gateway or
``EmotionRestInput``), applies the escalation rules to this session's emotion history,
and when a handoff rule fires emits ``EmotionHandoffCommand``, which enters Rasa Pro's
own ``pattern_human_handoff``. A caller who asks for a human goes through the same pattern
(the ``talk_to_human`` flow links to it).

Runs inside the Rasa Pro server. It needs this project's ``emotion`` package there
without its heavy dependencies (``pip install --no-deps rasa-emotion2vec``: the rules and
result checks import only PyYAML and numpy, which Rasa ships). In ``config.yml``::

    pipeline:
      - name: emotion_calm.EmotionCommandGenerator
        rules: emotion_rules.yml     # optional; default: angry >= 0.7
      - name: CompactLLMCommandGenerator

With ``EMOTION_RESULT_KEY`` set on the action server, set the same in Rasa Pro's environment
(or ``result_key`` here, though config.yml is stored in the trained model): then only results
the analysis API signed, within ``EMOTION_RESULT_MAX_AGE_S`` (``result_max_age_s``, 300 s),
are taken.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from rasa.dialogue_understanding.commands.command import Command
from rasa.dialogue_understanding.generator.command_generator import CommandGenerator
from rasa.dialogue_understanding.patterns.human_handoff import HumanHandoffPatternFlowStackFrame
from rasa.engine.graph import ExecutionContext, GraphComponent
from rasa.engine.recipes.default_recipe import DefaultV1Recipe
from rasa.engine.storage.resource import Resource
from rasa.engine.storage.storage import ModelStorage
from rasa.shared.core.events import Event, SessionStarted, SlotSet, UserUttered
from rasa.shared.core.flows import FlowsList
from rasa.shared.core.trackers import DialogueStateTracker
from rasa.shared.nlu.training_data.message import Message

from emotion.engine.results import result_from_metadata
from emotion.errors import ConfigError, EmotionError
from emotion.rules import Turn, evaluate_rules, load_rules
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


@DefaultV1Recipe.register([DefaultV1Recipe.ComponentType.COMMAND_GENERATOR], is_trainable=False)
class EmotionCommandGenerator(GraphComponent, CommandGenerator):
    @staticmethod
    def get_default_config() -> dict[str, Any]:
        # result_key and result_max_age_s: None reads EMOTION_RESULT_KEY and EMOTION_RESULT_MAX_AGE_S,
        # as the action server does.
        return {"rules": None, "history_turns": 20, "result_key": None, "result_max_age_s": None}

    def __init__(self, config: dict[str, Any], model_storage: ModelStorage, resource: Resource,
                 execution_context: ExecutionContext) -> None:
        super().__init__(config)
        self.config = {**self.get_default_config(), **config}
        self._resource = resource
        # A bad rules file stops the server at startup, naming the file and line.
        self.rules = load_rules(self.config["rules"], history_turns=self.config["history_turns"])
        # Read at load and never written back to the config: the trained model keeps config.yml,
        # and the key must not travel in it. Stripped, as the action server strips its variables.
        self._result_key = str(self.config["result_key"] or os.environ.get("EMOTION_RESULT_KEY") or "").strip() or None
        if self._result_key is not None and len(self._result_key) < MIN_RESULT_KEY_CHARS:
            raise ConfigError(f"emotion_calm.EmotionCommandGenerator: result_key: expected at least {MIN_RESULT_KEY_CHARS} "
                              f"characters, got {len(self._result_key)}")
        max_age = self.config["result_max_age_s"] or os.environ.get("EMOTION_RESULT_MAX_AGE_S", "").strip() or RESULT_MAX_AGE_S
        try:
            self._result_max_age_s = float(max_age)
        except (TypeError, ValueError):
            self._result_max_age_s = float("nan")
        if not 1 <= self._result_max_age_s <= 86_400:
            raise ConfigError(f"emotion_calm.EmotionCommandGenerator: result_max_age_s={max_age!r}: expected seconds in "
                              "[1, 86400]")

    @classmethod
    def create(cls, config, model_storage, resource, execution_context) -> EmotionCommandGenerator:
        return cls(config, model_storage, resource, execution_context)

    @classmethod
    def load(cls, config, model_storage, resource, execution_context, **kwargs: Any) -> EmotionCommandGenerator:
        return cls(config, model_storage, resource, execution_context)

    def train(self, training_data) -> Resource:
        return self._resource

    async def predict_commands(self, message: Message, flows: FlowsList, tracker: DialogueStateTracker | None = None,
                               **kwargs: Any) -> list[Command]:
        commands = self._get_prior_commands(message)
        value = (message.get("metadata") or {}).get("emotion")
        if value is None or tracker is None:
            return commands
        try:
            result = result_from_metadata(value, LABELS, key=self._result_key, max_age_s=self._result_max_age_s)
        except EmotionError:
            return commands  # action_analyze_emotion reports it in emotion_error
        history = [t for t in map(Turn.from_dict, session_history(tracker)) if t]
        history.append(Turn(result.emotion, result.confidence))
        decision = evaluate_rules(history, self.rules, message.get("text"), channel=tracker.get_latest_input_channel())
        if decision.escalate:
            log.info("conversation=%s emotion handoff: %s", tracker.sender_id, decision.reason)
            commands.append(EmotionHandoffCommand(decision.rule, decision.reason))
        return commands


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
