"""The model in a process of its own, serving every Sanic worker of one action server.

With several Sanic workers (``ACTION_SERVER_SANIC_WORKERS``) each would load its own copy
of the model onto the one GPU and batch only its own turns; in a single process HTTP,
JSON, decoding and inference share one GIL. Here the workers fetch and decode, write the
decoded wave into memory they share with the one process that holds the model, and tell
it over a Unix socket where to read it; that process batches the turns of all of them.

The socket carries pickles, so it lives in a directory only this user can enter: the
action server's own processes are the only ones that can connect.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import logging
import mmap
import os
import pickle
import signal
import socket
import struct
import threading
import time

import numpy as np

from emotion.engine.core import EmotionEngine, EmotionResult
from emotion.errors import EmotionError, InferenceFailed, ModelUnavailable, first_line
from emotion.serving import metrics
from emotion.settings import SAMPLE_RATE_HZ, Settings

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!Q")
_ALIGN = 16
_SOCKET_BUFFER_BYTES = 4 << 20
# A worker's waves in flight, written where the engine process reads them: ~17 min of
# 16 kHz audio; a turn that finds no room crosses the socket instead.
_SHARED_BYTES = 64 << 20
ENGINE_SOCKET_ENV = "_EMOTION_ENGINE_SOCKET"  # set by the main process for its workers
CONNECT_PATIENCE_S = 120.0  # for the engine process to start and bind (importing torch)


def serve(path: str) -> None:
    """The engine process's body: Sanic's worker manager runs it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s - %(message)s")
    try:
        asyncio.run(_serve(path))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group
        pass


async def _serve(path: str) -> None:
    engine = EmotionEngine(Settings.from_env())
    engine.freeze_heap = True  # this process is the server's own: see EmotionEngine.load
    engine.fetches_urls = False
    engine.on_batch = metrics.record_batch
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Bound before the model loads, so the workers can tell "loading" from "gone".
    server = await loop.create_unix_server(lambda: _serving(engine), path=path)
    loading = asyncio.ensure_future(engine.start_or_log())  # the workers read a failure from the status
    await stop.wait()
    loading.cancel()
    server.close()
    await engine.close()


def _serving(engine: EmotionEngine) -> _Channel:
    """One worker's connection: each request answered in its own task, in any order."""
    answering: set[asyncio.Task] = set()
    shared: list[np.ndarray] = []  # the worker's wave memory, once it has offered it

    def received(message) -> None:
        rid, op, args = message
        if op == "share":
            channel.send((rid, *_map_shared(shared, *args)))
            return
        if op == "analyze" and isinstance(args[0], tuple):  # (offset, samples) in the shared memory
            offset, samples = args[0]
            args = (shared[0][offset : offset + samples], *args[1:])
        task = asyncio.ensure_future(_answer(engine, channel, rid, op, args))
        answering.add(task)
        task.add_done_callback(answering.discard)

    def lost() -> None:  # the worker has gone: its turns have no one to answer
        for task in list(answering):
            task.cancel()
        shared.clear()  # its memory is freed once the last turn reading it is done

    channel = _Channel(received, lost)
    return channel


def _map_shared(shared: list, pid: int, fd: int, size: int) -> tuple:
    try:  # the worker's memfd, opened as its owner (same user) can through /proc
        with open(f"/proc/{pid}/fd/{fd}", "r+b") as f:
            shared[:] = [np.frombuffer(mmap.mmap(f.fileno(), size), np.float32)]
    except (OSError, ValueError) as exc:
        return None, InferenceFailed(f"cannot map the worker's shared memory: {first_line(exc)}")
    return True, None


async def _answer(engine: EmotionEngine, channel: _Channel, rid: int, op: str, args: tuple) -> None:
    try:
        if op == "status":
            reply = (rid, engine.status(), None)
        else:
            wave, granularity, embeddings, timeout_s = args
            reply = (rid, await engine.analyze_wave(wave, granularity=granularity, embeddings=embeddings, timeout_s=timeout_s), None)
    except EmotionError as exc:
        reply = (rid, None, exc)
    except Exception as exc:  # a bug costs this turn, never the process
        log.exception("engine process request %s crashed", op)
        reply = (rid, None, InferenceFailed(f"the engine process failed: {type(exc).__name__}: {first_line(exc)}"))
    try:
        channel.send(reply)
    except Exception as exc:  # a result that cannot be sent must not leave its turn waiting
        log.exception("engine process reply to %s could not be sent", op)
        channel.send((rid, None, InferenceFailed(f"the engine process could not send the result: {first_line(exc)}")))


