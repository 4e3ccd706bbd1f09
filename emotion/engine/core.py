"""The engine: audio reference → decoded clip → batched inference → EmotionResult."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Awaitable, Sequence

import numpy as np

from emotion.engine.audio import SAMPLE_RATE_HZ, decode_audio
from emotion.engine.batching import BatchStats, MicroBatcher, plan_batches, run_isolated
from emotion.engine.fetch import AudioFetcher, AudioRef
from emotion.engine.plan import Clip, Plan, assemble, clips_for, plan_turn
from emotion.engine.results import EmotionResult, Segment
from emotion.errors import EmotionError, ModelUnavailable, Overloaded, TimedOut, first_line
from emotion.settings import LABELS, Settings

__all__ = ["EmotionEngine", "EmotionResult", "Segment"]

log = logging.getLogger(__name__)


class EmotionEngine:
    """Loads emotion2vec once and serves analyses from any number of concurrent callers."""

    def __init__(self, config: Settings | None = None) -> None:
        self.config = config or Settings()
        self.model = None
        self.error: str | None = None
        self.warm = False
        self._graphs_at_ready = 0
        self._batcher: MicroBatcher | None = None
        self._fetcher: AudioFetcher | None = None
        self._decoder: concurrent.futures.ThreadPoolExecutor | None = None
        self._loading: asyncio.Future | None = None
        self._turns = 0  # turns between arrival and result (fetching, decoding, waiting, running)
        self._clips_per_s = 0.0  # inference rate over recent batches, for admission
        self.on_batch = None  # metrics hook: (batch_size, seconds)
        self.tracer = None  # an OpenTelemetry tracer, when the host has tracing configured
        self.freeze_heap = False  # the action server's: see load()
        self.fetches_urls = True  # not in the engine process: it gets waves, its workers fetch
        self.stats = BatchStats()  # every batch run, by the micro-batcher or analyze_waves
        # CPU seconds by thread role: what bounds one server process apart from the model.
        self._cpu_s = {"decode": 0.0, "inference": 0.0}
        self._cpu_lock = threading.Lock()
        self._loop_thread: int | None = None

    # -- lifecycle -------------------------------------------------------------------

    def load(self) -> EmotionEngine:
        """Load and warm the model in this thread (CLI, benchmarks, tests)."""
        try:
            from emotion.engine.model import EmotionModel
        except ImportError as exc:  # an old torch, or none: say which
            self.error = f"cannot load the model code: {first_line(exc, 300)}"
            raise ModelUnavailable(self.error) from exc
        c = self.config
        try:
            self.model = EmotionModel(c.model, hub=c.hub, device=c.device, dtype=c.dtype, compile=c.compile, labels=c.labels)
        except ModelUnavailable as exc:
            self.error = exc.message
            raise
        if self.config.warmup:
            self._warmup()
        if self.fetches_urls:
            self._build_fetcher()
        if self.freeze_heap:
            # torch, FunASR and the model leave ~500k objects that live as long as the process,
            # and a full collection walks them all while holding the GIL: 0.4 s on a 2-core
            # CPU, a stall for every conversation at once. Frozen, collections skip them.
            gc.collect()
            gc.freeze()
        # A graph compiled while serving stalls every conversation: /ready counts them.
        self._graphs_at_ready = self.model.compiled_graphs()
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

    async def start_or_log(self) -> None:
        """``start()`` for a server: a failed load is logged, not raised; turns then get
        ``model_unavailable`` and the status says why, and the bot keeps talking."""
        try:
            await self.start()
        except EmotionError as exc:
            log.error("emotion model failed to load: %s", exc.message)

    def _build_fetcher(self) -> None:
        # Built while loading, off the loop: building it (an SSL context) blocks ~50 ms. A
        # URL turn that arrives first builds its own; the spare has no connection to leak.
        fetcher = AudioFetcher(self.config)
        if self._fetcher is None:
            self._fetcher = fetcher

    async def close(self) -> None:
        """Release what belongs to the running event loop; the model stays loaded, so the
        engine can serve again from another loop (the benchmark's levels do)."""
        if self._batcher is not None:
            await self._batcher.close()
        if self._fetcher is not None:
            await self._fetcher.aclose()
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)
        self._batcher = self._fetcher = self._decoder = None

    @property
    def max_batch_size(self) -> int:
        if self.config.max_batch_size:
            return self.config.max_batch_size
        return 64 if self.model is not None and self.model.device.type == "cuda" else 1

    def reset_stats(self) -> BatchStats:
        """Start counting batches afresh (benchmark levels); returns the finished counts."""
        done, self.stats = self.stats, BatchStats()
        if self._batcher is not None:
            self._batcher.stats = self.stats
        return done

    @property
    def labels(self) -> list[str]:
        """The labels results speak: the loaded model's, or those it will have."""
        if self.model is not None:
            return list(self.model.labels)
        return list(self.config.labels or LABELS)

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
            "graph_compiles_after_ready": model.compiled_graphs() - self._graphs_at_ready if self.warm else None,
            "cpu_seconds": self.cpu_seconds(),
            "pid": os.getpid(),
            "error": self.error,
        }

    async def current_status(self) -> dict:
        """``status()``, fresh from wherever the model runs (see engine_process)."""
        return self.status()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time this process has spent: in all (``process``, torch's own threads
        included), on the event loop that serves HTTP, in decoding and on the inference
        thread. The event loop's share per turn is what caps one server process: at
        1 ms a turn it is saturated at 1,000 turns/s whatever the GPU does."""
        with self._cpu_lock:
            out = {"process": time.process_time(), **self._cpu_s}
        getclock = getattr(time, "pthread_getcpuclockid", None)  # not on macOS
        if self._loop_thread is not None and getclock is not None:
            with contextlib.suppress(OSError):  # the loop's thread has ended
                out["event_loop"] = time.clock_gettime(getclock(self._loop_thread))
        return {k: round(v, 4) for k, v in out.items()}

    def _timed(self, role: str, fn, *args, **kwargs):
        # Thread CPU time, not wall time: waiting for the GIL costs none (spinning on a CUDA
        # sync does, and is counted).
        started = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.thread_time() - started
            with self._cpu_lock:
                self._cpu_s[role] += spent

    def _warmup(self) -> None:
        # Typical turns; with token budgets (GPU) a batch for each budget a batch can need,
        # since each is its own compiled graph, and compiling one while callers wait stalls
        # every conversation for seconds (holding the GIL).
        model, rng = self.model, np.random.default_rng(0)
        shapes = [[1.0 * SAMPLE_RATE_HZ], [5.0 * SAMPLE_RATE_HZ]]
        window = model.tokens(int(self.config.window_seconds * SAMPLE_RATE_HZ))
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
        cap = self.model.tokens(int(self.config.max_batch_audio_seconds * SAMPLE_RATE_HZ))
        return min(cap, self.model.max_batch_tokens or cap)

    def _ensure_batcher(self) -> MicroBatcher:
        if self._batcher is None:
            self._loop_thread = threading.get_ident()
            self._batcher = MicroBatcher(
                self._run_clips,
                size=lambda clip: self.model.tokens(len(clip.wave)),
                max_batch_size=self.max_batch_size,
                max_wait_ms=self.config.max_wait_ms,
                max_queue=self.config.max_queued_clips,
                max_batch_cost=self._max_batch_cost,
                on_batch=self._batch_done,
            )
            self._batcher.stats = self.stats
        return self._batcher

    def _batch_done(self, clips: int, seconds: float) -> None:
        rate = clips / max(seconds, 1e-6)
        self._clips_per_s = rate if not self._clips_per_s else 0.8 * self._clips_per_s + 0.2 * rate
        if self.on_batch is not None:
            self.on_batch(clips, seconds)

    def _run_clips(self, clips: list[Clip]):
        return self._timed(
            "inference", self.model.forward, [c.wave for c in clips],
            frames=any(c.frames for c in clips), embeddings=any(c.embeddings for c in clips),
        )

    # -- analysis --------------------------------------------------------------------
    # One deadline per turn (EMOTION_TURN_TIMEOUT_S) covers fetch, decode, the wait for a
    # loading model and inference; each stage also keeps its own, shorter limit.

    async def analyze_ref(self, ref: AudioRef, *, granularity: str = "utterance", embeddings: bool = False) -> EmotionResult:
        """Fetch, decode and analyse one turn's audio."""
        deadline = time.monotonic() + self.config.turn_timeout_s
        if self._fetcher is None:
            self._build_fetcher()
        with self._admitted():
            started = time.perf_counter()
            data = await self._stage(self._fetcher.fetch(ref), deadline, "fetching the audio", self.config.fetch_timeout_s * 2)
            fetched = time.perf_counter()
            result = await self._analyze_bytes(data, ref.encoding, ref.sample_rate_hz, ref.channel, granularity, embeddings, deadline)
        result.timings_ms["fetch"] = (fetched - started) * 1000
        return result

    async def analyze_bytes(self, data: bytes, *, encoding: str | None = None, sample_rate_hz: int | None = None,
                            channel: int | None = None, granularity: str = "utterance", embeddings: bool = False) -> EmotionResult:
        deadline = time.monotonic() + self.config.turn_timeout_s
        with self._admitted():
            return await self._analyze_bytes(data, encoding, sample_rate_hz, channel, granularity, embeddings, deadline)

    @property
    def overload_reason(self) -> str | None:
        """Why a new turn would be refused now, or None: EMOTION_MAX_QUEUE turns in progress,
        or so many that at the recent inference rate a new one would finish past the turn's
        deadline anyway."""
        if self._turns >= self.config.max_turns_in_flight:
            return f"{self._turns} turns already in progress"
        wait_s = (self._turns + 1) / self._clips_per_s if self._clips_per_s else 0.0
        if wait_s > self.config.turn_timeout_s:
            return f"{self._turns} turns in progress would take {wait_s:.1f} s, past the {self.config.turn_timeout_s:g} s turn limit"
        return None

    @contextlib.contextmanager
    def _admitted(self):
        # Past capacity a turn is refused before any fetch or decode: under overload the
        # excess gets its answer in milliseconds rather than a timeout seconds later, and
        # the turns admitted keep their pace.
        refused = self.overload_reason
        if refused:
            raise Overloaded(f"emotion engine is overloaded: {refused}")
        self._turns += 1
        try:
            yield
        finally:
            self._turns -= 1

    async def analyze_wave(self, wave: np.ndarray, *, granularity: str = "utterance", embeddings: bool = False,
                           timeout_s: float | None = None) -> EmotionResult:
        """Analyse a decoded 16 kHz wave within ``timeout_s`` (the turn limit by default)."""
        deadline = time.monotonic() + (self.config.turn_timeout_s if timeout_s is None else timeout_s)
        with self._admitted():
            return await self._analyze_wave(wave, granularity, embeddings, deadline)

    async def _analyze_bytes(self, data, encoding, sample_rate_hz, channel, granularity, embeddings, deadline) -> EmotionResult:
        started = time.perf_counter()
        with self._span("emotion.decode", bytes=len(data)):
            if self._decoder is None:
                self._decoder = concurrent.futures.ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 2)), thread_name_prefix="emotion-decode")
            # The decoder stops at the same deadline, so a turn that timed out frees its thread.
            stop_at = min(deadline, time.monotonic() + self.config.decode_timeout_s)
            job = asyncio.get_running_loop().run_in_executor(self._decoder, self._timed, "decode", self.decode_sync, data, encoding,
                                                             sample_rate_hz, channel, stop_at)
            wave = await self._stage(job, deadline, "decoding", self.config.decode_timeout_s)
        decoded = time.perf_counter()
        result = await self._analyze_wave(wave, granularity, embeddings, deadline)
        result.timings_ms["decode"] = (decoded - started) * 1000
        return result

    def decode_sync(self, data: bytes, encoding: str | None = None, sample_rate_hz: int | None = None,
                    channel: int | None = None, deadline: float | None = None) -> np.ndarray:
        """Decode within this engine's duration limits (in the calling thread), stopping at
        ``deadline`` (a ``time.monotonic()`` value) if one is given."""
        return decode_audio(
            data,
            encoding=encoding,
            sample_rate_hz=sample_rate_hz,
            channel=channel,
            max_seconds=self.config.max_audio_seconds,
            min_seconds=self.config.min_audio_ms / 1000,
            deadline=deadline,
        )

    async def _analyze_wave(self, wave: np.ndarray, granularity: str, embeddings: bool, deadline: float) -> EmotionResult:
        plan = self._plan(len(wave), granularity)
        if not self.warm:  # once loaded, no task and timer a turn for it
            await self._stage(self.start(), deadline, "waiting for the model to load")
        started = time.perf_counter()
        batcher = self._ensure_batcher()
        clips = clips_for(wave, plan, embeddings)
        with self._span("emotion.inference", clips=len(clips), audio_seconds=round(len(wave) / SAMPLE_RATE_HZ, 3)):
            left = deadline - time.monotonic()
            futures: list[asyncio.Future] = []
            try:
                for clip in clips:
                    futures.append(batcher.submit(clip, timeout_s=left))
            except Overloaded:
                for future in futures:  # queued already: the batcher skips what is cancelled
                    future.cancel()
                raise
            # Most turns are one clip: its future awaited as it is saves a gathering
            # future, 0.02 of the loop's 0.1 ms a turn (bench/loop_cost.py --batch 64).
            job = futures[0] if len(futures) == 1 else asyncio.gather(*futures)
            outputs = await self._stage(job, deadline, "running inference")
            if len(futures) == 1:
                outputs = [outputs]
        result = assemble(plan, outputs, self.model.head, embeddings=embeddings)
        result.timings_ms["inference"] = (time.perf_counter() - started) * 1000
        return result

    async def _stage(self, job: Awaitable, deadline: float, what: str, limit_s: float = float("inf")):
        budget = min(limit_s, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(job, max(budget, 0.0))
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            if budget < limit_s:
                raise TimedOut(f"the turn ran past its {self.config.turn_timeout_s:g} s limit while {what}") from None
            raise TimedOut(f"{what} took longer than {limit_s:g} s") from None

    def analyze_waves(self, waves: Sequence[np.ndarray], *, granularity: str = "utterance",
                      embeddings: bool = False) -> list[EmotionResult | EmotionError]:
        """Synchronous batch analysis (CLI, benchmarks), batched as the micro-batcher does:
        same plan, same cost cap, and a clip that fails fails only its own wave."""
        if self.model is None:
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
        c = self.config
        return plan_turn(samples, granularity, window_s=c.window_seconds, segment_s=c.segment_seconds, segment_hop_s=c.segment_hop_seconds)

    def _span(self, name: str, **attributes):
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(name, attributes=attributes)
