"""Where inference runs: the interface the engine speaks, and the model in this process.

``EmotionEngine`` does what every layout shares (admission, fetching, decoding, deadlines,
spans, CPU accounting) and hands each decoded turn to its backend: ``InProcessBackend``
here, or the engine process's client (``emotion.serving.engine_process``), which sends it
to the one process that holds the model for every Sanic worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np

from emotion.engine.audio import SAMPLE_RATE_HZ
from emotion.engine.batching import BatchStats, MicroBatcher, plan_batches, run_isolated
from emotion.engine.cpu import timed
from emotion.engine.plan import Clip, Plan, assemble, clips_for, plan_turn
from emotion.engine.results import EmotionResult
from emotion.errors import EmotionError, ModelUnavailable, Overloaded, first_line
from emotion.settings import LABELS, Settings

__all__ = ["Backend", "Backlog", "InProcessBackend"]

log = logging.getLogger(__name__)


class Backlog(NamedTuple):
    """What admission needs to know of a backend: its recent inference rate (0 until a
    batch has run) and the turns others have queued on it besides this engine's (the other
    workers' turns in the engine process; none in process)."""

    clips_per_s: float
    turns_elsewhere: int


class Backend(Protocol):
    """Runs the model for one engine. ``start`` may be awaited by many turns at once and
    shares one load (or connection), raising ``ModelUnavailable`` while there is no model;
    ``infer`` answers one decoded turn, giving up at ``deadline`` (``time.monotonic()``);
    ``status`` is fresh from wherever the model runs; ``close`` releases what belongs to
    the running event loop."""

    warm: bool  # ready to infer
    error: str | None  # why not, when loading failed or the model has gone

    @property
    def labels(self) -> list[str]: ...

    async def start(self) -> None: ...

    async def infer(self, wave: np.ndarray, *, granularity: str, embeddings: bool, deadline: float) -> EmotionResult: ...

    def backlog(self) -> Backlog: ...

    async def status(self) -> dict: ...

    async def close(self) -> None: ...


