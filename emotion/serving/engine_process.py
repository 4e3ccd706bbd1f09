"""The model in a process of its own, serving every Sanic worker of one action server.

With several Sanic workers (``ACTION_SERVER_SANIC_WORKERS``) each would load its own copy
of the model onto the one GPU and batch only its own turns; in a single process HTTP,
JSON, decoding and inference share one GIL. Here the workers fetch and decode, write the
decoded wave into memory they share with the one process that holds the model, and tell
it over a Unix socket where to read it; that process batches the turns of all of them.

Each worker's engine has an ``EngineProcessBackend``; the engine process runs an
``EmotionEngine`` with the model in process and answers every worker through ``listen``.
A connection starts with the worker's offer of its wave memory (a memfd, passed with
SCM_RIGHTS) and the engine process's answer; from then on it carries pickles, so the
socket lives in a directory only this user can enter, and the engine process also checks
each peer's user (SO_PEERCRED) and caps the length a message may declare.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import itertools
import logging
import mmap
import os
import pickle
import signal
import socket
import stat
import struct
import time

import numpy as np

from emotion.engine.backend import Backlog, InProcessBackend
from emotion.engine.core import EmotionEngine, EmotionResult
from emotion.errors import EmotionError, InferenceFailed, ModelUnavailable, first_line
from emotion.serving import metrics
from emotion.settings import LABELS, SAMPLE_RATE_HZ, Settings

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!Q")
_ALIGN = 16
_SOCKET_BUFFER_BYTES = 4 << 20
# A worker's waves in flight, written where the engine process reads them: ~17 min of
# 16 kHz audio; a turn that finds no room crosses the socket instead.
_SHARED_BYTES = 64 << 20
# A worker's first message: this tag and the size of the memory whose memfd comes with it
# (0: none offered). The answer is a length and a reason the memory is not used ("": it is).
_OFFER = struct.Struct("!8sQ")
_OFFER_TAG = b"emotion1"
_OFFER_TIMEOUT_S = 10.0
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
    settings = Settings.from_env()
    # This process is the server's own (its heap frozen once loaded: see EmotionEngine),
    # and gets decoded waves: its workers fetch.
    engine = EmotionEngine(settings, backend=InProcessBackend(settings, on_batch=metrics.record_batch),
                           freeze_heap=True, fetches_urls=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Bound before the model loads, so the workers can tell "loading" from "gone".
    listener = await listen(engine, path)
    loading = asyncio.ensure_future(engine.start_or_log())  # the workers read a failure from the status
    await stop.wait()
    loading.cancel()
    listener.close()
    await engine.close()


def max_request_bytes(settings: Settings) -> int:
    """The longest message a worker may send: twice the longest wave the settings allow,
    and room for the rest of the request. A larger header closes the connection before a
    byte of it is allocated."""
    return 2 * int(settings.max_audio_seconds * SAMPLE_RATE_HZ) * 4 + (1 << 20)


async def listen(engine: EmotionEngine, path: str) -> EngineListener:
    """Serve ``engine`` to the workers that connect to the Unix socket at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):  # a socket left by an engine process that was killed
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        sock.bind(path)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return EngineListener(engine, sock)


