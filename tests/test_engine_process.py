"""Two Sanic workers and one engine process: the action server's tests again, then what
only this layout has (one model in memory, a lost engine process restarted)."""

import asyncio
import itertools
import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import b64, loaded, rasa_call, slot_events, speech_like, wav_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from test_action_server import (  # noqa: F401  (collected here again, on this module's server)
    post,
    run_server_to_exit,
    test_a_new_session_starts_with_no_history_and_no_cooldown,
    test_bad_audio_gets_emotion_error_and_the_server_keeps_serving,
    test_base64_turn_is_tagged_and_escalates,
    test_concurrent_turns_are_all_answered,
    test_handoff_sends_context_pauses_and_resets,
    test_metrics_are_exposed,
    test_path_turn,
    test_telephony_mulaw_turn,
    test_url_turn,
)
from test_api import test_frames_with_embeddings, test_multipart_upload  # noqa: F401  (again, through the engine process)

from emotion.engine.core import EmotionEngine
from emotion.errors import Overloaded
from emotion.serving import engine_process, plugin
from emotion.serving.engine_process import EngineProcessBackend, _Channel, _SharedWaves
from emotion.settings import Settings

SERVER_ENV = {"ACTION_SERVER_SANIC_WORKERS": "2"}


@pytest.fixture(scope="module")
def server(workers_server):
    return workers_server


class Transport:
    """A sending end's transport that keeps what it is given, on a real socket (for its
    options)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.ends = socket.socketpair()

    def get_extra_info(self, name):
        return {"socket": self.ends[0]}[name]

    def write(self, data):
        self.written.append(bytes(data))

    def is_closing(self):
        return False

    def close(self):
        for end in self.ends:
            end.close()


def test_the_channel_frames_messages_however_the_bytes_arrive():
    """The servers' tests send every message through a real socket; here the bytes the
    sender writes are fed to the receiver in chunks of 1 to 100 bytes, which no socket
    can be made to do on purpose."""
    transport = Transport()

    messages = [
        (1, "status", ()),
        (2, "analyze", (np.arange(7, dtype=np.float32), "utterance", False, 1.5)),
        (3, {"scores": np.zeros(0, np.float32), "frames": np.ones((3, 5))}, None),
        (4, "analyze", (np.linspace(-1, 1, 16_001, dtype=np.float32), "frame", True, 0.25)),
    ]
    sender = _Channel(lambda m: None, lambda: None)
    sender.connection_made(transport)
    transport.close()
    for m in messages:
        sender.send(m)
    stream, got = b"".join(transport.written), []
    receiver = _Channel(got.append, lambda: None)
    pos = 0
    for step in itertools.cycle([1, 7, 100, 3]):
        if pos == len(stream):
            break
        buffer = receiver.get_buffer(-1)
        n = min(step, len(buffer), len(stream) - pos)
        buffer[:n] = stream[pos : pos + n]
        receiver.buffer_updated(n)
        pos += n
    assert [m[0] for m in got] == [1, 2, 3, 4]
    assert got[0] == messages[0] and got[1][2][1:] == messages[1][2][1:] and got[3][2][1:] == messages[3][2][1:]
    for sent, received in ((messages[1][2][0], got[1][2][0]), (messages[3][2][0], got[3][2][0])):
        assert received.dtype == np.float32 and np.array_equal(received, sent)
        assert received.ctypes.data % 16 == 0  # aligned, as torch.from_numpy wants
    assert got[2][1]["scores"].shape == (0,) and np.array_equal(got[2][1]["frames"], np.ones((3, 5)))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 700), st.integers(-8, -1)), max_size=60))
def test_shared_memory_never_hands_out_a_wave_still_in_flight(ops):
    """Positive: put a wave of that many samples; negative: release the n-th one in flight.
    Every wave in flight must still read back as written, wherever the others went."""
    shared = _SharedWaves.create(4096)
    flight: list[tuple[int, np.ndarray]] = []
    try:
        for i, op in enumerate(ops):
            if op < 0:
                if flight:
                    shared.release(flight.pop(-op % len(flight))[0])
                continue
            wave = np.full(op, i + 1, np.float32)  # each wave its own value
            offset = shared.put(wave)
            if offset is None:
                assert flight, "an empty memory refused a wave that fits"
                continue
            assert offset * 4 % 16 == 0 and (offset + len(wave)) * 4 <= shared.size
            flight.append((offset, wave))
        for offset, wave in flight:
            assert np.array_equal(shared.array[offset : offset + len(wave)], wave)
        for offset, _ in flight:
            shared.release(offset)
        assert shared.used == []
    finally:
        shared.close()


def worker_engine(path: str, **settings) -> EmotionEngine:
    """A Sanic worker's engine, as the plugin builds it."""
    return EmotionEngine(Settings(**settings), backend=EngineProcessBackend(Settings(**settings), path))


