"""What an analysis returns, and the checks on a result that arrived with a message.

Pure numpy: Rasa Pro's command generator imports it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from emotion.errors import BadResult, EmotionError


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


def result_from_metadata(value, labels) -> EmotionResult:
    """Check an utterance result that arrived with the message (``metadata.emotion``, as
    ``/v1/analyze`` returns it) and take it as this turn's result. ``{"error": {code,
    message}}`` raises that error, so the turn says why it has no tag."""
    if not isinstance(value, dict):
        raise BadResult(f"metadata.emotion must be an object, got {type(value).__name__}")
    if "error" in value:
        error = value["error"] if isinstance(value["error"], dict) else {}
        exc = EmotionError(str(error.get("message") or "the analysis failed before the message arrived")[:300])
        code = error.get("code")
        exc.code = code if isinstance(code, str) and code.isidentifier() and len(code) <= 40 else "upstream_error"
        raise exc
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
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


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

