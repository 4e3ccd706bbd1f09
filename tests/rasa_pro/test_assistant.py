"""A CALM assistant made from domain_snippets/calm/, trained by Rasa Pro 3.21's own training
(``rasa.model_training.train``), loaded by its own ``load_agent`` and spoken to through
``Agent.handle_message``, as ``rasa run`` does (its CLI and server need a licence; its library
does not). The pipeline: KeywordIntentClassifier, our EmotionCommandGenerator, and
NLUCommandAdapter in place of the LLM command generator (so no LLM). The custom actions run
on our real action server over HTTP (``action_endpoint: url``), or inside Rasa Pro itself
(``actions_module``), with the model loaded as the assistant loads. Trained once for the
module; each way of running the actions loaded once."""

import asyncio
import base64
import contextlib
import os
import shutil
import sys

import httpx
import pytest
import rasa.core.processor  # noqa: F401  (imports Rasa Pro's modules in the order its server does)
from conftest import ROOT, LocalHTTPServer, free_port, speech_like, wav_bytes
from rasa.core.agent import load_agent
from rasa.core.channels.channel import CollectingOutputChannel, UserMessage
from rasa.core.config.available_endpoints import AvailableEndpoints
from rasa.core.config.configuration import Configuration
from rasa.engine.recipes.default_recipe import DefaultV1Recipe
from rasa.engine.storage.resource import Resource
from rasa.model_training import train
from rasa.shared.core.events import ActionExecuted, ConversationPaused, UserUttered
from rasa.shared.data import TrainingType
from rasa.shared.exceptions import InvalidConfigException
from rasa.utils.endpoints import EndpointConfig

from emotion.settings import LABELS

CALM = ROOT / "domain_snippets" / "calm"
sys.path.insert(0, str(CALM))
from emotion_calm import EmotionCommandGenerator  # noqa: E402

PIPELINE = """\
recipe: default.v1
language: en
assistant_id: emotion-calm-test
pipeline:
  - name: KeywordIntentClassifier
  - name: emotion_calm.EmotionCommandGenerator
    rules: emotion_rules.yml
  - name: NLUCommandAdapter
policies:
  - name: FlowPolicy
"""
NLU = """\
version: "3.1"
nlu:
  - intent: complain
    examples: |
      - complaint
      - complain
  - intent: greet
    examples: |
      - hello
      - hi
"""
INTENTS = 'version: "3.1"\nintents:\n  - complain\n  - greet\n'
# Beside the shipped rules: one that fires only on an intent, which only a classifier
# before our generator can give it.
INTENT_RULE = "  - name: angry_complaint\n    emotions: [angry]\n    min_confidence: 0.5\n    intents: [complain]\n"
HANDOFF_TEXT = "I'm connecting you with a colleague who can help you right away."


def make_bot(root, rules: str | None = None):
    """domain_snippets/calm/ merged into a bot, as a user does: its domain and flows, the
    rules file beside config.yml, and our generator in the pipeline."""
    (root / "domain").mkdir(parents=True)
    (root / "data").mkdir()
    shutil.copy(CALM / "domain.yml", root / "domain" / "emotion.yml")
    (root / "domain" / "intents.yml").write_text(INTENTS)
    shutil.copy(CALM / "flows.yml", root / "data" / "flows.yml")
    (root / "data" / "nlu.yml").write_text(NLU)
    (root / "config.yml").write_text(PIPELINE)
    (root / "emotion_rules.yml").write_text((CALM / "emotion_rules.yml").read_text() + INTENT_RULE if rules is None else rules)
    return root


async def train_bot(bot) -> str:
    """``rasa train`` in the bot's root, which is where a relative rules path is read from."""
    cwd = os.getcwd()
    os.chdir(bot)
    try:
        result = await train(domain="domain", config="config.yml", training_files=["data"], output="models")
    finally:
        os.chdir(cwd)
    assert result.code == 0, result
    return str(bot / result.model)


@pytest.fixture(scope="module")
def run():
    """One event loop for the module, as a server has: the analysis clients and the model's
    batcher belong to the loop they first ran on."""
    with asyncio.Runner() as runner:
        yield runner.run


@pytest.fixture(scope="module")
def model(run, tmp_path_factory, pro_action_server):
    # Trained where the rules file is, loaded elsewhere: the model carries its rules. The
    # action server boots meanwhile.
    bot = make_bot(tmp_path_factory.mktemp("bot"))
    path = run(train_bot(bot))
    shutil.rmtree(bot / "data")
    (bot / "emotion_rules.yml").unlink()
    return path


