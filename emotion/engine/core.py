"""The engine: audio reference → decoded clip → its backend's inference → EmotionResult."""

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
from emotion.engine.backend import Backend, InProcessBackend
from emotion.engine.cpu import cpu_seconds, timed
from emotion.engine.fetch import AudioFetcher, AudioRef
from emotion.engine.plan import check_granularity, plan_turn
from emotion.engine.results import EmotionResult, Segment
from emotion.errors import EmotionError, Overloaded, TimedOut
from emotion.settings import Settings

__all__ = ["EmotionEngine", "EmotionResult", "Segment"]

log = logging.getLogger(__name__)


class EmotionEngine:
    """Serves analyses to any number of concurrent callers: admission, fetching, decoding
    and one deadline per turn here, inference in ``backend`` (emotion2vec in this process
    unless another is passed: see ``emotion.engine.backend``).

    ``tracer``: an OpenTelemetry tracer for spans per stage. ``freeze_heap``: once the
    backend has started, move everything on the heap out of the garbage collector's sight
    (the action server's own processes; a library caller's heap is theirs).
    ``fetches_urls``: build the URL fetcher at start (off in the engine process, which gets
    decoded waves from its workers).
    """

    def __init__(self, settings: Settings | None = None, *, backend: Backend | None = None, tracer=None,
                 freeze_heap: bool = False, fetches_urls: bool = True) -> None:
        self.settings = settings or Settings()
        self.backend: Backend = backend if backend is not None else InProcessBackend(self.settings)
        self.tracer = tracer
        self.freeze_heap = freeze_heap
        self.fetches_urls = fetches_urls
        self._fetcher: AudioFetcher | None = None
        self._decoder: concurrent.futures.ThreadPoolExecutor | None = None
        self._preparing: asyncio.Future | None = None
        self._frozen = False
        self._turns = 0  # turns between arrival and result (fetching, decoding, waiting, running)
        self._loop_thread: int | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the backend (load the model, or reach the process that holds it); many
        callers may wait on it at once. Raises ``ModelUnavailable`` while there is no model."""
        self._loop_thread = threading.get_ident()
        if self._preparing is None:  # beside the backend's start, not before it
            self._preparing = asyncio.ensure_future(self._prepare())
        try:
            await self.backend.start()
        finally:
            if self.freeze_heap and not self._frozen:
                self._frozen = True
                # torch, FunASR and the model leave ~500k objects that live as long as the
                # process, and a full collection walks them all while holding the GIL: 0.4 s
                # on a 2-core CPU, a stall for every conversation at once. Frozen,
                # collections skip them. Once the first start has ended, loaded or not.
                await asyncio.to_thread(_freeze_heap)
        await asyncio.shield(self._preparing)

    async def start_or_log(self) -> None:
        """``start()`` for a server: a failed load is logged, not raised; turns then get
        ``model_unavailable`` and the status says why, and the bot keeps talking."""
        try:
            await self.start()
        except EmotionError as exc:
            log.error("emotion model failed to load: %s", exc.message)

    async def _prepare(self) -> None:
        if self.fetches_urls:
            await asyncio.to_thread(self._build_fetcher)

    def _build_fetcher(self) -> None:
        # Built at start, off the loop: building it (an SSL context) blocks ~50 ms. A URL
        # turn that arrives first builds its own; the spare has no connection to leak.
        fetcher = AudioFetcher(self.settings)
        if self._fetcher is None:
            self._fetcher = fetcher

    async def close(self) -> None:
        """Release what belongs to the running event loop; a model in this process stays
        loaded, so the engine can serve again from another loop (the benchmark's levels do)."""
        await self.backend.close()
        if self._fetcher is not None:
            await self._fetcher.aclose()
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)
        self._fetcher = self._decoder = self._preparing = None

    @property
    def warm(self) -> bool:
        return self.backend.warm

    @property
    def error(self) -> str | None:
        return self.backend.error

    @property
    def labels(self) -> list[str]:
        """The labels results speak: the model's, or those it will have."""
        return self.backend.labels

    @property
    def turns_in_flight(self) -> int:
        return self._turns

    async def status(self) -> dict:
        """Readiness, the model and its queue (fresh from wherever it runs), and CPU time:
        this process's by role, beside the engine process's where there is one."""
        status = {"model": self.settings.model, **await self.backend.status()}
        status["ready"] = bool(status.get("ready")) and self.warm and self.error is None
        status["error"] = self.error or status.get("error")
        status["cpu_seconds"] = {**self.cpu_seconds(), **status.get("cpu_seconds", {})}
        status["turns_in_flight"] = self._turns
        status["pid"] = os.getpid()
        return status

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time this process has spent: in all (``process``, torch's own threads
        included), on the event loop that serves HTTP, in decoding and on the inference
        thread. The event loop's share per turn is what caps one server process: at
        1 ms a turn it is saturated at 1,000 turns/s whatever the GPU does."""
        return cpu_seconds(self._loop_thread)

    # -- analysis --------------------------------------------------------------------
    # One deadline per turn (EMOTION_TURN_TIMEOUT_S) covers fetch, decode, the wait for a
    # loading model and inference; each stage also keeps its own, shorter limit.

    async def analyze_ref(self, ref: AudioRef, *, granularity: str = "utterance", embeddings: bool = False) -> EmotionResult:
        """Fetch, decode and analyse one turn's audio."""
        deadline = time.monotonic() + self.settings.turn_timeout_s
        if self._fetcher is None:
            self._build_fetcher()
        with self._admitted():
            started = time.perf_counter()
            data = await self._stage(self._fetcher.fetch(ref), deadline, "fetching the audio", self.settings.fetch_timeout_s * 2)
            fetched = time.perf_counter()
            result = await self._analyze_bytes(data, ref.encoding, ref.sample_rate_hz, ref.channel, granularity, embeddings, deadline)
        result.timings_ms["fetch"] = (fetched - started) * 1000
        return result

    async def analyze_bytes(self, data: bytes, *, encoding: str | None = None, sample_rate_hz: int | None = None,
                            channel: int | None = None, granularity: str = "utterance", embeddings: bool = False) -> EmotionResult:
        deadline = time.monotonic() + self.settings.turn_timeout_s
        with self._admitted():
            return await self._analyze_bytes(data, encoding, sample_rate_hz, channel, granularity, embeddings, deadline)

    @property
    def overload_reason(self) -> str | None:
        """Why a new turn would be refused now, or None: EMOTION_MAX_TURNS_IN_FLIGHT turns in
        progress, or so many (with those others have queued on the backend) that at its
        recent inference rate a new one would finish past the turn's deadline anyway."""
        if self._turns >= self.settings.max_turns_in_flight:
            return f"{self._turns} turns already in progress"
        rate, elsewhere = self.backend.backlog()
        ahead = self._turns + elsewhere
        wait_s = (ahead + 1) / rate if rate else 0.0
        if wait_s > self.settings.turn_timeout_s:
            return f"{ahead} turns in progress would take {wait_s:.1f} s, past the {self.settings.turn_timeout_s:g} s turn limit"
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
        deadline = time.monotonic() + (self.settings.turn_timeout_s if timeout_s is None else timeout_s)
        with self._admitted():
            return await self._analyze_wave(wave, granularity, embeddings, deadline)

    async def _analyze_bytes(self, data, encoding, sample_rate_hz, channel, granularity, embeddings, deadline) -> EmotionResult:
        started = time.perf_counter()
        with self._span("emotion.decode", bytes=len(data)):
            if self._decoder is None:
                self._decoder = concurrent.futures.ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 2)), thread_name_prefix="emotion-decode")
            # The decoder stops at the same deadline, so a turn that timed out frees its thread.
            stop_at = min(deadline, time.monotonic() + self.settings.decode_timeout_s)
            job = asyncio.get_running_loop().run_in_executor(self._decoder, timed, "decode", self.decode_sync, data, encoding,
                                                             sample_rate_hz, channel, stop_at)
            wave = await self._stage(job, deadline, "decoding", self.settings.decode_timeout_s)
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
            max_seconds=self.settings.max_audio_seconds,
            min_seconds=self.settings.min_audio_ms / 1000,
            deadline=deadline,
        )

    async def _analyze_wave(self, wave: np.ndarray, granularity: str, embeddings: bool, deadline: float) -> EmotionResult:
        check_granularity(granularity)  # before any wait: a bad request needs no model
        if not self.warm:  # once started, no task and timer a turn for it
            await self._stage(self.start(), deadline, "waiting for the model to load")
        started = time.perf_counter()
        with self._span("emotion.inference", **self._inference_attributes(wave, granularity)):
            job = self.backend.infer(wave, granularity=granularity, embeddings=embeddings, deadline=deadline)
            result = await self._stage(job, deadline, "running inference")
        result.timings_ms["inference"] = (time.perf_counter() - started) * 1000
        return result

    def _inference_attributes(self, wave: np.ndarray, granularity: str) -> dict:
        if self.tracer is None:
            return {}
        s = self.settings
        plan = plan_turn(len(wave), granularity, window_s=s.window_seconds, segment_s=s.segment_seconds,
                         segment_hop_s=s.segment_hop_seconds)
        return {"clips": len(plan.spans), "audio_seconds": round(len(wave) / SAMPLE_RATE_HZ, 3)}

    async def _stage(self, job: Awaitable, deadline: float, what: str, limit_s: float = float("inf")):
        budget = min(limit_s, deadline - time.monotonic())
        try:
            return await _within(job, max(budget, 0.0))
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            if budget < limit_s:
                raise TimedOut(f"the turn ran past its {self.settings.turn_timeout_s:g} s limit while {what}") from None
            raise TimedOut(f"{what} took longer than {limit_s:g} s") from None

    def analyze_waves(self, waves: Sequence[np.ndarray], *, granularity: str = "utterance",
                      embeddings: bool = False) -> list[EmotionResult | EmotionError]:
        """Synchronous batch analysis in this thread (CLI, benchmarks), loading the model
        first if need be: a result, or the error of that wave alone, per wave. It runs the
        model here, so it needs the in-process backend."""
        if not isinstance(self.backend, InProcessBackend):
            raise TypeError(f"analyze_waves runs the model in this thread; {type(self.backend).__name__} runs it elsewhere")
        return self.backend.infer_waves(waves, granularity=granularity, embeddings=embeddings)

    def _span(self, name: str, **attributes):
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(name, attributes=attributes)


async def _within(job: Awaitable, timeout_s: float):
    # asyncio.timeout awaits the job in the caller's task; wait_for would wrap a coroutine
    # (the backend's infer) in a task of its own, a third more event-loop time a turn.
    if hasattr(asyncio, "timeout"):  # Python 3.11
        async with asyncio.timeout(timeout_s):
            return await job
    return await asyncio.wait_for(job, timeout_s)


def _freeze_heap() -> None:
    gc.collect()
    gc.freeze()