class InProcessBackend:
    """emotion2vec in this process: the model, its micro-batcher and warm-up, and how a
    turn becomes clips and clips a result."""

    def __init__(self, settings: Settings | None = None, *, on_batch: Callable[[int, float], None] | None = None) -> None:
        self.settings = settings or Settings()
        self.model = None
        self.error: str | None = None
        self.warm = False
        self.stats = BatchStats()  # every batch run, by the micro-batcher or infer_waves
        self._on_batch = on_batch  # metrics: (clips, seconds) per batch
        self._graphs_at_ready = 0
        self._batcher: MicroBatcher | None = None
        self._loading: asyncio.Future | None = None
        self._clips_per_s = 0.0  # inference rate over recent batches, for admission

    # -- lifecycle -------------------------------------------------------------------

    def load(self) -> InProcessBackend:
        """Load and warm the model in this thread (CLI, benchmarks, tests); once."""
        if self.warm:
            return self
        try:
            from emotion.engine.model import EmotionModel
        except ImportError as exc:  # an old torch, or none: say which
            self.error = f"cannot load the model code: {first_line(exc, 300)}"
            raise ModelUnavailable(self.error) from exc
        s = self.settings
        try:
            self.model = EmotionModel(s.model, hub=s.hub, device=s.device, dtype=s.dtype, compile=s.compile, labels=s.labels,
                                      runtime=s.runtime, onnx_cache_dir=s.onnx_cache_dir)
            if s.warmup:
                self._warmup()
        except EmotionError as exc:
            self.error = exc.message
            raise
        except Exception as exc:  # one no boundary translated: /ready must still say why
            self.error = f"could not load the model: {type(exc).__name__}: {first_line(exc)}"
            raise ModelUnavailable(self.error) from exc
        # A graph compiled while serving stalls every conversation: /ready counts them.
        self._graphs_at_ready = self.model.compiled_graphs()
        self.warm = True
        log.info("emotion model %s ready on %s (%s, %s), labels %s", s.model, self.model.device, self.model.runtime,
                 self.model.precision, self.model.labels)
        return self

    async def start(self) -> None:
        """Load in a worker thread (unless loaded already); concurrent callers share one load."""
        if not self.warm:
            if self._loading is None:
                self._loading = asyncio.ensure_future(asyncio.to_thread(self.load))
            await asyncio.shield(self._loading)
        self._ensure_batcher()

    async def close(self) -> None:
        """Stop the micro-batcher; the model stays loaded, so the backend can serve again
        from another event loop (the benchmark's levels do)."""
        if self._batcher is not None:
            await self._batcher.close()
        self._batcher = None
        if self._loading is not None and self._loading.done():
            self._loading = None  # it belongs to this loop; a failure stays in self.error

    @property
    def labels(self) -> list[str]:
        """The labels results speak: the loaded model's, or those it will have."""
        if self.model is not None:
            return list(self.model.labels)
        return list(self.settings.labels or LABELS)

    @property
    def max_batch_size(self) -> int:
        if self.settings.max_batch_size:
            return self.settings.max_batch_size
        return 64 if self.model is not None and self.model.device.type == "cuda" else 1

    def reset_stats(self) -> BatchStats:
        """Start counting batches afresh (benchmark levels); returns the finished counts."""
        done, self.stats = self.stats, BatchStats()
        if self._batcher is not None:
            self._batcher.stats = self.stats
        return done

    def backlog(self) -> Backlog:
        return Backlog(self._clips_per_s, 0)

    async def status(self) -> dict:
        model = self.model
        return {
            "ready": self.warm and self.error is None,
            "device": str(model.device) if model else None,
            "runtime": model.runtime if model else None,
            "dtype": model.precision if model else None,
            "labels": model.labels if model else None,
            "test_checkpoint": model.test_checkpoint if model else None,
            "max_batch_size": self.max_batch_size if model else None,
            "queue_depth": self._batcher.depth if self._batcher else 0,
            "graph_compiles_after_ready": model.compiled_graphs() - self._graphs_at_ready if self.warm else None,
            "clips_per_s": round(self._clips_per_s, 2),
            "error": self.error,
        }

    def _warmup(self) -> None:
        # Typical turns; with token budgets (GPU) a batch for each budget a batch can need,
        # since each is its own compiled graph, and compiling one while callers wait stalls
        # every conversation for seconds (holding the GIL).
        model, rng = self.model, np.random.default_rng(0)
        shapes = [[1.0 * SAMPLE_RATE_HZ], [5.0 * SAMPLE_RATE_HZ]]
        window = model.tokens(int(self.settings.window_seconds * SAMPLE_RATE_HZ))
        below = 0
        for budget in model.budgets:
            clips = min(self.max_batch_size, max(1, budget // 512))
            tokens = min(min(budget, self._max_batch_cost) // clips - 1, window)
            if clips * tokens > below:  # a batch can need this budget
                shapes.append([model.frames_to_samples(tokens - model.tokens(0))] * clips)
            below = budget
        for lengths in shapes:
            model.forward([rng.standard_normal(int(n)).astype(np.float32) * 0.1 for n in lengths])

    @property
    def _max_batch_cost(self) -> float:
        """Tokens a batch may hold: the configured audio seconds, and the largest budget."""
        cap = self.model.tokens(int(self.settings.max_batch_audio_seconds * SAMPLE_RATE_HZ))
        return min(cap, self.model.max_batch_tokens or cap)

    def _ensure_batcher(self) -> MicroBatcher:
        if self._batcher is None:
            self._batcher = MicroBatcher(
                self._run_clips,
                size=lambda clip: self.model.tokens(len(clip.wave)),
                max_batch_size=self.max_batch_size,
                max_wait_ms=self.settings.max_wait_ms,
                max_queue=self.settings.max_queued_clips,
                max_batch_cost=self._max_batch_cost,
                on_batch=self._batch_done,
            )
            self._batcher.stats = self.stats
        return self._batcher

    def _batch_done(self, clips: int, seconds: float) -> None:
        rate = clips / max(seconds, 1e-6)
        self._clips_per_s = rate if not self._clips_per_s else 0.8 * self._clips_per_s + 0.2 * rate
        if self._on_batch is not None:
            self._on_batch(clips, seconds)

    def _run_clips(self, clips: list[Clip]):
        return timed(
            "inference", self.model.forward, [c.wave for c in clips],
            frames=any(c.frames for c in clips), embeddings=any(c.embeddings for c in clips),
        )

    # -- inference -------------------------------------------------------------------

    async def infer(self, wave: np.ndarray, *, granularity: str, embeddings: bool, deadline: float) -> EmotionResult:
        plan = self._plan(len(wave), granularity)
        clips = clips_for(wave, plan, embeddings)
        batcher = self._ensure_batcher()
        left = deadline - time.monotonic()
        futures: list[asyncio.Future] = []
        try:
            for clip in clips:
                futures.append(batcher.submit(clip, timeout_s=left))
        except Overloaded:
            for future in futures:  # queued already: the batcher skips what is cancelled
                future.cancel()
            raise
        # Most turns are one clip: its future awaited as it is saves a gathering future,
        # 0.02 of the loop's 0.1 ms a turn (bench/loop_cost.py --batch 64).
        if len(futures) == 1:
            outputs = [await futures[0]]
        else:
            outputs = await asyncio.gather(*futures)
        return assemble(plan, outputs, self.model.head, embeddings=embeddings)

    def infer_waves(self, waves: Sequence[np.ndarray], *, granularity: str = "utterance",
                    embeddings: bool = False) -> list[EmotionResult | EmotionError]:
        """Analyse ``waves`` in this thread, loading the model first if need be, batched as
        the micro-batcher does: same plan, same cost cap, and a clip that fails fails only
        its own wave."""
        self.load()
        plans = [self._plan(len(w), granularity) for w in waves]
        clips = [c for wave, plan in zip(waves, plans) for c in clips_for(wave, plan, embeddings)]
        outputs: list = [None] * len(clips)
        sizes = [self.model.tokens(len(c.wave)) for c in clips]
        for idx in plan_batches(sizes, max_batch_size=self.max_batch_size, max_cost=self._max_batch_cost):
            for i, out in zip(idx, run_isolated(self._run_clips, [clips[i] for i in idx], self.stats)):
                outputs[i] = out
        results: list[EmotionResult | EmotionError] = []
        pos = 0
        for plan in plans:
            mine = outputs[pos : pos + len(plan.spans)]
            pos += len(plan.spans)
            failed = next((o for o in mine if isinstance(o, EmotionError)), None)
            results.append(failed or assemble(plan, mine, self.model.head, embeddings=embeddings))
        return results

    def _plan(self, samples: int, granularity: str) -> Plan:
        s = self.settings
        return plan_turn(samples, granularity, window_s=s.window_seconds, segment_s=s.segment_seconds, segment_hop_s=s.segment_hop_seconds)
