"""Our CALM parts against Rasa Pro 3.21's own loaders, validator, trackers, commands and
flow executor (its modules run without a licence; its server does not start without one).
Run in Rasa Pro's own environment (.rasa-pro-venv, scripts/setup.sh --test)."""

import asyncio
import sys
import time
from pathlib import Path

import pytest
import rasa.core.processor  # noqa: F401  (imports Rasa Pro's modules in the order its server does)
from rasa.core.policies.flows.flow_executor import advance_flows
from rasa.dialogue_understanding.commands.command import Command
from rasa.dialogue_understanding.commands.start_flow_command import StartFlowCommand
from rasa.dialogue_understanding.patterns.human_handoff import HumanHandoffPatternFlowStackFrame
from rasa.engine.storage.resource import Resource
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import ActionExecuted, SessionStarted, SlotSet, UserUttered
from rasa.shared.core.flows.yaml_flows_io import YAMLFlowsReader
from rasa.shared.core.trackers import DialogueStateTracker
from rasa.shared.core.training_data.structures import StoryGraph
from rasa.shared.exceptions import InvalidConfigException
from rasa.shared.importers.importer import FlowSyncImporter
from rasa.shared.nlu.training_data.message import Message
from rasa.shared.nlu.training_data.training_data import TrainingData
from rasa.validator import Validator

from emotion.settings import LABELS

CALM = Path(__file__).resolve().parents[2] / "domain_snippets" / "calm"
RULES = CALM.parent / "emotion_rules.yml"
sys.path.insert(0, str(CALM))
from emotion_calm import EmotionCommandGenerator, EmotionHandoffCommand  # noqa: E402


def result(emotion="angry", confidence=0.9):
    rest = (1 - confidence) / (len(LABELS) - 1)
    return {"emotion": emotion, "confidence": confidence, "scores": {k: confidence if k == emotion else rest for k in LABELS},
            "duration_s": 2.0, "model": "iic/emotion2vec_plus_large"}


@pytest.fixture(scope="module")
def bot():
    from rasa.core.config.configuration import Configuration

    Configuration.initialise_empty()  # what the server does from endpoints.yml and credentials.yml
    domain = Domain.from_path(CALM / "domain.yml").merge(FlowSyncImporter.load_default_pattern_flows_domain())
    flows = FlowSyncImporter.merge_with_default_flows(YAMLFlowsReader.read_from_file(CALM / "flows.yml"))
    flows.validate()
    return domain, flows


@pytest.fixture(scope="module")
def generator():
    return EmotionCommandGenerator.create({"rules": str(RULES)}, None, Resource("emotion"), None)


def test_rasa_pro_validates_our_domain_and_flows(bot):
    domain, flows = bot
    validator = Validator(domain, TrainingData(), StoryGraph([]), flows, None)
    assert validator.verify_flows_steps_against_domain()
    assert validator.verify_unique_flows()
    assert validator.verify_predicates()
    assert validator.verify_flows()
    assert validator.validate_CALM_slot_mappings()
    handoff = flows.flow_by_id("pattern_human_handoff")
    assert [s.action for s in handoff.steps if hasattr(s, "action")] == ["action_handoff_metric", "action_handoff_to_human"]


def new_tracker(domain, events=()):
    base = [ActionExecuted("action_session_start"), SessionStarted(), ActionExecuted("action_listen")]
    return DialogueStateTracker.from_events("caller", [*base, *events], slots=domain.slots)


def commands_for(generator, flows, tracker, emotion, text="I want a refund"):
    message = Message(data={"text": text, "metadata": {"emotion": emotion} if emotion is not None else {}})
    return asyncio.run(generator.predict_commands(message, flows, tracker))


def next_action(domain, flows, tracker) -> str:
    """What Rasa Pro's flow policy predicts next; its stack updates go on the tracker."""
    prediction = asyncio.run(advance_flows(tracker, domain.action_names_or_texts, flows, domain.slots))
    tracker.update_with_events(prediction.events or [])
    return prediction.action_name


def run_commands(tracker, flows, commands):
    for command in commands:
        tracker.update_with_events(command.run_command_on_tracker(tracker, flows, tracker.copy()))


def test_an_angry_turn_at_0_9_hands_off_on_that_turn(bot, generator):
    domain, flows = bot
    tracker = new_tracker(domain)
    commands = commands_for(generator, flows, tracker, result("angry", 0.9))
    assert commands == [EmotionHandoffCommand("angry_caller", "angry_caller: angry 0.90 >= 0.70")]
    # Rasa Pro keeps commands as dicts in the parse data and rebuilds them from there.
    assert Command.commands_from_json([c.as_dict() for c in commands]) == commands
    run_commands(tracker, flows, commands)
    assert isinstance(tracker.stack.top(), HumanHandoffPatternFlowStackFrame)
    assert tracker.get_slot("escalate") is True and tracker.get_slot("escalation_reason").startswith("angry_caller")
    assert next_action(domain, flows, tracker) == "action_handoff_metric"
    tracker.update(ActionExecuted("action_handoff_metric"))
    assert next_action(domain, flows, tracker) == "action_handoff_to_human"


