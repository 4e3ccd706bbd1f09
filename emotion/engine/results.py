"""What an analysis returns, its signature, and the checks on a result that arrived with a message.

Pure numpy and the standard library: Rasa Pro's command generator imports it without torch.

A signed result carries ``signature = {"issued_at": <Unix seconds>, "hmac": <hex>}``: HMAC-SHA256,
under the shared ``EMOTION_RESULT_KEY``, of the fields Rasa takes (``SIGNED_FIELDS``) and the
issue time, serialised as compact JSON with sorted keys and every number as a float, so that a
gateway that rewrites ``1.0`` as ``1`` on the way does not break it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

from emotion.errors import BadResult, EmotionError
from emotion.settings import RESULT_MAX_AGE_S

# What Rasa keeps of an utterance result; the signature covers exactly these.
SIGNED_FIELDS = ("emotion", "confidence", "scores", "duration_s", "model")
_SIGNATURE_VERSION = "emotion-result-v1"  # in the signed bytes: a later format cannot be mistaken for this one


@dataclass
class Segment:
    start_s: float
    end_s: float
    emotion: str
    confidence: float
    scores: dict[str, float]


@dataclass
class EmotionResult:
    emotion: str
    confidence: float
    scores: dict[str, float]
    duration_s: float
    segments: list[Segment] | None = None
    embedding: np.ndarray | None = None
    frame_embeddings: np.ndarray | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {
            "emotion": self.emotion,
            "confidence": round(self.confidence, 6),
            "scores": _rounded(self.scores),
            "duration_s": round(self.duration_s, 3),
        }
        if self.segments is not None:
            out["segments"] = [
                {"start_s": round(s.start_s, 3), "end_s": round(s.end_s, 3), "emotion": s.emotion,
                 "confidence": round(s.confidence, 6), "scores": _rounded(s.scores)}
                for s in self.segments
            ]
        if self.embedding is not None:
            out["embedding"] = self.embedding.tolist()
        return out


def sign_result(value: dict, key: str, issued_at: int | None = None) -> dict:
    """The ``signature`` the analysis API adds to an utterance result (``issued_at``: now)."""
    issued_at = int(time.time()) if issued_at is None else issued_at
    return {"issued_at": issued_at, "hmac": _mac(value, issued_at, key)}


def check_signature(value: dict, key: str, max_age_s: float = RESULT_MAX_AGE_S, now: float | None = None) -> None:
    """Raises ``BadResult`` unless ``value`` carries a signature made with ``key`` over these
    very fields, issued within ``max_age_s`` of ``now`` (either way: hosts' clocks differ)."""
    signature = value.get("signature")
    if signature is None:
        raise BadResult("metadata.emotion is not signed; with a result key set, only results the analysis API signed are taken")
    issued_at = signature.get("issued_at") if isinstance(signature, dict) else None
    mac = signature.get("hmac") if isinstance(signature, dict) else None
    if not isinstance(issued_at, int) or isinstance(issued_at, bool) or not isinstance(mac, str):
        raise BadResult("metadata.emotion.signature must be {issued_at: Unix seconds, hmac: hex}")
    if not hmac.compare_digest(mac.encode(), _mac(value, issued_at, key).encode()):
        raise BadResult("metadata.emotion.signature does not match: not signed with this key, or changed since")
    age_s = (time.time() if now is None else now) - issued_at
    if age_s > max_age_s:
        raise BadResult(f"metadata.emotion was signed {age_s:.0f} s ago; results older than {max_age_s:g} s are refused")
    if age_s < -max_age_s:
        raise BadResult(f"metadata.emotion was issued in the future ({-age_s:.0f} s ahead); the clocks of the analysis "
                        "API and this host differ")


def _mac(value: dict, issued_at: int, key: str) -> str:
    return hmac.new(key.encode(), _signed_bytes(value, issued_at), hashlib.sha256).hexdigest()


def _signed_bytes(value: dict, issued_at: int) -> bytes:
    scores = value.get("scores")
    fields = {name: value.get(name) for name in SIGNED_FIELDS}
    try:
        fields["confidence"] = _canonical_number(fields["confidence"])
        fields["duration_s"] = _canonical_number(fields["duration_s"])
        if isinstance(scores, dict):
            fields["scores"] = {str(k): _canonical_number(v) for k, v in scores.items()}
        return json.dumps([_SIGNATURE_VERSION, issued_at, fields], sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode()
    except (TypeError, ValueError, OverflowError):  # NaN, 10**400, a type JSON lacks: nothing the API signs
        raise BadResult("metadata.emotion holds values that are not JSON numbers, strings or objects") from None


def _canonical_number(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x


def result_from_metadata(value, labels, *, key: str | None = None, max_age_s: float = RESULT_MAX_AGE_S) -> EmotionResult:
    """Check an utterance result that arrived with the message (``metadata.emotion``, as
    ``/v1/analyze`` returns it) and take it as this turn's result. With ``key``, only a
    result signed with it within ``max_age_s`` is taken. ``{"error": {code, message}}``
    raises that error, so the turn says why it has no tag."""
    if not isinstance(value, dict):
        raise BadResult(f"metadata.emotion must be an object, got {type(value).__name__}")
    if "error" in value:
        # Taken unsigned even with a key: the channel writes it when the API did not answer,
        # and it only ever clears the tag, never escalates.
        error = value["error"] if isinstance(value["error"], dict) else {}
        exc = EmotionError(str(error.get("message") or "the analysis failed before the message arrived")[:300])
        code = error.get("code")
        exc.code = code if isinstance(code, str) and code.isidentifier() and len(code) <= 40 else "upstream_error"
        raise exc
    if key is not None:
        check_signature(value, key, max_age_s)
    scores, emotion, confidence = value.get("scores"), value.get("emotion"), value.get("confidence")
    if not isinstance(scores, dict) or not scores:
        raise BadResult("metadata.emotion.scores must be an object of label: probability")
    unknown = sorted(k for k in scores if k not in labels)
    if unknown:
        raise BadResult(f"metadata.emotion names labels the model does not have: {unknown}")
    if not all(_probability(p) for p in scores.values()) or abs(sum(scores.values()) - 1.0) > 0.01:
        raise BadResult("metadata.emotion.scores must be probabilities in [0, 1] that sum to 1")
    if emotion not in scores or not _probability(confidence) or abs(confidence - scores[emotion]) > 1e-3:
        raise BadResult("metadata.emotion.emotion must be a scored label, with its score as confidence")
    duration = value.get("duration_s", 0.0)
    duration = float(duration) if _number(duration) and duration >= 0 else 0.0
    return EmotionResult(emotion, float(confidence), {k: float(v) for k, v in scores.items()}, duration)


def _number(x) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int past float's range, as JSON allows (10**400): np.isfinite raised TypeError
        return False


def _probability(x) -> bool:
    return _number(x) and 0.0 <= x <= 1.0


@dataclass(frozen=True)
class Head:
    """The classification head as numpy arrays, restricted to the labels in use."""

    labels: tuple[str, ...]
    weight: np.ndarray  # (labels, dim)
    bias: np.ndarray  # (labels,)

    def probs(self, x: np.ndarray) -> np.ndarray:
        logits = x.astype(np.float64) @ self.weight.T.astype(np.float64) + self.bias
        logits -= logits.max(axis=-1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def result_from_probs(labels, probs: np.ndarray, duration_s: float) -> EmotionResult:
    best = int(np.argmax(probs))
    return EmotionResult(labels[best], float(probs[best]), {lab: float(p) for lab, p in zip(labels, probs)}, duration_s)


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in scores.items()}