class EngineClient(EmotionEngine):
    """A Sanic worker's engine when the model runs in the engine process: fetching,
    decoding and admission here, batching and inference there, over one connection that
    carries every turn of this worker at once."""

    def __init__(self, config: Settings, path: str) -> None:
        super().__init__(config)
        self.path = path
        self.on_lost = None  # called when the engine process goes away (the plugin restarts it)
        self._link: asyncio.Task | None = None
        self._settled = asyncio.Event()  # ready, failed, or not there
        self._channel: _Channel | None = None
        self._replies: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._remote: dict = {}
        self._shared: _SharedWaves | None = None
        self._lent: dict[int, int] = {}  # request id -> where its wave starts in the shared memory

    def load(self) -> EngineClient:
        raise ModelUnavailable("a Sanic worker never loads the model: the engine process does")

    async def start(self) -> None:
        if self._link is None:
            self._loop_thread = threading.get_ident()
            self._shared = _SharedWaves.create()  # before the link, which offers it
            self._link = asyncio.ensure_future(self._keep_linked())
            await asyncio.to_thread(self._build_fetcher)
            if self.freeze_heap:  # a worker's imports live as long as it: see EmotionEngine.load
                gc.collect()
                gc.freeze()
        await self._settled.wait()
        if self.error:
            raise ModelUnavailable(self.error)

    async def _keep_linked(self) -> None:
        loop = asyncio.get_running_loop()
        give_up = time.monotonic() + CONNECT_PATIENCE_S
        while True:
            lost = loop.create_future()
            try:
                _, channel = await loop.create_unix_connection(functools.partial(_Channel, self._replied, functools.partial(_settle, lost)), self.path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() >= give_up:  # from now on turns fail at once, until it is back
                    self.error = self.error or f"the engine process is not answering: {first_line(exc)}"
                    self._settled.set()
                await asyncio.sleep(0.25)
                continue
            self._channel, self._remote = channel, {}  # a restarted process is loading again
            await self._share()
            ready = asyncio.ensure_future(self._await_ready())
            await lost  # until the engine process goes away
            ready.cancel()
            self._channel, self.warm = None, False
            self.error = "the engine process exited; it is being restarted"
            self._settled.set()
            log.error("emotion: %s", self.error)
            for future in self._replies.values():
                if not future.done():
                    future.set_exception(ModelUnavailable(self.error))
            self._replies.clear()
            if self._shared is not None:  # nothing reads it now
                self._shared.reset()
            self._lent.clear()
            if self.on_lost is not None:
                self.on_lost()
            give_up = time.monotonic()

    async def _share(self) -> None:
        if self._shared is None:
            return
        try:
            self._shared.ready = await asyncio.wait_for(self._call("share", os.getpid(), self._shared.fd, self._shared.size), 10.0)
        except (EmotionError, asyncio.TimeoutError) as exc:  # turns cross the socket instead
            log.warning("emotion: waves go through the engine socket: %s", getattr(exc, "message", "no answer"))

    async def _await_ready(self) -> None:
        while not (self._remote.get("ready") or self._remote.get("error")):
            await self.current_status()
            await asyncio.sleep(0.2)
        self.error = self._remote["error"]
        self.warm = not self.error
        self._settled.set()

    def _replied(self, message) -> None:
        rid, value, error = message
        offset = self._lent.pop(rid, None)
        if offset is not None and self._shared is not None:
            # The engine process answers once inference has read the wave. Only a turn it
            # gave up on may still be read as this is rewritten: its result goes to no one.
            self._shared.release(offset)
        future = self._replies.pop(rid, None)
        if future is None or future.done():
            return  # its turn gave up waiting
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    async def close(self) -> None:
        if self._link is not None:
            self._link.cancel()
        if self._channel is not None:
            self._channel.close()
        if self._shared is not None:
            self._shared.close()
        self._link = self._channel = self._shared = None
        await super().close()

    async def _call(self, op: str, *args):
        if self._channel is None:
            raise ModelUnavailable(self.error or "not connected to the engine process")
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._replies[rid] = future
        if op == "analyze" and self._shared is not None and self._shared.ready:
            wave = args[0]
            offset = self._shared.put(wave)
            if offset is not None:  # else it crosses the socket
                self._lent[rid] = offset
                args = ((offset, len(wave)), *args[1:])
        self._channel.send((rid, op, args))
        try:
            return await future
        finally:
            self._replies.pop(rid, None)

    async def _analyze_wave(self, wave: np.ndarray, granularity: str, embeddings: bool, deadline: float) -> EmotionResult:
        if not self.warm:
            await self._stage(self.start(), deadline, "waiting for the model to load")
        with self._span("emotion.inference", audio_seconds=round(len(wave) / SAMPLE_RATE_HZ, 3)):
            job = self._call("analyze", wave, granularity, embeddings, deadline - time.monotonic())
            return await self._stage(job, deadline, "running inference")

    async def current_status(self) -> dict:
        try:
            self._remote = await asyncio.wait_for(self._call("status"), 2.0)
        except EmotionError as exc:
            return {**self.status(), "ready": False, "error": exc.message}
        except asyncio.TimeoutError:
            return {**self.status(), "ready": False, "error": "the engine process did not answer within 2 s"}
        return self.status()

    def status(self) -> dict:
        """The engine process's status, with this worker's CPU time beside its own."""
        status = dict(self._remote) or super().status()
        theirs = status.get("cpu_seconds") or {}
        # The engine process's event loop receives every worker's turns: the next limit.
        status["cpu_seconds"] = {**self.cpu_seconds(), "inference": theirs.get("inference", 0.0),
                                 "engine_process": theirs.get("process", 0.0), "engine_event_loop": theirs.get("event_loop", 0.0)}
        status["engine_process"], status["pid"] = self._remote.get("pid"), os.getpid()
        status["ready"] = bool(status.get("ready")) and self.warm
        status["error"] = self.error or status.get("error")
        return status

    @property
    def labels(self) -> list[str]:
        return list(self._remote.get("labels") or super().labels)


class _SharedWaves:
    """A worker's memory for the waves it sends, mapped by the engine process once: a turn
    crosses the socket as an offset, and neither side copies it through the kernel (nor
    needs net.core.wmem_max raised). A memfd, not /dev/shm, which Docker gives 64 MB by default."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size, self.ready = fd, size, False
        self.array = np.frombuffer(mmap.mmap(fd, size), np.float32)
        self.used: list[tuple[int, int]] = []  # (start, end) sample ranges in flight, in order

    @classmethod
    def create(cls, size: int | None = None) -> _SharedWaves | None:
        size = size or _SHARED_BYTES
        try:
            fd = os.memfd_create("emotion-waves", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)  # pages come as they are first written
            return cls(fd, size)
        except (AttributeError, OSError) as exc:  # not Linux: the socket carries the waves
            log.info("emotion: no shared memory for waves (%s); they cross the engine socket", first_line(exc))
            return None

    def put(self, wave: np.ndarray) -> int | None:
        """Copies the wave into the first gap that holds it: the sample it starts at, or
        None if full. Each starts 16-byte aligned, as torch.from_numpy wants."""
        align = _ALIGN // self.array.itemsize
        starts = [0, *(end + (-end % align) for _, end in self.used)]
        ends = [begin for begin, _ in self.used] + [len(self.array)]
        for at, (start, end) in enumerate(zip(starts, ends)):
            if end - start >= len(wave):
                self.used.insert(at, (start, start + len(wave)))
                self.array[start : start + len(wave)] = wave
                return start
        return None

    def release(self, offset: int) -> None:
        for i, (begin, _) in enumerate(self.used):
            if begin == offset:
                del self.used[i]
                return

    def reset(self) -> None:
        """Everything free, and unoffered until the next connection maps it again."""
        self.used.clear()
        self.ready = False

    def close(self) -> None:
        self.ready, self.array = False, None  # the mapping goes with its last view
        os.close(self.fd)


class _Channel(asyncio.BufferedProtocol):
    """Messages over a Unix socket: pickles (protocol 5) whose numpy arrays travel out of
    band. The kernel reads each message straight into one buffer and the arrays received
    are views of it: a 15 s turn costs the two event loops 0.7 ms together on a 2-core
    CPU, against 1.3-1.9 ms through StreamReaders and in-band pickles."""

    def __init__(self, on_message, on_lost) -> None:
        self.on_message, self.on_lost = on_message, on_lost
        self.transport: asyncio.Transport | None = None
        self._next_header()

    def _next_header(self) -> None:
        self._buffer, self._filled, self._in_header = bytearray(_LENGTH.size), 0, True

    def connection_made(self, transport) -> None:
        self.transport = transport
        # What still crosses here large (frame embeddings, a wave without shared memory) goes
        # in one or two writes, not a ping-pong of 208 KB pieces, where net.core.wmem_max allows.
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.on_lost()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled < len(self._buffer):
            return
        if self._in_header:
            (length,) = _LENGTH.unpack(self._buffer)
            # Uninitialised (bytearray would zero it first): the socket fills every byte.
            self._buffer, self._filled, self._in_header = np.empty(length, np.uint8), 0, False
            return
        body = memoryview(self._buffer)
        self._next_header()
        self.on_message(_unpack(body))

    def send(self, message) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # the other end has gone; its connection_lost says so
        arrays: list[pickle.PickleBuffer] = []
        meta = pickle.dumps(message, protocol=5, buffer_callback=arrays.append)
        raw = [a.raw() for a in arrays]
        head = struct.pack(f"!II{len(raw)}Q", len(meta), len(raw), *(r.nbytes for r in raw)) + meta
        parts = [head]
        for r in raw:  # each array starts 16-byte aligned in the receiver's buffer
            parts += [bytes(-sum(map(len, parts)) % _ALIGN), r]
        parts[0] = _LENGTH.pack(sum(map(len, parts))) + head
        for part in parts:
            self.transport.write(part)  # sent at once where the socket takes it: no copy

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _settle(future: asyncio.Future) -> None:
    if not future.done():  # cancelled when the worker closes the link itself
        future.set_result(None)


def _unpack(body: memoryview):
    meta_len, count = struct.unpack_from("!II", body)
    sizes = struct.unpack_from(f"!{count}Q", body, 8)
    pos = 8 + 8 * count + meta_len
    meta, arrays = body[pos - meta_len : pos], []
    for size in sizes:
        pos += -pos % _ALIGN
        arrays.append(body[pos : pos + size])
        pos += size
    return pickle.loads(meta, buffers=arrays)