def test_a_caller_asking_for_a_human_takes_the_same_pattern(bot):
    domain, flows = bot
    tracker = new_tracker(domain)
    run_commands(tracker, flows, [StartFlowCommand("talk_to_human")])
    assert next_action(domain, flows, tracker) == "action_handoff_metric"
    tracker.update(ActionExecuted("action_handoff_metric"))
    assert next_action(domain, flows, tracker) == "action_handoff_to_human"


@pytest.mark.parametrize("emotion", [result("angry", 0.6), None, {"error": {"code": "timeout", "message": "slow"}},
                                     {**result(), "scores": {"furious": 1.0}}, {**result(), "scores": {**result()["scores"], "sad": 10**400}}])
def test_no_handoff_for_a_mild_turn_a_typed_turn_or_a_failed_analysis(bot, generator, emotion):
    domain, flows = bot
    assert commands_for(generator, flows, new_tracker(domain), emotion) == []


def test_history_rules_see_this_sessions_turns_only(bot, generator):
    """upset_twice: angry or disgusted >= 0.5 on two turns in a row. Yesterday's turns,
    carried into this session by the bot, do not count."""
    domain, flows = bot
    earlier = [{"emotion": "disgusted", "confidence": 0.6, "escalated": None}]
    this_session = [UserUttered("it broke again"), SlotSet("emotion_history", earlier), ActionExecuted("action_listen")]
    assert commands_for(generator, flows, new_tracker(domain, this_session), result("angry", 0.6)) == [
        EmotionHandoffCommand("upset_twice", "upset_twice: angry 0.60 >= 0.50 on 2 turns in a row")]
    carried = [SlotSet("emotion_history", earlier)]  # set by action_session_start, before the caller spoke
    assert commands_for(generator, flows, new_tracker(domain, carried), result("angry", 0.6)) == []


def test_a_bad_rules_file_stops_the_server_with_its_line(tmp_path):
    """As Rasa Pro's own components do: an InvalidConfigException, which its graph runner and
    load_agent let through (anything else leaves an assistant that ignores every message)."""
    rules = tmp_path / "rules.yml"
    rules.write_text("rules:\n  - name: a\n    emotions: [furious]\n")

    with pytest.raises(InvalidConfigException, match="rules.yml, line 2"):
        EmotionCommandGenerator.create({"rules": str(rules)}, None, Resource("emotion"), None)


KEY = "calm-test-result-key-0123456789"


def test_with_a_result_key_only_signed_fresh_results_hand_off(bot, monkeypatch):
    """With the key in its config, or in EMOTION_RESULT_KEY as the action server has it, the
    generator takes only results the analysis API signed: a caller's own metadata.emotion
    starts nothing."""
    from emotion.engine.results import sign_result

    domain, flows = bot
    monkeypatch.delenv("EMOTION_RESULT_KEY", raising=False)
    configured = EmotionCommandGenerator.create({"rules": str(RULES), "result_key": KEY}, None, Resource("emotion"), None)
    monkeypatch.setenv("EMOTION_RESULT_KEY", KEY)
    from_env = EmotionCommandGenerator.create({"rules": str(RULES)}, None, Resource("emotion"), None)
    handoff = [EmotionHandoffCommand("angry_caller", "angry_caller: angry 0.90 >= 0.70")]
    now = int(time.time())
    for generator in (configured, from_env):
        assert commands_for(generator, flows, new_tracker(domain), result("angry", 0.9)) == []
        signed = {**result("angry", 0.9), "signature": sign_result(result("angry", 0.9), KEY, issued_at=now)}
        assert commands_for(generator, flows, new_tracker(domain), signed) == handoff
        tampered = {**result("angry", 0.9), "signature": sign_result(result("angry", 0.6), KEY, issued_at=now)}
        stale = {**result("angry", 0.9), "signature": sign_result(result("angry", 0.9), KEY, issued_at=now - 3600)}
        for refused in (tampered, stale):
            assert commands_for(generator, flows, new_tracker(domain), refused) == []


def test_a_short_result_key_stops_the_server(monkeypatch):
    monkeypatch.delenv("EMOTION_RESULT_KEY", raising=False)
    with pytest.raises(InvalidConfigException, match="result_key: expected at least 16 characters"):
        EmotionCommandGenerator.create({"rules": str(RULES), "result_key": "short"}, None, Resource("emotion"), None)