@pytest.mark.parametrize("memory", ["shared", "unmappable", "no memfd"])
def test_waves_cross_in_shared_memory_and_score_as_sent(models, tmp_path, monkeypatch, caplog, memory):
    """An engine process's serving side and a worker's engine, over a real Unix socket in
    this process. The shared memory holds 6 s of audio, so some of the 14 concurrent turns
    cross in it and the rest through the socket; all score as the engine scores them. Where
    the engine process cannot map the worker's memory (here it finds less than was
    offered), or the worker has none to offer, every turn crosses the socket."""
    monkeypatch.setattr(engine_process, "_SHARED_BYTES", 6 * 16_000 * 4)
    if memory == "unmappable":
        real = engine_process._map_shared
        monkeypatch.setattr(engine_process, "_map_shared", lambda fd, size: real(fd, size + 4096))
    if memory == "no memfd":
        monkeypatch.setattr(_SharedWaves, "create", classmethod(lambda cls, size=None: None))
    placed: list[int | None] = []
    put = _SharedWaves.put
    monkeypatch.setattr(_SharedWaves, "put", lambda self, wave: placed.append(put(self, wave)) or placed[-1])
    engine = loaded(Settings(model=str(models("random")), device="cpu", max_batch_size=8, warmup=False))
    waves = [speech_like(1.0 + i % 4, seed=i) for i in range(14)]
    expected = [r.scores for r in engine.analyze_waves(waves)]
    path = str(tmp_path / "engine.sock")

    async def main():
        server = await engine_process.listen(engine, path)
        client = worker_engine(path)
        await client.start()
        try:
            for _ in range(2):  # the second round reuses what the first released
                results = await asyncio.gather(*(client.analyze_wave(w) for w in waves))
                for result, scores in zip(results, expected):
                    assert result.scores == pytest.approx(scores, abs=1e-5)
                assert client.backend._lent == {}
                assert memory == "no memfd" or client.backend._shared.used == []
        finally:
            await client.close()
            server.close()
            await engine.close()

    asyncio.run(main())
    if memory == "shared":
        assert len(placed) == 28 and 2 <= sum(p is not None for p in placed) < 28, placed
        assert "waves go through the engine socket" not in caplog.text
    else:
        assert placed == []
    if memory == "unmappable":
        assert "waves go through the engine socket: cannot map the worker's shared memory: an offer of" in caplog.text


