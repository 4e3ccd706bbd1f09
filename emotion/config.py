"""Settings, read once from the environment and checked at once."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass

from emotion.errors import ConfigError

DEFAULT_MODEL = "iic/emotion2vec_plus_large"
MODEL_ALIASES = {
    "plus_large": "iic/emotion2vec_plus_large",
    "plus_base": "iic/emotion2vec_plus_base",
    "plus_seed": "iic/emotion2vec_plus_seed",
    "base_finetuned": "iic/emotion2vec_base_finetuned",
}
SAMPLE_RATE_HZ = 16_000
FRAME_HOP_S = 0.02  # one model frame: the conv front end strides 320 samples at 16 kHz
GRANULARITIES = ("utterance", "frame", "segment")
# emotion2vec's nine classes, in its head's order: the one list every part checks against.
LABELS = ("angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "unknown")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    hub: str = "ms"
    device: str = "auto"
    dtype: str = "auto"
    compile: str = "auto"
    labels: tuple[str, ...] = ()  # empty: every label of the model
    # 0 picks per device: batches pay off on a GPU only (packed; on CPU clips run one by one).
    max_batch_size: int = 0
    max_wait_ms: float = 2.0
    max_queue: int = 512
    max_batch_audio_seconds: float = 600.0
    window_seconds: float = 30.0
    segment_seconds: float = 3.0
    segment_hop_seconds: float = 1.5
    max_audio_seconds: float = 300.0
    min_audio_ms: float = 200.0
    max_audio_bytes: int = 16 * 1024 * 1024
    decode_timeout_s: float = 5.0
    fetch_timeout_s: float = 5.0
    turn_timeout_s: float = 15.0
    audio_root: str | None = None
    url_allow: tuple[str, ...] = ()
    warmup: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", MODEL_ALIASES.get(self.model, self.model))
        _check_choice("hub", self.hub, ("ms", "hf", "modelscope", "huggingface"))
        _check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _check_choice("compile", self.compile, ("auto", "on", "off"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device={self.device!r}: expected auto, cpu, cuda or cuda:N")
        _check_range("max_batch_size", self.max_batch_size, 0, 1024)
        _check_range("max_wait_ms", self.max_wait_ms, 0, 1000)
        _check_range("max_queue", self.max_queue, 1, 100_000)
        _check_range("max_batch_audio_seconds", self.max_batch_audio_seconds, 1, 100_000)
        _check_range("window_seconds", self.window_seconds, 1, 120)
        _check_range("segment_seconds", self.segment_seconds, 0.5, self.window_seconds)
        _check_range("segment_hop_seconds", self.segment_hop_seconds, 0.1, self.segment_seconds)
        _check_range("max_audio_seconds", self.max_audio_seconds, 0.1, 24 * 3600)
        _check_range("min_audio_ms", self.min_audio_ms, 30, 10_000)
        _check_range("max_audio_bytes", self.max_audio_bytes, 1024, 2**31)
        for name in ("decode_timeout_s", "fetch_timeout_s", "turn_timeout_s"):
            _check_range(name, getattr(self, name), 0.1, 600)
        for entry in self.url_allow:
            _parse_allow_entry(entry)
        unknown = [lab for lab in self.labels if lab not in LABELS]
        if unknown or len(self.labels) == 1:
            raise ConfigError(f"labels={','.join(self.labels)}: expected two or more of {', '.join(LABELS)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides) -> EngineConfig:
        return read_env(cls, environ, **overrides)

    def allow_networks(self) -> tuple[set[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
        hosts, nets = set(), []
        for entry in self.url_allow:
            parsed = _parse_allow_entry(entry)
            if isinstance(parsed, str):
                hosts.add(parsed)
            else:
                nets.append(parsed)
        return hosts, nets


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """What the action server adds around the engine: rules, the API, alerts, operations."""

    rules_path: str | None = None
    history_turns: int = 20
    api_token: str | None = None
    alert_url: str | None = None
    alert_timeout_s: float = 2.0
    alert_retries: int = 2
    fail_fast: bool = False
    log_text: bool = False
    metrics: bool = True
    engine_process: str = "auto"  # the model in a process of its own: auto = with several Sanic workers

    def __post_init__(self) -> None:
        _check_choice("engine_process", self.engine_process, ("auto", "on", "off"))
        _check_range("history_turns", self.history_turns, 1, 1000)
        _check_range("alert_timeout_s", self.alert_timeout_s, 0.1, 60)
        _check_range("alert_retries", self.alert_retries, 0, 10)
        if self.alert_url is not None and not self.alert_url.startswith(("http://", "https://")):
            raise ConfigError(f"alert_url={self.alert_url!r}: expected an http(s) URL")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides) -> ServerConfig:
        return read_env(cls, environ, **overrides)


def read_env(cls, environ: Mapping[str, str], **overrides):
    """Build a config dataclass from ``EMOTION_*`` variables; blank ones keep the default."""
    values: dict = {}
    for f in dataclasses.fields(cls):
        raw = environ.get(_env_name(f.name))
        if raw is None or raw.strip() == "":
            continue
        values[f.name] = _parse(f, raw.strip())
    values.update(overrides)
    return cls(**values)


_ENV_NAMES = {"model": "EMOTION_MODEL", "rules_path": "EMOTION_RULES", "max_batch_size": "EMOTION_MAX_BATCH"}


def _env_name(field_name: str) -> str:
    return _ENV_NAMES.get(field_name, "EMOTION_" + field_name.upper())


def _parse(f: dataclasses.Field, raw: str):
    env = _env_name(f.name)
    kind = f.type
    try:
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "tuple[str, ...]":
            return tuple(p.strip() for p in raw.split(",") if p.strip())
    except ValueError:
        expected = {"bool": "true or false", "int": "a whole number", "float": "a number"}.get(kind, kind)
        raise ConfigError(f"{env}={raw!r}: expected {expected}") from None
    return raw


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise ConfigError(f"{name}={value!r}: expected a value in [{low}, {high}]")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(allowed)}")


def _parse_allow_entry(entry: str):
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        if not entry or "/" in entry or " " in entry:
            raise ConfigError(f"EMOTION_URL_ALLOW entry {entry!r}: expected a host name, an IP or a network") from None
        return entry.lower().rstrip(".")


__all__ = ["EngineConfig", "ServerConfig", "DEFAULT_MODEL", "GRANULARITIES", "LABELS"]
