"""The engine: audio reference → decoded clip → batched inference → EmotionResult."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from emotion.audio import FRAME_HOP_S, SAMPLE_RATE_HZ, decode_audio
from emotion.batching import MicroBatcher
from emotion.config import GRANULARITIES, EngineConfig
from emotion.errors import ConfigError, ModelUnavailable, TimedOut
from emotion.sources import AudioFetcher, AudioRef

log = logging.getLogger(__name__)


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
            "scores": {k: round(v, 6) for k, v in self.scores.items()},
            "duration_s": round(self.duration_s, 3),
        }
        if self.segments is not None:
            out["segments"] = [
                {"start_s": round(s.start_s, 3), "end_s": round(s.end_s, 3), "emotion": s.emotion,
                 "confidence": round(s.confidence, 6), "scores": {k: round(v, 6) for k, v in s.scores.items()}}
                for s in self.segments
            ]
        if self.embedding is not None:
            out["embedding"] = self.embedding.tolist()
        return out


@dataclass
class _Clip:
    """One model input: a whole turn, or one window of a long turn or of a segment split."""

    wave: np.ndarray
    frames: bool = False
    embeddings: bool = False


class EmotionEngine:
    """Loads emotion2vec once and serves analyses from any number of concurrent callers."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig.from_env()
        self.model = None
        self.error: str | None = None
        self.warm = False
        self._batcher: MicroBatcher | None = None
        self._fetcher: AudioFetcher | None = None
        self._decoder = concurrent.futures.ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 2)), thread_name_prefix="emotion-decode")
        self._loading: asyncio.Future | None = None
        self.on_batch = None  # metrics hook: (batch_size, seconds)
        self.tracer = None  # an OpenTelemetry tracer, when the host has tracing configured

    # -- lifecycle -------------------------------------------------------------------

    def load(self) -> EmotionEngine:
        """Load and warm the model in this thread (CLI, benchmarks, tests)."""
        from emotion.model import EmotionModel

        try:
            self.model = EmotionModel(
                self.config.model, hub=self.config.hub, device=self.config.device, dtype=self.config.dtype, compile=self.config.compile
            )
        except ModelUnavailable as exc:
            self.error = exc.message
            raise
        if self.config.warmup:
            self._warmup()
        self.warm = True
        log.info("emotion model %s ready on %s (%s), labels %s", self.config.model, self.model.device, self.model.dtype_name, self.model.labels)
        return self

    async def start(self) -> None:
        """Load in a worker thread (unless loaded already); concurrent callers share one load."""
        if self.model is None or not self.warm:
            if self._loading is None:
                self._loading = asyncio.ensure_future(asyncio.to_thread(self.load))
            await asyncio.shield(self._loading)
        self._ensure_batcher()

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        if self._fetcher is not None:
            await self._fetcher.aclose()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    @property
    def max_batch_size(self) -> int:
        if self.config.max_batch_size:
            return self.config.max_batch_size
        return 64 if self.model is not None and self.model.device.type == "cuda" else 1

    def status(self) -> dict:
        model = self.model
        return {
            "ready": self.warm and self.error is None,
            "model": self.config.model,
            "device": str(model.device) if model else None,
            "dtype": model.dtype_name if model else None,
            "labels": model.labels if model else None,
            "max_batch_size": self.max_batch_size if model else None,
            "queue_depth": self._batcher.depth if self._batcher else 0,
            "error": self.error,
        }

    def _warmup(self) -> None:
        # Typical turns; on a GPU also the longest window and full batches with and without
        # padding. There each shape family is a separately compiled graph, and compiling one
        # while callers wait stalls every conversation for seconds (holding the GIL).
        batch, window = self.max_batch_size, self.config.window_seconds
        shapes = [[1.0], [5.0]]
        if batch > 1:
            n = max(2, min(batch, int(self.config.max_batch_audio_seconds // window)))
            shapes += [
                [window],
                [5.0] * batch,
                [1.0 + 4.0 * i / batch for i in range(batch)],
                [1.0 + (window - 1.0) * i / (n - 1) for i in range(n)],
            ]
        rng = np.random.default_rng(0)
        for lengths_s in shapes:
            self.model.forward([rng.standard_normal(int(s * SAMPLE_RATE_HZ)).astype(np.float32) * 0.1 for s in lengths_s])

    def _ensure_batcher(self) -> MicroBatcher:
        if self._batcher is None:
            self._batcher = MicroBatcher(
                self._run_clips,
                size=lambda clip: len(clip.wave),
                max_batch_size=self.max_batch_size,
                max_wait_ms=self.config.max_wait_ms,
                max_queue=self.config.max_queue,
                max_batch_cost=self.config.max_batch_audio_seconds * SAMPLE_RATE_HZ,
                on_batch=lambda n, s: self.on_batch and self.on_batch(n, s),
            )
        return self._batcher

    def _run_clips(self, clips: list[_Clip]):
        return self.model.forward(
            [c.wave for c in clips],
            frames=any(c.frames for c in clips),
            embeddings=any(c.embeddings for c in clips),
        )

    # -- analysis --------------------------------------------------------------------

    async def analyze_ref(self, ref: AudioRef, *, granularity: str = "utterance", embeddings: bool = False) -> EmotionResult:
        """Fetch, decode and analyse one turn's audio."""
        if self._fetcher is None:
            self._fetcher = AudioFetcher(self.config)
        started = time.perf_counter()
        data = await self._fetcher.fetch(ref)
        fetched = time.perf_counter()
        result = await self.analyze_bytes(data, encoding=ref.encoding, sample_rate_hz=ref.sample_rate_hz, granularity=granularity, embeddings=embeddings)
        result.timings_ms["fetch"] = (fetched - started) * 1000
        return result

    async def analyze_bytes(self, data: bytes, *, encoding: str | None = None, sample_rate_hz: int | None = None,
                            granularity: str = "utterance", embeddings: bool = False) -> EmotionResult:
        started = time.perf_counter()
        with self._span("emotion.decode", bytes=len(data)):
            wave = await self.decode(data, encoding=encoding, sample_rate_hz=sample_rate_hz)
        decoded = time.perf_counter()
        result = await self.analyze_wave(wave, granularity=granularity, embeddings=embeddings)
        result.timings_ms["decode"] = (decoded - started) * 1000
        return result

    async def decode(self, data: bytes, *, encoding: str | None = None, sample_rate_hz: int | None = None) -> np.ndarray:
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._decoder, self.decode_sync, data, encoding, sample_rate_hz)
        try:
            return await asyncio.wait_for(job, self.config.decode_timeout_s)
        except TimeoutError:
            raise TimedOut(f"decoding took longer than {self.config.decode_timeout_s:g} s") from None

    def decode_sync(self, data: bytes, encoding: str | None = None, sample_rate_hz: int | None = None) -> np.ndarray:
        """Decode within this engine's duration limits (in the calling thread)."""
        return decode_audio(
            data,
            encoding=encoding,
            sample_rate_hz=sample_rate_hz,
            max_seconds=self.config.max_audio_seconds,
            min_seconds=self.config.min_audio_ms / 1000,
        )

    async def analyze_wave(self, wave: np.ndarray, *, granularity: str = "utterance", embeddings: bool = False) -> EmotionResult:
        try:
            await asyncio.wait_for(self.start(), self.config.turn_timeout_s)
        except TimeoutError:
            raise TimedOut("the emotion model is still loading") from None
        clips, spans = self._plan(wave, granularity, embeddings)
        started = time.perf_counter()
        batcher = self._ensure_batcher()
        timeout = self.config.turn_timeout_s
        with self._span("emotion.inference", clips=len(clips), audio_seconds=round(len(wave) / SAMPLE_RATE_HZ, 3)):
            try:
                outputs = await asyncio.wait_for(asyncio.gather(*(batcher.submit(c, timeout_s=timeout) for c in clips)), timeout)
            except TimeoutError:
                raise TimedOut(f"inference took longer than {timeout:g} s") from None
        result = self._assemble(wave, granularity, spans, outputs, embeddings)
        result.timings_ms["inference"] = (time.perf_counter() - started) * 1000
        return result

    def analyze_waves(self, waves: Sequence[np.ndarray], *, granularity: str = "utterance", embeddings: bool = False) -> list[EmotionResult]:
        """Synchronous batch analysis (CLI, benchmarks): every clip of every wave in one batched run."""
        if self.model is None:
            self.load()
        plans = [self._plan(w, granularity, embeddings) for w in waves]
        clips = [c for plan in plans for c in plan[0]]
        order = sorted(range(len(clips)), key=lambda i: len(clips[i].wave), reverse=True)
        outputs: list = [None] * len(clips)
        step = max(1, self.max_batch_size)
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            for i, out in zip(idx, self._run_clips([clips[i] for i in idx])):
                outputs[i] = out
        results, pos = [], 0
        for wave, (plan_clips, spans) in zip(waves, plans):
            results.append(self._assemble(wave, granularity, spans, outputs[pos : pos + len(plan_clips)], embeddings))
            pos += len(plan_clips)
        return results

    def _span(self, name: str, **attributes):
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(name, attributes=attributes)

    def _plan(self, wave: np.ndarray, granularity: str, embeddings: bool) -> tuple[list[_Clip], list[tuple[int, int]]]:
        if granularity not in GRANULARITIES:
            raise ConfigError(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
        if granularity == "segment":
            size, hop = int(self.config.segment_seconds * SAMPLE_RATE_HZ), int(self.config.segment_hop_seconds * SAMPLE_RATE_HZ)
        else:
            size = hop = int(self.config.window_seconds * SAMPLE_RATE_HZ)
        spans = _windows(len(wave), size, hop)
        frames = granularity == "frame"
        clips = [_Clip(wave[a:b], frames=frames, embeddings=embeddings or len(spans) > 1) for a, b in spans]
        return clips, spans

    def _assemble(self, wave, granularity, spans, outputs, embeddings) -> EmotionResult:
        labels = self.model.labels
        if len(outputs) == 1:
            probs, embedding = outputs[0].probs, outputs[0].embedding
        else:
            # A long turn is cut into windows; the turn's embedding is the frame-weighted
            # mean of the windows' embeddings, and the head scores that mean: for one
            # window this is exactly what the model does for a whole clip.
            weights = np.array([o.frames for o in outputs], dtype=np.float64)
            embedding = (np.stack([o.embedding for o in outputs]) * weights[:, None]).sum(0) / weights.sum()
            probs = self.model.probs_from_embedding(embedding.astype(np.float32))
        result = _result(labels, probs, len(wave) / SAMPLE_RATE_HZ)
        if embeddings:
            result.embedding = embedding
        if granularity == "frame":
            result.segments = []
            for (start, _end), out in zip(spans, outputs):
                t0 = start / SAMPLE_RATE_HZ
                for k, frame in enumerate(out.frame_probs):
                    s = _result(labels, frame, 0.0)
                    result.segments.append(Segment(t0 + k * FRAME_HOP_S, t0 + (k + 1) * FRAME_HOP_S, s.emotion, s.confidence, s.scores))
            if embeddings:
                result.frame_embeddings = np.concatenate([o.frame_embeddings for o in outputs])
        elif granularity == "segment":
            result.segments = []
            for (a, b), out in zip(spans, outputs):
                s = _result(labels, out.probs, 0.0)
                result.segments.append(Segment(a / SAMPLE_RATE_HZ, b / SAMPLE_RATE_HZ, s.emotion, s.confidence, s.scores))
        return result


def _result(labels: list[str], probs: np.ndarray, duration_s: float) -> EmotionResult:
    best = int(np.argmax(probs))
    return EmotionResult(labels[best], float(probs[best]), {lab: float(p) for lab, p in zip(labels, probs)}, duration_s)


def _windows(n: int, size: int, hop: int) -> list[tuple[int, int]]:
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
