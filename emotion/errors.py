"""Every error the engine raises, as one tree. Each carries a stable ``code``.

    EmotionError
    ├── AudioError
    │   ├── BadReference      metadata.audio is malformed            bad_reference
    │   ├── ReferenceRefused  the operator does not allow this source refused
    │   ├── FetchFailed       network or file read failed             fetch_failed
    │   ├── AudioTooLarge     over the byte or duration cap           too_large
    │   ├── DecodeFailed      not audio we can decode                 decode_failed
    │   └── InvalidAudio      empty, too short, non-finite            invalid_audio
    ├── ModelUnavailable      not loaded, failed to load, bad ckpt    model_unavailable
    ├── InferenceFailed       the forward pass failed (e.g. OOM)      inference_failed
    ├── Overloaded            the inference queue is full            overloaded
    ├── TimedOut              the turn ran past its time limit        timeout
    ├── BadResult             metadata.emotion is not a valid result  bad_result
    └── ConfigError           bad settings or rules file              bad_config
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class EmotionError(Exception):
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class AudioError(EmotionError):
    code = "audio_error"


class BadReference(AudioError):
    code = "bad_reference"


class ReferenceRefused(AudioError):
    code = "refused"


class FetchFailed(AudioError):
    code = "fetch_failed"


class AudioTooLarge(AudioError):
    code = "too_large"


class DecodeFailed(AudioError):
    code = "decode_failed"


class InvalidAudio(AudioError):
    code = "invalid_audio"


class ModelUnavailable(EmotionError):
    code = "model_unavailable"


class InferenceFailed(EmotionError):
    code = "inference_failed"


class Overloaded(EmotionError):
    code = "overloaded"


class TimedOut(EmotionError):
    code = "timeout"


class BadResult(EmotionError):
    code = "bad_result"


class ConfigError(EmotionError):
    code = "bad_config"


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def loggable(text, limit: int = 300) -> str:
    """Caller-supplied text for a log line: one line (control characters escaped), bounded,
    so nobody can forge log lines through a sender id or a gateway's error message."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))
    return text[:limit] + ("..." if len(text) > limit else "")
