"""Windows: how a turn becomes model clips, and clip outputs become one result.

Pure numpy, no torch: the engine's event loop aggregates long turns with it while the GPU
runs the next batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emotion.engine.results import EmotionResult, Head, Segment, result_from_probs
from emotion.errors import ConfigError
from emotion.settings import FRAME_HOP_S, GRANULARITIES, SAMPLE_RATE_HZ


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


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")


def plan_turn(samples: int, granularity: str, *, window_s: float, segment_s: float, segment_hop_s: float) -> Plan:
    check_granularity(granularity)
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
    result = result_from_probs(head.labels, probs, plan.samples / SAMPLE_RATE_HZ)
    if embeddings:
        result.embedding = embedding
    if plan.granularity == "frame":
        result.segments = []
        for (start, _end), out in zip(plan.windows, windows):
            t0 = start / SAMPLE_RATE_HZ
            for k, frame in enumerate(out.frame_probs):
                s = result_from_probs(head.labels, frame, 0.0)
                result.segments.append(Segment(t0 + k * FRAME_HOP_S, t0 + (k + 1) * FRAME_HOP_S, s.emotion, s.confidence, s.scores))
        if embeddings:
            result.frame_embeddings = np.concatenate([o.frame_embeddings for o in windows])
    elif plan.granularity == "segment":
        result.segments = []
        for a, b in plan.segments:
            s = result_from_probs(head.labels, by_span[(a, b)].probs, 0.0)
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
