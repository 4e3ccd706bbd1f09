"""Settings from the environment: parsed once, checked at once, with the value and range in errors."""

import dataclasses

import pytest
from conftest import ROOT

from emotion.errors import ConfigError
from emotion.settings import Settings


def test_from_env_parses_every_kind():
    config = Settings.from_env({
        "EMOTION_MODEL": "plus_base", "EMOTION_MAX_BATCH": "16", "EMOTION_MAX_WAIT_MS": "2.5", "EMOTION_FAIL_FAST": "yes",
        "EMOTION_URL_ALLOW": "recordings.example.com, 10.1.0.0/16", "EMOTION_RULES": "/etc/rules.yml", "EMOTION_DEVICE": "cuda:1",
        "UNRELATED": "x",
    })
    assert config.model == "iic/emotion2vec_plus_base"
    assert (config.max_batch_size, config.max_wait_ms) == (16, 2.5)
    assert config.url_allow == ("recordings.example.com", "10.1.0.0/16")
    hosts, nets = config.allow_networks()
    assert hosts == {"recordings.example.com"} and [str(n) for n in nets] == ["10.1.0.0/16"]
    assert config.device == "cuda:1"
    server = Settings.from_env({"EMOTION_RULES": "/etc/rules.yml", "EMOTION_FAIL_FAST": "yes", "EMOTION_API_TOKEN": "s3cret"})
    assert (server.rules_path, server.fail_fast, server.api_token) == ("/etc/rules.yml", True, "s3cret")


def test_the_rasa_pro_generators_variables_are_no_typos():
    """With the actions inside Rasa Pro, the engine reads Rasa Pro's environment, where
    EmotionCommandGenerator's own variables are set too."""
    config = Settings.from_env({"EMOTION_IN_PROCESS": "true", "EMOTION_ANALYZE_URL": "http://localhost:5055/v1/analyze"})
    assert config == Settings()


def test_the_three_meanings_of_the_old_queue_setting_are_three_settings():
    config = Settings.from_env({"EMOTION_MAX_TURNS_IN_FLIGHT": "8", "EMOTION_MAX_QUEUED_CLIPS": "16", "EMOTION_MAX_URL_CONNECTIONS": "4"})
    assert (config.max_turns_in_flight, config.max_queued_clips, config.max_url_connections) == (8, 16, 4)


def test_the_configuration_reference_is_generated_from_the_settings():
    """docs/configuration.md is `python -m emotion settings --markdown`; every setting is in it once."""
    from emotion.settings import env_name, reference_markdown

    assert (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8") == reference_markdown()
    for f in dataclasses.fields(Settings):
        assert reference_markdown().count(f"| `{env_name(f)}` |") == 1


def test_defaults():
    config = Settings.from_env({})
    assert config.model == "iic/emotion2vec_plus_large" and config.device == "auto" and config.audio_root is None
    assert config.url_allow == () and config.labels == ()
    assert Settings.from_env({}).history_turns == 20


@pytest.mark.parametrize("env,message", [
    ({"EMOTION_MAX_BATCH": "many"}, "EMOTION_MAX_BATCH='many': expected a whole number"),
    ({"EMOTION_WARMUP": "perhaps"}, "EMOTION_WARMUP='perhaps': expected true or false"),
    ({"EMOTION_LABELS": "angry,furious"}, "EMOTION_LABELS=angry,furious: expected two or more of angry"),
    ({"EMOTION_LABELS": "angry"}, "EMOTION_LABELS=angry: expected two or more"),
    ({"EMOTION_MAX_WAIT_MS": "5000"}, r"EMOTION_MAX_WAIT_MS=5000.0: expected a value in \[0, 1000\]"),
    ({"EMOTION_MAX_BATCH": "2000"}, r"EMOTION_MAX_BATCH=2000: expected a value in \[0, 1024\]"),
    ({"EMOTION_TURN_TIMEOUT_S": "nan"}, r"EMOTION_TURN_TIMEOUT_S=nan: expected a value in \[0.1, 600\]"),
    ({"EMOTION_DEVICE": "tpu"}, "EMOTION_DEVICE='tpu': expected auto, cpu, cuda or cuda:N"),
    ({"EMOTION_DTYPE": "int4"}, "EMOTION_DTYPE='int4': expected one of"),
    ({"EMOTION_DTYPE": "int8"}, "EMOTION_DTYPE='int8': only with EMOTION_RUNTIME=onnx"),
    ({"EMOTION_RUNTIME": "onnx", "EMOTION_DEVICE": "cuda"}, "EMOTION_RUNTIME=onnx runs on the CPU only"),
    ({"EMOTION_ENGINE_PROCESS": "sometimes"}, "EMOTION_ENGINE_PROCESS='sometimes': expected one of auto, on, off"),
    ({"EMOTION_ALERT_URL": "ftp://x"}, "EMOTION_ALERT_URL='ftp://x': expected an http"),
    ({"EMOTION_URL_ALLOW": "good.example, bad/host"}, "EMOTION_URL_ALLOW entry 'bad/host'"),
    ({"EMOTION_SEGMENT_SECONDS": "60"}, "EMOTION_SEGMENT_SECONDS=60"),
    ({"EMOTION_MAX_BATCH_SIZE": "8"}, "EMOTION_MAX_BATCH_SIZE: no such setting; did you mean EMOTION_MAX_BATCH"),
    ({"EMOTION_MAX_QUEUE": "64"}, "EMOTION_MAX_QUEUE is no longer read: set EMOTION_MAX_TURNS_IN_FLIGHT, EMOTION_MAX_QUEUED_CLIPS"),
])
def test_bad_values_are_refused_with_value_and_range(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)
