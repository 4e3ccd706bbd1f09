"""Windows and aggregation: how a turn becomes model clips, and clip outputs become a result.

Pure numpy, no torch: the engine's event loop aggregates long turns with it while the GPU
runs the next batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from emotion.config import FRAME_HOP_S, GRANULARITIES, SAMPLE_RATE_HZ
from emotion.errors import BadResult, ConfigError, EmotionError


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


@dataclass(frozen=True)
class Clip:
    """One model input: a whole turn, or one window of a long turn or of a segment split."""

    wave: np.ndarray
    frames: bool = False
    embeddings: bool = False


@dataclass(frozen=True)
class Plan:
    """The spans (in samples) a turn is scored on: ``windows`` give the headline result
    (one span unless the turn is longer than a window), ``segments`` the timeline."""

    granularity: str
    samples: int
    windows: list[tuple[int, int]]
    segments: list[tuple[int, int]]

    @property
    def spans(self) -> list[tuple[int, int]]:
        """Every span that needs a forward pass, each once, windows first."""
        return list(dict.fromkeys(self.windows + self.segments))


def plan_turn(samples: int, granularity: str, *, window_s: float, segment_s: float, segment_hop_s: float) -> Plan:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    window = int(window_s * SAMPLE_RATE_HZ)
    segments = []
    if granularity == "segment":
        segments = split(samples, int(segment_s * SAMPLE_RATE_HZ), int(segment_hop_s * SAMPLE_RATE_HZ))
    return Plan(granularity, samples, split(samples, window, window), segments)


def clips_for(wave: np.ndarray, plan: Plan, embeddings: bool) -> list[Clip]:
    frames = plan.granularity == "frame"
    pooled = embeddings or len(plan.windows) > 1  # windows are aggregated by embedding
    return [Clip(wave[a:b], frames=frames and (a, b) in plan.windows, embeddings=pooled) for a, b in plan.spans]


def assemble(plan: Plan, outputs: list, head: Head, *, embeddings: bool = False) -> EmotionResult:
    """One result from the outputs of ``clips_for(plan)`` (in that order)."""
    by_span = dict(zip(plan.spans, outputs))
    windows = [by_span[s] for s in plan.windows]
    if len(windows) == 1:
        probs, embedding = windows[0].probs, windows[0].embedding
    else:
        # A long turn is cut into windows; the turn's embedding is the frame-weighted mean
        # of the windows' embeddings, and the head scores that mean: for one window this is
        # exactly what the model does for a whole clip.
        weights = np.array([o.frames for o in windows], dtype=np.float64)
        embedding = (np.stack([o.embedding for o in windows]) * weights[:, None]).sum(0) / weights.sum()
        embedding = embedding.astype(np.float32)
        probs = head.probs(embedding)
    result = _result(head.labels, probs, plan.samples / SAMPLE_RATE_HZ)
    if embeddings:
        result.embedding = embedding
    if plan.granularity == "frame":
        result.segments = []
        for (start, _end), out in zip(plan.windows, windows):
            t0 = start / SAMPLE_RATE_HZ
            for k, frame in enumerate(out.frame_probs):
                s = _result(head.labels, frame, 0.0)
                result.segments.append(Segment(t0 + k * FRAME_HOP_S, t0 + (k + 1) * FRAME_HOP_S, s.emotion, s.confidence, s.scores))
        if embeddings:
            result.frame_embeddings = np.concatenate([o.frame_embeddings for o in windows])
    elif plan.granularity == "segment":
        result.segments = []
        for a, b in plan.segments:
            s = _result(head.labels, by_span[(a, b)].probs, 0.0)
            result.segments.append(Segment(a / SAMPLE_RATE_HZ, b / SAMPLE_RATE_HZ, s.emotion, s.confidence, s.scores))
    return result


def split(n: int, size: int, hop: int) -> list[tuple[int, int]]:
    """Windows of ``size`` samples every ``hop``; a tail under half a window is not scored alone."""
    if n <= size:
        return [(0, n)]
    spans = [(s, s + size) for s in range(0, n - size, hop)]
    tail_start = spans[-1][0] + hop
    if (n - tail_start) * 2 >= size:
        spans.append((tail_start, n))
    elif hop == size:
        spans[-1] = (spans[-1][0], n)
    else:
        spans.append((n - size, n))
    return spans


def _result(labels, probs: np.ndarray, duration_s: float) -> EmotionResult:
    best = int(np.argmax(probs))
    return EmotionResult(labels[best], float(probs[best]), {lab: float(p) for lab, p in zip(labels, probs)}, duration_s)


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in scores.items()}