def load(run, model_path, action: EndpointConfig, **env: str):
    """``load_agent`` as ``rasa run`` calls it, with ``env`` in the environment meanwhile."""
    endpoints = AvailableEndpoints(action=action)
    Configuration.initialise_endpoints_from_object(endpoints)  # what the server does from endpoints.yml
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.chdir(ROOT)  # a bot's root, where the actions package is, and no emotion_rules.yml
        agent = run(load_agent(model_path=model_path, endpoints=endpoints))
    assert agent.is_ready()
    return agent


def generator_of(agent) -> EmotionCommandGenerator:
    nodes = agent.processor.graph_runner._instantiated_nodes
    return next(node._component for node in nodes.values() if isinstance(node._component, EmotionCommandGenerator))


@contextlib.contextmanager
def fresh_plugin():
    """The process's plugin as a new process has it, and afterwards as it was: the in-process
    assistant is loaded once for the module, and the loads that must fail come and go beside
    it. The actions inside Rasa Pro need the project's dependencies in Rasa Pro's environment."""
    try:
        import funasr  # noqa: F401
        import torch  # noqa: F401

        from emotion.serving.plugin import PLUGIN
    except ImportError as exc:
        pytest.fail(f"actions_module needs torch and FunASR in Rasa Pro's environment ({exc}): scripts/setup.sh --test "
                    "installs them")
    saved = dict(vars(PLUGIN))
    PLUGIN.__init__()
    try:
        yield PLUGIN
    finally:
        vars(PLUGIN).update(saved)


@pytest.fixture(scope="module")
def over_http(run, model, pro_action_server):
    pro_action_server.wait()
    agent = load(run, model, EndpointConfig(url=pro_action_server.url + "/webhook"),
                 EMOTION_ANALYZE_URL=pro_action_server.url + "/v1/analyze")
    yield agent
    run(generator_of(agent).close())


@pytest.fixture(scope="module")
def in_process(run, model, angry90, audio_root):
    """Rasa Pro runs the actions itself (``actions_module``): no action server, no plugin
    hook; the generator loads the model as the assistant loads."""
    with fresh_plugin() as plugin:
        agent = load(run, model, EndpointConfig(actions_module="actions"), EMOTION_IN_PROCESS="true", EMOTION_MODEL=str(angry90),
                     EMOTION_AUDIO_ROOT=str(audio_root), EMOTION_URL_ALLOW="127.0.0.1")
        engine = plugin.engine
        assert engine.warm  # before the first caller speaks
        yield agent
        run(engine.close())


@pytest.mark.onnx  # the default runtime as it resolves, not pinned to torch
def test_the_default_runtime_beside_rasa_pro_is_torch(angry90):
    """Rasa Pro installs onnxruntime but not onnx and onnxscript, which the export needs: the
    default runtime is FunASR's forward there, not an export that cannot be made."""
    with fresh_plugin():
        from emotion.engine.model import EmotionModel

        model = EmotionModel(str(angry90), device="cpu", runtime="auto")
    assert model.runtime == "torch" and model.forward([speech_like(1.0)])[0].probs.max() > 0.85