class EngineListener:
    """The engine process's socket. Each connection is checked (the same user as this
    process), its worker's wave memory received and mapped, and then served: every request
    answered in its own task, in any order."""

    def __init__(self, engine: EmotionEngine, sock: socket.socket) -> None:
        self.engine, self._sock = engine, sock
        self._max_bytes = max_request_bytes(engine.settings)
        self._channels: set[_Channel] = set()
        self._admitting: set[asyncio.Task] = set()
        self._accepting = asyncio.ensure_future(self._accept())

    def close(self) -> None:
        self._accepting.cancel()
        for task in list(self._admitting):
            task.cancel()
        for channel in list(self._channels):
            channel.close()
        self._sock.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            task = asyncio.ensure_future(self._admit(conn))
            self._admitting.add(task)
            task.add_done_callback(self._admitting.discard)

    async def _admit(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            uid = _peer_uid(conn)
            if uid is not None and uid != os.getuid():
                log.warning("emotion: closed a connection to the engine socket from uid %d; this process runs as %d", uid, os.getuid())
                conn.close()
                return
            shared, unshared = await asyncio.wait_for(_receive_offer(loop, conn), _OFFER_TIMEOUT_S)
            answer = unshared.encode()
            await loop.sock_sendall(conn, _LENGTH.pack(len(answer)) + answer)
            channel = _serving(self.engine, shared, self._max_bytes, on_lost=self._channels.discard)
            self._channels.add(channel)
            await loop.connect_accepted_socket(lambda: channel, conn)
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            log.warning("emotion: closed a connection to the engine socket: %s", first_line(exc) if str(exc) else "no offer in time")
            conn.close()
            return
        except BaseException:
            conn.close()
            raise


def _peer_uid(conn: socket.socket) -> int | None:
    """The connecting process's user, as the kernel recorded it at connect (Linux); None
    where the platform cannot say, and the socket's 0700 directory is the only guard."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return uid


async def _receive_offer(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> tuple[np.ndarray | None, str]:
    """The worker's first message and the memfd that comes with it: its wave memory,
    mapped, or None and why not. asyncio reads no ancillary data (it has no recvmsg), so
    this one message is read off the raw socket once it is readable, before the connection
    is handed to the protocol; it is short and sent with one sendmsg, which a Unix stream
    socket delivers whole, with its descriptor, to one recvmsg."""
    readable = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: readable.done() or readable.set_result(None))
    try:
        await readable
    finally:
        loop.remove_reader(conn.fileno())
    data, fds, _flags, _ = socket.recv_fds(conn, _OFFER.size, 1)
    try:
        if len(data) != _OFFER.size:
            raise ValueError(f"a first message of {len(data)} bytes" if data else "closed before its first message")
        tag, size = _OFFER.unpack(data)
        if tag != _OFFER_TAG:
            raise ValueError("not a worker of this server")
        if not size:
            return None, ""  # none offered: the worker knows its waves cross the socket
        if not fds:
            return None, "cannot map the worker's shared memory: no file descriptor came with the offer"
        try:
            return _map_shared(fds[0], size), ""
        except (OSError, ValueError) as exc:
            return None, f"cannot map the worker's shared memory: {first_line(exc)}"
    finally:
        for fd in fds:  # a mapping keeps its own reference
            os.close(fd)


def _map_shared(fd: int, size: int) -> np.ndarray:
    # A wave read past the end of a memfd that shrank would kill this process (SIGBUS):
    # the memory must hold what was offered and be sealed against shrinking.
    held = os.fstat(fd).st_size
    if size % 4 or held < size:
        raise ValueError(f"an offer of {size} bytes in a memory of {held}")
    if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
        raise ValueError("the memory is not sealed against shrinking")
    return np.frombuffer(mmap.mmap(fd, size), np.float32)


def _serving(engine: EmotionEngine, shared: np.ndarray | None, max_bytes: int, on_lost=None) -> _Channel:
    """One worker's connection: each request answered in its own task, in any order."""
    answering: set[asyncio.Task] = set()
    memory = [] if shared is None else [shared]  # the worker's wave memory, if mapped

    def received(message) -> None:
        rid, op, args = message
        if op == "analyze" and isinstance(args[0], tuple):  # (offset, samples) in the shared memory
            offset, samples = args[0]
            if not memory or not (0 <= offset and 0 < samples and offset + samples <= len(memory[0])):
                channel.send((rid, None, InferenceFailed(f"no wave at {offset}+{samples} in the shared memory"), _backlog(engine)))
                return
            args = (memory[0][offset : offset + samples], *args[1:])
        task = asyncio.ensure_future(_answer(engine, channel, rid, op, args))
        answering.add(task)
        task.add_done_callback(answering.discard)

    def lost() -> None:  # the worker has gone: its turns have no one to answer
        for task in list(answering):
            task.cancel()
        memory.clear()  # its memory is unmapped once the last turn reading it is done
        if on_lost is not None:
            on_lost(channel)

    channel = _Channel(received, lost, max_bytes=max_bytes)
    return channel


def _backlog(engine: EmotionEngine) -> tuple[float, int]:
    """Sent with every answer, so that the workers refuse at once what this process could
    not finish in time (see EmotionEngine.overload_reason)."""
    return engine.backend.backlog().clips_per_s, engine.turns_in_flight


async def _answer(engine: EmotionEngine, channel: _Channel, rid: int, op: str, args: tuple) -> None:
    try:
        if op == "status":
            value = await engine.status()
        else:
            wave, granularity, embeddings, timeout_s = args
            value = await engine.analyze_wave(wave, granularity=granularity, embeddings=embeddings, timeout_s=timeout_s)
        reply = (rid, value, None, _backlog(engine))
    except EmotionError as exc:
        reply = (rid, None, exc, _backlog(engine))
    except Exception as exc:  # a bug costs this turn, never the process
        log.exception("engine process request %s crashed", op)
        reply = (rid, None, InferenceFailed(f"the engine process failed: {type(exc).__name__}: {first_line(exc)}"), _backlog(engine))
    try:
        channel.send(reply)
    except Exception as exc:  # a result that cannot be sent must not leave its turn waiting
        log.exception("engine process reply to %s could not be sent", op)
        channel.send((rid, None, InferenceFailed(f"the engine process could not send the result: {first_line(exc)}"), reply[3]))


class EngineProcessBackend:
    """A Sanic worker's backend when the model runs in the engine process: batching and
    inference there, over one connection that carries every turn of this worker at once.
    ``on_lost`` is called when the engine process goes away (the plugin restarts it)."""

    def __init__(self, settings: Settings, path: str, *, on_lost=None) -> None:
        self.settings, self.path = settings, path
        self.warm = False
        self.error: str | None = None
        self._on_lost = on_lost
        self._link: asyncio.Task | None = None
        self._settled = asyncio.Event()  # ready, failed, or not there
        self._channel: _Channel | None = None
        self._replies: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._remote: dict = {}  # the engine process's last status
        self._shared: _SharedWaves | None = None
        self._lent: dict[int, int] = {}  # request id -> where its wave starts in the shared memory
        self._analyzing: set[int] = set()  # request ids of this worker's turns sent and not answered
        self._backlog = Backlog(0.0, 0)

    async def start(self) -> None:
        if self._link is None:
            self._shared = _SharedWaves.create()  # before the link, which offers it
            self._link = asyncio.ensure_future(self._keep_linked())
        await self._settled.wait()
        if self.error:
            raise ModelUnavailable(self.error)

    async def close(self) -> None:
        if self._link is not None:
            self._link.cancel()
        if self._channel is not None:
            self._channel.close()
        if self._shared is not None:
            self._shared.close()
        self._link = self._channel = self._shared = None

    @property
    def labels(self) -> list[str]:
        return list(self._remote.get("labels") or self.settings.labels or LABELS)

    def backlog(self) -> Backlog:
        return self._backlog

    async def infer(self, wave: np.ndarray, *, granularity: str, embeddings: bool, deadline: float) -> EmotionResult:
        return await self._call("analyze", wave, granularity, embeddings, deadline - time.monotonic())

    async def status(self) -> dict:
        """The engine process's status, with its CPU time named as its own."""
        trouble = None
        try:
            self._remote = await asyncio.wait_for(self._call("status"), 2.0)
        except EmotionError as exc:
            if self._settled.is_set():  # else still connecting, as the server starts: loading
                trouble = exc.message
        except asyncio.TimeoutError:
            trouble = "the engine process did not answer within 2 s"
        status = {"ready": False, "device": None, "runtime": None, "dtype": None, "labels": None, "test_checkpoint": None, "max_batch_size": None, "queue_depth": 0,
                  "graph_compiles_after_ready": None, **self._remote}
        theirs = status.pop("cpu_seconds", None) or {}
        # The engine process's event loop receives every worker's turns: the next limit.
        status["cpu_seconds"] = {"inference": theirs.get("inference", 0.0), "engine_process": theirs.get("process", 0.0),
                                 "engine_event_loop": theirs.get("event_loop", 0.0)}
        status["engine_process"] = status.pop("pid", None)
        status.pop("turns_in_flight", None)  # the engine process's, of every worker: not this engine's
        if trouble:
            status["ready"], status["error"] = False, trouble
        return status

    async def _keep_linked(self) -> None:
        loop = asyncio.get_running_loop()
        give_up = time.monotonic() + CONNECT_PATIENCE_S
        while True:
            lost = loop.create_future()
            try:
                self._channel, unshared = await self._connect(lost)
            except (OSError, asyncio.TimeoutError) as exc:
                if time.monotonic() >= give_up:  # from now on turns fail at once, until it is back
                    self.error = self.error or f"the engine process is not answering: {first_line(exc)}"
                    self._settled.set()
                await asyncio.sleep(0.25)
                continue
            self._remote = {}  # a restarted process is loading again
            if self._shared is not None:
                self._shared.ready = not unshared
                if unshared:  # turns cross the socket instead
                    log.warning("emotion: waves go through the engine socket: %s", unshared)
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
            self._analyzing.clear()
            self._backlog = Backlog(0.0, 0)
            if self._on_lost is not None:
                self._on_lost()
            give_up = time.monotonic()

    async def _connect(self, lost: asyncio.Future) -> tuple[_Channel, str]:
        """A connection to the engine process, with this worker's wave memory offered on
        it; returns the channel and why the memory is not used ("" if it is)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, self.path)
            unshared = await asyncio.wait_for(_offer(loop, sock, self._shared), _OFFER_TIMEOUT_S)
            _, channel = await loop.create_unix_connection(
                functools.partial(_Channel, self._replied, functools.partial(_settle, lost)), sock=sock)
        except BaseException:
            sock.close()
            raise
        return channel, unshared

    async def _await_ready(self) -> None:
        while not (self._remote.get("ready") or self._remote.get("error")):
            with contextlib.suppress(EmotionError, asyncio.TimeoutError):
                self._remote = await asyncio.wait_for(self._call("status"), 2.0)
            await asyncio.sleep(0.2)
        self.error = self._remote["error"]
        self.warm = not self.error
        self._settled.set()

    def _replied(self, message) -> None:
        rid, value, error, (clips_per_s, turns) = message
        offset = self._lent.pop(rid, None)
        if offset is not None and self._shared is not None:
            # The engine process answers once inference has read the wave. Only a turn it
            # gave up on may still be read as this is rewritten: its result goes to no one.
            self._shared.release(offset)
        self._analyzing.discard(rid)
        # The engine process's turns, less those of this worker still there: the others'.
        self._backlog = Backlog(clips_per_s, max(0, turns - len(self._analyzing)))
        future = self._replies.pop(rid, None)
        if future is None or future.done():
            return  # its turn gave up waiting
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    async def _call(self, op: str, *args):
        if self._channel is None:
            raise ModelUnavailable(self.error or "not connected to the engine process")
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._replies[rid] = future
        if op == "analyze":
            self._analyzing.add(rid)  # until answered, given up on or not
            if self._shared is not None and self._shared.ready:
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


async def _offer(loop: asyncio.AbstractEventLoop, sock: socket.socket, shared: _SharedWaves | None) -> str:
    """A worker's first message: its wave memory's size, the memfd beside it. Returns the
    engine process's answer: why it does not use the memory, or "" (it does, or none was offered)."""
    hello = _OFFER.pack(_OFFER_TAG, shared.size if shared is not None else 0)
    if shared is not None:
        socket.send_fds(sock, [hello], [shared.fd])  # a new connection's buffer takes it at once
    else:
        await loop.sock_sendall(sock, hello)
    (length,) = _LENGTH.unpack(await _recv_exactly(loop, sock, _LENGTH.size))
    if length > 4096:
        raise ConnectionError(f"an answer of {length} bytes to the offer")
    return (await _recv_exactly(loop, sock, length)).decode(errors="replace")


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise ConnectionResetError("the engine process closed the connection")
        data += chunk
    return data


class _SharedWaves:
    """A worker's memory for the waves it sends, mapped by the engine process once: a turn
    crosses the socket as an offset, and neither side copies it through the kernel (nor
    needs net.core.wmem_max raised). A memfd, not /dev/shm, which Docker gives 64 MB by
    default, passed to the engine process over the socket (SCM_RIGHTS) and sealed at its
    size, so that the engine process never reads past its end."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size, self.ready = fd, size, False
        self.array = np.frombuffer(mmap.mmap(fd, size), np.float32)
        self.used: list[tuple[int, int]] = []  # (start, end) sample ranges in flight, in order

    @classmethod
    def create(cls, size: int | None = None) -> _SharedWaves | None:
        size = size or _SHARED_BYTES
        fd = -1
        try:
            fd = os.memfd_create("emotion-waves", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, size)  # pages come as they are first written
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            return cls(fd, size)
        except (AttributeError, OSError) as exc:  # not Linux: the socket carries the waves
            if fd >= 0:
                os.close(fd)
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
    CPU, against 1.3-1.9 ms through StreamReaders and in-band pickles. A message whose
    header declares more than ``max_bytes`` closes the connection."""

    def __init__(self, on_message, on_lost, *, max_bytes: int | None = None) -> None:
        self.on_message, self.on_lost, self.max_bytes = on_message, on_lost, max_bytes
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
            if length < 8 or (self.max_bytes is not None and length > self.max_bytes):
                log.error("emotion: a message of %d bytes on the engine socket (the limit is %s); closing the connection",
                          length, self.max_bytes)
                self._next_header()
                self.close()
                return
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
