"""Settings from the environment: parsed once, checked at once, with the value and range in errors."""

import pytest

from emotion.config import EngineConfig, ServerConfig
from emotion.errors import ConfigError


def test_from_env_parses_every_kind():
    config = EngineConfig.from_env({
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
    server = ServerConfig.from_env({"EMOTION_RULES": "/etc/rules.yml", "EMOTION_FAIL_FAST": "yes", "EMOTION_API_TOKEN": "s3cret"})
    assert (server.rules_path, server.fail_fast, server.api_token) == ("/etc/rules.yml", True, "s3cret")


def test_defaults():
    config = EngineConfig.from_env({})
    assert config.model == "iic/emotion2vec_plus_large" and config.device == "auto" and config.audio_root is None
    assert config.url_allow == () and config.labels == ()
    assert ServerConfig.from_env({}).history_turns == 20


@pytest.mark.parametrize("env,message", [
    ({"EMOTION_MAX_BATCH": "many"}, "EMOTION_MAX_BATCH='many': expected a whole number"),
    ({"EMOTION_WARMUP": "perhaps"}, "EMOTION_WARMUP='perhaps': expected true or false"),
    ({"EMOTION_LABELS": "angry,furious"}, "labels=angry,furious: expected two or more of angry"),
    ({"EMOTION_LABELS": "angry"}, "labels=angry: expected two or more"),
    ({"EMOTION_MAX_WAIT_MS": "5000"}, r"max_wait_ms=5000.0: expected a value in \[0, 1000\]"),
    ({"EMOTION_DEVICE": "tpu"}, "device='tpu': expected auto, cpu, cuda or cuda:N"),
    ({"EMOTION_DTYPE": "int8"}, "dtype='int8': expected one of"),
    ({"EMOTION_URL_ALLOW": "good.example, bad/host"}, "EMOTION_URL_ALLOW entry 'bad/host'"),
    ({"EMOTION_SEGMENT_SECONDS": "60"}, "segment_seconds=60.0"),
])
def test_bad_values_are_refused_with_value_and_range(env, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_env(env)