@pytest.fixture(scope="module", params=["over_http", "in_process"])
def assistant(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def audio_url():
    server = LocalHTTPServer()
    server.routes["/turn.wav"] = (200, {"Content-Type": "audio/wav"}, wav_bytes(2.0))
    yield server.url + "/turn.wav"
    server.close()


class Turn:
    def __init__(self, run, agent, text: str, metadata: dict | None = None, sender: str | None = None) -> None:
        self.sender = sender or f"caller-{next(_callers)}"
        output = CollectingOutputChannel()
        run(agent.handle_message(UserMessage(text, output, sender_id=self.sender, metadata=metadata)))
        self.messages = output.messages
        self.tracker = run(agent.tracker_store.retrieve(self.sender))
        events = list(self.tracker.events)
        last = max(i for i, e in enumerate(events) if isinstance(e, UserUttered))
        self.user, self.after = events[last], events[last + 1:]
        self.actions = [e.action_name for e in self.after if isinstance(e, ActionExecuted)]

    def slot(self, name: str):
        return self.tracker.get_slot(name)

    @property
    def handed_off(self) -> bool:
        """On this very turn: the handoff pattern's two actions, the handoff message, and a paused conversation."""
        handoff = self.actions[:2] == ["action_handoff_metric", "action_handoff_to_human"]
        assert handoff == any(isinstance(e, ConversationPaused) for e in self.after) == (HANDOFF_TEXT in self.texts)
        return handoff

    @property
    def texts(self) -> list[str]:
        return [m.get("text") for m in self.messages]


_callers = iter(range(10**6))


def result(emotion="angry", confidence=0.9):
    rest = (1 - confidence) / (len(LABELS) - 1)
    return {"emotion": emotion, "confidence": confidence, "scores": {k: confidence if k == emotion else rest for k in LABELS},
            "duration_s": 2.0, "model": "iic/emotion2vec_plus_large"}


def from_the_api(server) -> dict:
    """A gateway's turn: the audio to /v1/analyze, the result with the transcript."""
    answer = httpx.post(server.wait().url + "/v1/analyze", json={"audio": {"base64": base64.b64encode(wav_bytes(1.5)).decode()}}).json()
    return {k: answer[k] for k in ("emotion", "confidence", "scores", "duration_s", "model")}


def audio(kind: str, audio_url: str) -> dict:
    return {"url": {"url": audio_url}, "path": {"path": "turn.wav"},
            "base64": {"base64": base64.b64encode(wav_bytes(2.0)).decode()}}[kind]


# -- every path the docs list hands off on its turn -----------------------------------------


def test_a_result_from_the_analysis_api_hands_off_on_its_turn(run, assistant, pro_action_server):
    turn = Turn(run, assistant, "I want a refund", {"emotion": from_the_api(pro_action_server)})
    assert turn.handed_off
    assert turn.slot("emotion") == "angry" and turn.slot("handoff_context")["reason"] == "angry_caller: angry 0.90 >= 0.70"


@pytest.mark.parametrize("kind", ["url", "path", "base64"])
def test_audio_sent_with_the_message_hands_off_on_its_turn(run, assistant, audio_url, kind):
    turn = Turn(run, assistant, "I want a refund", {"audio": audio(kind, audio_url), "call_id": "CA1"})
    assert turn.handed_off
    # The generator's result took the audio's place in the user event: the action took it
    # from there without analysing again, and no audio stays in the turn's event.
    assert set(turn.user.metadata) >= {"emotion", "call_id"} and "audio" not in turn.user.metadata
    assert turn.user.metadata["emotion"]["emotion"] == "angry"
    assert turn.slot("emotion") == "angry" and turn.slot("emotion_confidence") == pytest.approx(0.9, abs=1e-4)
    assert turn.slot("emotion_history") == [{"emotion": "angry", "confidence": 0.9, "escalated": "angry_caller"}]


def test_inline_audio_on_the_first_turn_stays_in_the_session_start_slot(run, assistant, audio_url):
    """Rasa Pro copies the first message's metadata into ``session_started_metadata`` before
    any component runs: what the docs say of inline audio."""
    turn = Turn(run, assistant, "I want a refund", {"audio": audio("base64", audio_url)})
    assert "base64" in turn.slot("session_started_metadata")["audio"]


# -- and nothing else does -----------------------------------------------------------------


def test_no_handoff_at_0_6(run, assistant):
    turn = Turn(run, assistant, "I want a refund", {"emotion": result("angry", 0.6)})
    assert not turn.handed_off and turn.slot("emotion") == "angry" and turn.slot("escalate") is False


def test_an_intent_rule_fires_on_the_intent_the_pipeline_classified(run, assistant):
    turn = Turn(run, assistant, "complaint", {"emotion": result("angry", 0.6)})
    assert turn.handed_off and turn.slot("handoff_context")["reason"].startswith("angry_complaint")


def test_a_typed_turn_hands_nothing_off(run, assistant):
    turn = Turn(run, assistant, "I want a refund")
    assert not turn.handed_off and turn.slot("emotion") is None and turn.slot("emotion_error") is None


def test_a_failed_analysis_goes_on_without_a_handoff_and_says_why(run, assistant):
    turn = Turn(run, assistant, "I want a refund", {"audio": {"base64": base64.b64encode(b"not audio at all " * 64).decode()}})
    assert not turn.handed_off and turn.slot("emotion") is None
    assert turn.slot("emotion_error").startswith("[decode_failed]")
    assert turn.user.metadata["emotion"]["error"]["code"] == "decode_failed"


def test_an_unreachable_analysis_api_is_an_error_result_not_a_crash(run, model, pro_action_server):
    agent = load(run, model, EndpointConfig(url=pro_action_server.wait().url + "/webhook"),
                 EMOTION_ANALYZE_URL=f"http://127.0.0.1:{free_port()}/v1/analyze")
    try:
        turn = Turn(run, agent, "I want a refund", {"audio": {"path": "turn.wav"}})
    finally:
        run(generator_of(agent).close())
    assert not turn.handed_off and turn.slot("emotion_error").startswith("[analysis_unavailable]")


# -- a bad setup refuses to start -----------------------------------------------------------


@pytest.mark.parametrize("rules, reason", [
    ("rules:\n  - name: a\n    emotions: [furious]\n", r"emotion_rules\.yml, line 2: rule 'a': unknown emotion\(s\) \['furious'\]"),
    (None, r"cannot read the rules file emotion_rules\.yml"),
])
def test_a_bad_or_missing_rules_file_stops_training(run, tmp_path, rules, reason):
    bot = make_bot(tmp_path, rules or "")
    if rules is None:
        (bot / "emotion_rules.yml").unlink()
    with pytest.raises(InvalidConfigException, match=reason):
        run(train_bot(bot))


@pytest.mark.parametrize("mode", ["over_http", "in_process"])
def test_rules_naming_labels_the_model_lacks_stop_the_assistant_loading(run, model, angry90, mode):
    """Not an unready assistant that ignores every message: ``load_agent`` raises."""
    if mode == "over_http":
        action, env = EndpointConfig(url="http://127.0.0.1:1/webhook"), {"EMOTION_ANALYZE_URL": "http://127.0.0.1:1/v1/analyze"}
    else:
        action, env = EndpointConfig(actions_module="actions"), {"EMOTION_IN_PROCESS": "true", "EMOTION_MODEL": str(angry90)}
    reason = r"emotion_rules\.yml \(as trained\), line \d+: rule 'angry_caller': unknown emotion\(s\) \['angry'\]"
    with fresh_plugin() if mode == "in_process" else contextlib.nullcontext():
        with pytest.raises(InvalidConfigException, match=reason):
            load(run, model, action, EMOTION_LABELS="happy,neutral,sad", **env)


@pytest.mark.parametrize("env, reason", [
    ({}, "needs somewhere to analyse the audio a message refers to"),
    ({"EMOTION_IN_PROCESS": "true", "EMOTION_DEVICE": "gpu"}, "in_process: EMOTION_DEVICE='gpu': expected auto, cpu, cuda"),
    ({"EMOTION_IN_PROCESS": "true", "EMOTION_MODEL": "/nonexistent/model"}, "in_process: .*/nonexistent/model"),
])
def test_a_bad_setting_stops_the_assistant_loading(run, model, env, reason):
    with fresh_plugin() if env else contextlib.nullcontext():
        with pytest.raises(InvalidConfigException, match=reason):
            load(run, model, EndpointConfig(actions_module="actions"), **env)


@pytest.mark.parametrize("pipeline, fires", [
    (["KeywordIntentClassifier", "emotion_calm.EmotionCommandGenerator", "NLUCommandAdapter"], True),
    (["emotion_calm.EmotionCommandGenerator", "KeywordIntentClassifier", "NLUCommandAdapter"], False),
])
def test_intent_rules_need_the_classifier_before_the_generator(tmp_path, pipeline, fires):
    """Checked on the assistant's own graph, as Rasa Pro's recipe builds it."""
    config = {"recipe": "default.v1", "language": "en", "pipeline": [{"name": name} for name in pipeline],
              "policies": [{"name": "FlowPolicy"}]}
    schema = DefaultV1Recipe().graph_config_for_recipe(config, {}, training_type=TrainingType.BOTH).predict_schema
    rules = tmp_path / "rules.yml"
    rules.write_text("rules:\n" + INTENT_RULE)
    [node] = [name for name, node in schema.nodes.items() if node.uses is EmotionCommandGenerator]
    from rasa.engine.graph import ExecutionContext

    generator = EmotionCommandGenerator.create({"rules": str(rules), "analyze_url": "http://127.0.0.1:1/v1/analyze"}, None,
                                               Resource("emotion"), ExecutionContext(schema, node_name=node))
    if fires:
        generator.start()
    else:
        with pytest.raises(InvalidConfigException, match="angry_complaint .* name intents, but no intent classifier runs before"):
            generator.start()