def raw_connection(path: str, offered_bytes: int = 0) -> socket.socket:
    """A connection to the engine socket as a worker opens it, with no memory offered."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    sock.sendall(engine_process._OFFER.pack(engine_process._OFFER_TAG, offered_bytes))
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def serve_in_thread(engine: EmotionEngine, path: str):
    """The engine process's listener on an event loop of its own thread; returns a stopper."""
    import threading

    loop = asyncio.new_event_loop()
    started = threading.Event()
    box = {}

    async def main():
        box["server"] = await engine_process.listen(engine, path)
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(main()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(10)

    def stop():
        loop.call_soon_threadsafe(box["server"].close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    return stop


def test_a_peer_of_another_user_is_turned_away(tmp_path, monkeypatch, caplog):
    """SO_PEERCRED: the kernel's record of who connected. Faked here as another user, the
    connection is closed before its first message is read."""
    monkeypatch.setattr(engine_process, "_peer_uid", lambda conn: os.getuid() + 1)
    path = str(tmp_path / "engine.sock")
    stop = serve_in_thread(EmotionEngine(Settings()), path)
    try:
        with raw_connection(path) as sock:
            assert closed_by_peer(sock)
    finally:
        stop()
    assert f"from uid {os.getuid() + 1}; this process runs as {os.getuid()}" in caplog.text


def test_a_message_longer_than_any_request_closes_the_connection(tmp_path, caplog):
    """The engine process allocates what a header declares: past twice the longest wave
    the settings allow, it closes the connection instead."""
    settings = Settings(max_audio_seconds=2.0)
    cap = engine_process.max_request_bytes(settings)
    assert cap == 2 * 2 * 16_000 * 4 + (1 << 20)
    path = str(tmp_path / "engine.sock")
    stop = serve_in_thread(EmotionEngine(settings), path)
    try:
        with raw_connection(path) as sock:
            assert sock.recv(8) == engine_process._LENGTH.pack(0)  # answered: no memory to map
            sock.sendall(engine_process._LENGTH.pack(cap + 1))
            assert closed_by_peer(sock)
    finally:
        stop()
    assert f"a message of {cap + 1} bytes on the engine socket (the limit is {cap}); closing the connection" in caplog.text


def slowed(engine: EmotionEngine, seconds: float) -> EmotionEngine:
    real = engine.backend.model.forward

    def slow(waves, **kwargs):
        time.sleep(seconds)
        return real(waves, **kwargs)

    engine.backend.model.forward = slow
    return engine


def test_a_worker_refuses_at_once_what_the_engine_process_could_not_finish(tiny_model, tmp_path):
    """The engine process's answers carry its inference rate (here about 5 clips/s): a
    worker refuses the turns that would finish past EMOTION_TURN_TIMEOUT_S on arrival,
    before it decodes them, as one process does (test_engine's test of the same)."""
    engine = slowed(loaded(Settings(model=str(tiny_model), device="cpu", warmup=False, max_batch_size=1,
                                    turn_timeout_s=60.0)), 0.2)  # it would take them all: the worker must refuse
    path = str(tmp_path / "engine.sock")

    async def main():
        server = await engine_process.listen(engine, path)
        worker = worker_engine(path, turn_timeout_s=2.0)
        decoded = []
        worker.decode_sync = lambda data, *a: decoded.append(data) or speech_like(1.0)
        try:
            await worker.start()
            await worker.analyze_bytes(b"learn the rate")
            turns = [asyncio.ensure_future(worker.analyze_bytes(b"turn")) for _ in range(20)]
            await asyncio.sleep(0)
            refused = [t for t in turns if t.done()]  # refused before their first await
            out = await asyncio.gather(*turns, return_exceptions=True)
            return refused, out, decoded
        finally:
            await worker.close()
            server.close()
            await engine.close()

    refused, out, decoded = asyncio.run(main())
    overloaded = [r for r in out if isinstance(r, Overloaded)]
    assert 5 <= 20 - len(overloaded) <= 12  # about 5 clips/s x 2 s admitted
    assert len(refused) == len(overloaded) and "past the 2 s turn limit" in overloaded[0].message
    assert len(decoded) == 1 + 20 - len(overloaded)  # no refused turn was decoded
    assert sum(not isinstance(r, Exception) for r in out) >= 5


def test_a_worker_counts_the_other_workers_turns_in_the_engine_process(tiny_model, tmp_path):
    """Two workers: while the first has eight turns in the engine process, the second
    (with a 1 s turn limit) learns of them from the engine process's answer and refuses
    its own turn at once, though it has none in progress itself."""
    engine = slowed(loaded(Settings(model=str(tiny_model), device="cpu", warmup=False, max_batch_size=1,
                                    turn_timeout_s=60.0)), 0.2)
    path = str(tmp_path / "engine.sock")

    async def main():
        server = await engine_process.listen(engine, path)
        first, second = worker_engine(path, turn_timeout_s=5.0), worker_engine(path, turn_timeout_s=1.0)
        try:
            for worker in (first, second):
                await worker.start()
                await worker.analyze_wave(speech_like(1.0))  # each learns the rate
            assert second.overload_reason is None
            busy = [asyncio.ensure_future(first.analyze_wave(speech_like(1.0, seed=i))) for i in range(8)]
            await asyncio.sleep(0.3)
            await second.status()
            elsewhere = second.backend.backlog().turns_elsewhere
            with pytest.raises(Overloaded, match="turns in progress would take"):
                await second.analyze_wave(speech_like(1.0))
            results = await asyncio.gather(*busy)
            return elsewhere, results, second.turns_in_flight
        finally:
            for worker in (first, second):
                await worker.close()
            server.close()
            await engine.close()

    elsewhere, results, in_flight = asyncio.run(main())
    assert 5 <= elsewhere <= 8 and in_flight == 0
    assert all(r.emotion for r in results)


def test_the_plugin_gives_a_worker_the_engine_process_backend_its_tracer_and_restarts(monkeypatch, tmp_path):
    """Built as the worker starts, with what only the app knows then: rasa-sdk's tracer
    provider, and whether this is the worker that restarts a lost engine process."""
    from types import SimpleNamespace

    from opentelemetry.sdk.trace import TracerProvider

    monkeypatch.setenv(engine_process.ENGINE_SOCKET_ENV, str(tmp_path / "engine.sock"))
    workers = {"Sanic-Server-0-0": {"server": True}, "Sanic-Server-1-0": {"server": True}, "Sanic-EmotionEngine-0": {}}
    for name, restarts in (("Sanic-Server-0-0", True), ("Sanic-Server-1-0", False)):
        app = SimpleNamespace(ctx=SimpleNamespace(tracer_provider=TracerProvider()), m=SimpleNamespace(name=name, workers=workers))
        engine = plugin.EmotionPlugin()._build_engine(app)
        assert isinstance(engine.backend, EngineProcessBackend) and engine.backend.path == str(tmp_path / "engine.sock")
        assert engine.tracer is not None and engine.freeze_heap and engine.fetches_urls
        assert (engine.backend._on_lost is not None) is restarts


def test_restarting_an_engine_process_the_manager_no_longer_lists(caplog):
    from types import SimpleNamespace

    app = SimpleNamespace(m=SimpleNamespace(workers={"Sanic-Server-0-0": {"server": True}}))
    asyncio.run(plugin._restart_engine_process(app))
    assert "the engine process is not among the server's processes; not restarting it" in caplog.text


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
        found += kids
        todo += kids
    return found


def mapped(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def holds_torch(pid: int) -> bool:
    return "libtorch" in mapped(pid)


def api_turns(url: str, n: int) -> list[httpx.Response]:
    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(url + "/v1/analyze", content=wav_bytes(1.0 + i % 4, seed=i),
                                                      headers={"Content-Type": "audio/wav"}) for i in range(n)))

    return asyncio.run(main())


def test_one_process_holds_the_model_and_every_worker_is_served(server):
    status = httpx.get(server.url + "/ready").json()
    assert status["ready"] is True and status["labels"][0] == "angry"
    engine = status["engine_process"]
    assert [p for p in descendants(server.proc.pid) if holds_torch(p)] == [engine]
    for r in api_turns(server.url, 16):
        assert r.status_code == 200 and r.json()["emotion"] == "angry" and r.json()["confidence"] == pytest.approx(0.9)
    assert mapped(engine).count("memfd:emotion-waves") == 2  # each worker's wave memory
    cpu = httpx.get(server.url + "/ready").json()["cpu_seconds"]
    assert cpu["inference"] > 0 and cpu["engine_process"] > cpu["inference"] and cpu["event_loop"] > 0


def test_metrics_sum_every_worker_and_the_engine_process(server):
    def counts() -> tuple[float, float]:
        text = httpx.get(server.url + "/metrics").text  # a new connection each time: any worker answers

        def value(pattern):
            found = re.search(pattern, text, re.M)
            return float(found.group(1)) if found else 0.0

        return value(r'^emotion_turns_total\{outcome="tagged",path="webhook"\} (\S+)$'), value(r"^emotion_batch_size_count (\S+)$")

    before = {counts() for _ in range(8)}
    assert len(before) == 1  # the same sums from whichever worker answers
    (tagged, batches), = before
    for i in range(6):
        post(server, rasa_call(f"c-metrics-{i}", {"audio": {"base64": b64(wav_bytes(1.0, seed=i))}}))
    assert {counts() for _ in range(8)} == {(tagged + 6, batches + 6)}  # one clip a batch on CPU


def test_a_lost_engine_process_fails_turns_at_once_and_is_restarted(server):
    engine = httpx.get(server.url + "/ready").json()["engine_process"]
    os.kill(engine, signal.SIGKILL)
    time.sleep(0.5)
    slots = slot_events(post(server, rasa_call("c-lost", {"audio": {"base64": b64(wav_bytes(1.0))}})))
    # The reason at once, not "[timeout]" after waiting out the turn limit.
    assert slots["emotion_error"].startswith("[model_unavailable] the engine process") and slots["escalate"] is False
    assert httpx.get(server.url + "/health").status_code == 200
    deadline = time.monotonic() + 120
    while httpx.get(server.url + "/ready").status_code != 200:
        assert time.monotonic() < deadline, "the engine process was not restarted"
        time.sleep(0.5)
    assert httpx.get(server.url + "/ready").json()["engine_process"] not in (engine, None)
    # Both workers reconnect: enough turns that each gets some.
    for r in api_turns(server.url, 12):
        assert r.status_code == 200 and r.json()["emotion"] == "angry"
    restarted = httpx.get(server.url + "/ready").json()["engine_process"]
    assert mapped(restarted).count("memfd:emotion-waves") == 2  # offered again on reconnecting


def test_a_model_that_failed_to_load_in_the_engine_process(broken_workers_server):
    srv = broken_workers_server
    ready = httpx.get(srv.url + "/ready")
    assert ready.status_code == 503 and "no model directory" in ready.json()["error"]
    slots = slot_events(post(srv, rasa_call("c-1", {"audio": {"base64": b64(wav_bytes(1.0))}})))
    assert slots["emotion_error"].startswith("[model_unavailable] no model directory") and slots["escalate"] is False


def test_fail_fast_stops_the_server_when_the_engine_process_cannot_load(tmp_path):
    proc = run_server_to_exit({"EMOTION_MODEL": str(tmp_path / "missing"), "EMOTION_FAIL_FAST": "true", **SERVER_ENV})
    assert proc.returncode != 0
    assert "EMOTION_FAIL_FAST: no model directory at" in proc.stdout + proc.stderr
