"""Settings: one typed object, read once from ``EMOTION_*`` variables and checked at once.

Each field is documented here and only here: ``docs/configuration.md`` is generated from
these fields (``python -m emotion settings --markdown``) and a test fails when they differ.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass

from emotion.errors import ConfigError

DEFAULT_MODEL = "iic/emotion2vec_plus_large"
DEFAULT_ONNX_CACHE_DIR = "~/.cache/emotion2vec-rasa/onnx"
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
GROUPS = ("model", "batching", "audio", "sources", "rules", "api", "alerts", "operations")
# A signed result is taken this long after the analysis API issued it (either way, for
# clocks that differ between hosts): long enough for a turn through Rasa, short enough
# that a result copied from a tracker or a log is soon worth nothing.
RESULT_MAX_AGE_S = 300.0
MIN_RESULT_KEY_CHARS = 16
# Read by Rasa Pro's EmotionCommandGenerator (domain_snippets/calm), which may share this
# environment when Rasa Pro runs the actions itself: not settings of the engine, yet no typo.
READ_BY_RASA_PRO = ("EMOTION_ANALYZE_URL", "EMOTION_IN_PROCESS")
# Read no more: each meant something the settings now say apart.
_RETIRED = {"EMOTION_MAX_QUEUE": "EMOTION_MAX_TURNS_IN_FLIGHT, EMOTION_MAX_QUEUED_CLIPS or EMOTION_MAX_URL_CONNECTIONS"}


def _setting(default, group: str, doc: str, *, env: str | None = None, low: float | None = None, high: float | None = None,
             choices: tuple[str, ...] = (), secret: bool = False):
    # A secret stays out of the settings' repr, so a log line or traceback never shows it.
    return dataclasses.field(default=default, repr=not secret, metadata={"group": group, "doc": doc, "env": env, "low": low,
                                                                         "high": high, "choices": choices, "secret": secret})


@dataclass(frozen=True, kw_only=True)
class Settings:
    # -- model
    model: str = _setting(DEFAULT_MODEL, "model", "Hub id, alias (`plus_large`, `plus_base`, `plus_seed`, `base_finetuned`) "
                          "or local directory in FunASR's layout (`config.yaml`, `model.pt`, `tokens.txt`).")
    hub: str = _setting("ms", "model", "Where hub ids download from: `ms` (ModelScope) or `hf` (Hugging Face).",
                        choices=("ms", "hf", "modelscope", "huggingface"))
    device: str = _setting("auto", "model", "`auto` (the GPU if torch sees one), `cpu`, `cuda` or `cuda:N`.")
    dtype: str = _setting("auto", "model", "`auto` (bf16 on GPUs that have it, else fp16; fp32 on CPU), `float32`, `bfloat16` "
                          "or `float16`; `int8` (dynamically quantised weights) with the onnx runtime only.",
                          choices=("auto", "float32", "bfloat16", "float16", "int8"))
    runtime: str = _setting("auto", "model", "What runs the model: `torch` (FunASR's own forward) or `onnx` (ONNX Runtime on "
                            "an export made once and cached, CPU only, [onnx.md](onnx.md)); `auto`: onnx on the CPU when "
                            "the `onnx` extra (onnxruntime, onnx, onnxscript) is installed and the dtype is `auto` or `float32`, "
                            "torch otherwise and always on CUDA.", choices=("auto", "torch", "onnx"))
    onnx_cache_dir: str = _setting(DEFAULT_ONNX_CACHE_DIR, "model", "Where the onnx runtime keeps its exports, one "
                                   "per checkpoint content and precision; a changed checkpoint is exported afresh. Nothing "
                                   "is ever removed from it: delete files there to free the space.")
    compile: str = _setting("auto", "model", "`torch.compile` the conv front end and, on CUDA, the transformer blocks for packed "
                            "batches (`auto`: on CUDA only). Packing needs it: with `off`, clips run one at a time through "
                            "FunASR's own forward.", choices=("auto", "on", "off"))
    labels: tuple[str, ...] = _setting((), "model", "Comma-separated labels to keep, e.g. `angry,happy,neutral,sad`: scores are "
                                       "renormalised over them (a softmax over their logits alone); slots, rules, the API and "
                                       "`metadata.emotion` checks then speak only these. Empty: every label of the model.")
    warmup: bool = _setting(True, "model", "Run warm-up batches before `/ready` says ready.")
    # -- batching and admission
    max_batch_size: int = _setting(0, "batching", "Clips per forward pass; `0` picks per device: 64 on a GPU (packed), 1 on CPU.",
                                   env="EMOTION_MAX_BATCH", low=0, high=1024)
    max_wait_ms: float = _setting(2.0, "batching", "How long an idle engine waits for more turns before it runs one.", low=0, high=1000)
    max_batch_audio_seconds: float = _setting(600.0, "batching", "Audio per packed batch (bounds GPU memory).", low=1, high=100_000)
    max_turns_in_flight: int = _setting(512, "batching", "Turns in progress (fetching, decoding, waiting, running) before a new "
                                        "turn gets `overloaded` at once, before its audio is read. A turn that at the recent "
                                        "inference rate would finish past the turn limit is refused the same way.",
                                        low=1, high=100_000)
    max_queued_clips: int = _setting(512, "batching", "Clips that may wait for inference; past it a clip gets `overloaded`.",
                                     low=1, high=100_000)
    turn_timeout_s: float = _setting(15.0, "batching", "One deadline for a turn: fetch, decode, the wait for a loading model and "
                                     "inference.", low=0.1, high=600)
    # -- audio
    max_audio_seconds: float = _setting(300.0, "audio", "Longer audio is refused from its header; so is audio of more than this "
                                        "many seconds x 384,000 samples over all its channels.", low=0.1, high=24 * 3600)
    min_audio_ms: float = _setting(200.0, "audio", "Shorter audio is refused.", low=30, high=10_000)
    max_audio_bytes: int = _setting(16 * 1024 * 1024, "audio", "Byte cap for every kind of audio: uploads, URLs, paths, base64.",
                                    low=1024, high=2**31)
    decode_timeout_s: float = _setting(5.0, "audio", "Time limit for decoding one turn.", low=0.1, high=600)
    window_seconds: float = _setting(30.0, "audio", "Longer turns are cut into windows of this length and aggregated.",
                                     low=1, high=120)
    segment_seconds: float = _setting(3.0, "audio", "Window length for `segment` granularity.", low=0.5, high=120)
    segment_hop_seconds: float = _setting(1.5, "audio", "Hop between `segment` windows.", low=0.1, high=120)
    # -- sources
    audio_root: str | None = _setting(None, "sources", "Directory that `path` references may read from; unset, they are refused.")
    url_allow: tuple[str, ...] = _setting((), "sources", "Comma-separated hosts or networks that URL fetches may reach although "
                                          "they are internal (loopback, private, link-local).")
    fetch_timeout_s: float = _setting(5.0, "sources", "Time limit for fetching a URL.", low=0.1, high=600)
    max_url_connections: int = _setting(512, "sources", "Connections to audio URLs a process keeps (idle ones close after 5 s).",
                                        low=1, high=100_000)
    # -- rules
    rules_path: str | None = _setting(None, "rules", "Escalation rules file (YAML); unset, one rule: angry at 0.7 or more.",
                                      env="EMOTION_RULES")
    history_turns: int = _setting(20, "rules", "Analysed turns kept in the `emotion_history` slot.", low=1, high=1000)
    # -- analysis API
    api_token: str | None = _setting(None, "api", "Token the action server requires on `/webhook`, the analysis API and "
                                     "`/metrics` (`Authorization: Bearer ...`, or Rasa's `action_endpoint: token`); unset, "
                                     "they are open to anyone who reaches the port.", secret=True)
    result_key: str | None = _setting(None, "api", "Key (16 or more characters, e.g. `openssl rand -hex 32`) that signs each "
                                      "utterance result of the analysis API; `action_analyze_emotion` then takes "
                                      "`metadata.emotion` only when signed with it and fresh. Give Rasa Pro's "
                                      "`EmotionCommandGenerator` the same. Unset: results go unsigned and `metadata.emotion` is "
                                      "taken from any channel ([security.md](security.md#who-may-set-metadataemotion)).",
                                      secret=True)
    result_max_age_s: float = _setting(RESULT_MAX_AGE_S, "api", "With `EMOTION_RESULT_KEY`: how long after signing a result is "
                                       "taken (either way, for clocks that differ between hosts).", low=1, high=86_400)
    metrics: bool = _setting(True, "api", "Serve `/metrics` (Prometheus).")
    max_upload_bytes_in_flight: int = _setting(256 * 1024 * 1024, "api", "Bytes of request bodies the analysis API holds at "
                                               "once, arriving or waiting for their answer; past it a new upload gets "
                                               "`overloaded` (503). A body must arrive within `EMOTION_TURN_TIMEOUT_S`.",
                                               low=1024, high=2**40)
    # -- alerts
    alert_url: str | None = _setting(None, "alerts", "Where escalation alerts are POSTed (JSON); unset, none are sent.")
    alert_timeout_s: float = _setting(2.0, "alerts", "Time limit for one alert.", low=0.1, high=60)
    alert_retries: int = _setting(2, "alerts", "Retries of a failed alert, with backoff.", low=0, high=10)
    # -- operations
    fail_fast: bool = _setting(False, "operations", "Exit at startup if the model cannot load (else turns get `emotion_error` "
                               "and `/ready` says why).")
    log_text: bool = _setting(False, "operations", "Also log transcripts.")
    engine_process: str = _setting("auto", "operations", "The model in a process of its own that every Sanic worker sends its "
                                   "decoded turns to: `auto` with several workers (`ACTION_SERVER_SANIC_WORKERS`), `on` with one "
                                   "too, `off` for a model in each worker.", choices=("auto", "on", "off"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", MODEL_ALIASES.get(self.model, self.model))
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["choices"] and value not in meta["choices"]:
                raise ConfigError(f"{env_name(f)}={value!r}: expected one of {', '.join(meta['choices'])}")
            if meta["low"] is not None and not (meta["low"] <= value <= meta["high"]):
                raise ConfigError(f"{env_name(f)}={value!r}: expected a value in [{meta['low']:g}, {meta['high']:g}]")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"EMOTION_DEVICE={self.device!r}: expected auto, cpu, cuda or cuda:N")
        if self.runtime == "onnx" and self.device.startswith("cuda"):
            raise ConfigError(f"EMOTION_RUNTIME=onnx runs on the CPU only: expected EMOTION_DEVICE=cpu or auto, got "
                              f"{self.device!r}")
        if self.runtime == "onnx" and self.dtype in ("bfloat16", "float16"):
            raise ConfigError(f"EMOTION_DTYPE={self.dtype!r}: the onnx runtime runs auto, float32 or int8")
        if self.dtype == "int8" and self.runtime != "onnx":
            raise ConfigError(f"EMOTION_DTYPE='int8': only with EMOTION_RUNTIME=onnx (got {self.runtime!r})")
        if self.segment_seconds > self.window_seconds or self.segment_hop_seconds > self.segment_seconds:
            raise ConfigError(f"EMOTION_SEGMENT_HOP_SECONDS={self.segment_hop_seconds:g}, EMOTION_SEGMENT_SECONDS="
                              f"{self.segment_seconds:g}, EMOTION_WINDOW_SECONDS={self.window_seconds:g}: expected hop <= "
                              "segment <= window")
        for entry in self.url_allow:
            _parse_allow_entry(entry)
        unknown = [lab for lab in self.labels if lab not in LABELS]
        if unknown or len(self.labels) == 1:
            raise ConfigError(f"EMOTION_LABELS={','.join(self.labels)}: expected two or more of {', '.join(LABELS)}")
        if self.result_key is not None and len(self.result_key) < MIN_RESULT_KEY_CHARS:
            # Never the value: it is a secret.
            raise ConfigError(f"EMOTION_RESULT_KEY: expected at least {MIN_RESULT_KEY_CHARS} characters, got "
                              f"{len(self.result_key)}")
        if self.alert_url is not None and not self.alert_url.startswith(("http://", "https://")):
            raise ConfigError(f"EMOTION_ALERT_URL={self.alert_url!r}: expected an http(s) URL")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides) -> Settings:
        """Settings from ``EMOTION_*`` variables (blank ones keep the default), then ``overrides``.
        An ``EMOTION_*`` variable that names no setting is refused: a typo must not pass unseen."""
        fields = {env_name(f): f for f in dataclasses.fields(cls)}
        values: dict = {}
        for name, raw in environ.items():
            if not name.startswith("EMOTION_") or name in READ_BY_RASA_PRO:
                continue
            if name in _RETIRED:
                raise ConfigError(f"{name} is no longer read: set {_RETIRED[name]} instead")
            if name not in fields:
                close = difflib.get_close_matches(name, fields, n=1)
                raise ConfigError(f"{name}: no such setting" + (f"; did you mean {close[0]}?" if close else ""))
            if raw.strip():
                values[fields[name].name] = _parse(fields[name], raw.strip())
        values.update(overrides)
        return cls(**values)

    def allow_networks(self) -> tuple[set[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
        hosts, nets = set(), []
        for entry in self.url_allow:
            parsed = _parse_allow_entry(entry)
            if isinstance(parsed, str):
                hosts.add(parsed)
            else:
                nets.append(parsed)
        return hosts, nets


def env_name(f: dataclasses.Field) -> str:
    return f.metadata["env"] or "EMOTION_" + f.name.upper()


def reference_markdown() -> str:
    """The configuration reference, generated from the fields (docs/configuration.md)."""
    lines = ["# Configuration", "",
             "<!-- Generated by `python -m emotion settings --markdown` from emotion/settings.py; a test keeps them equal. -->",
             "", "Read once from the environment at startup and checked at once: a bad value, or an `EMOTION_*` variable "
             "that names no setting, stops the server with the variable, the value and what is allowed.", ""]
    for group in GROUPS:
        lines += [f"## {group.capitalize() if group != 'api' else 'Analysis API'}", "", "| variable | default | meaning |",
                  "|---|---|---|"]
        for f in dataclasses.fields(Settings):
            if f.metadata["group"] != group:
                continue
            default = f.default
            shown = "unset" if default is None else "empty" if default == () else str(default).lower() if isinstance(
                default, bool) else f"{default:g}" if isinstance(default, float) else str(default)
            allowed = f" Range: {f.metadata['low']:g} to {f.metadata['high']:g}." if f.metadata["low"] is not None else ""
            secret = "**Secret.** " if f.metadata["secret"] else ""
            lines.append(f"| `{env_name(f)}` | `{shown}` | {secret}{f.metadata['doc']}{allowed} |")
        lines.append("")
    return "\n".join(lines)


def _parse(f: dataclasses.Field, raw: str):
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
        raise ConfigError(f"{env_name(f)}={raw!r}: expected {expected}") from None
    return raw


def _parse_allow_entry(entry: str):
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        if not entry or "/" in entry or " " in entry:
            raise ConfigError(f"EMOTION_URL_ALLOW entry {entry!r}: expected a host name, an IP or a network") from None
        return entry.lower().rstrip(".")


__all__ = ["Settings", "DEFAULT_MODEL", "GRANULARITIES", "LABELS", "reference_markdown"]
