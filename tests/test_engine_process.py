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
from conftest import b64, rasa_call, slot_events, speech_like, wav_bytes
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
from emotion.serving import engine_process
from emotion.serving.engine_process import EngineClient, _Channel, _SharedWaves
from emotion.settings import Settings

SERVER_ENV = {"ACTION_SERVER_SANIC_WORKERS": "2"}


@pytest.fixture(scope="module")
def server(angry_server):
    return angry_server


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


@pytest.mark.parametrize("mappable", [True, False])
def test_waves_cross_in_shared_memory_and_score_as_sent(models, tmp_path, monkeypatch, caplog, mappable):
    """An engine process's serving side and a worker's client, over a real Unix socket in
    this process. The shared memory holds 6 s of audio, so some of the 14 concurrent turns
    cross in it and the rest through the socket; all score as the engine scores them. Where
    the engine process cannot map the worker's memory (a /proc it may not open: pid 0 here),
    every turn crosses the socket."""
    monkeypatch.setattr(engine_process, "_SHARED_BYTES", 6 * 16_000 * 4)
    if not mappable:
        real = engine_process._map_shared
        monkeypatch.setattr(engine_process, "_map_shared", lambda shared, pid, fd, size: real(shared, 0, fd, size))
    placed: list[int | None] = []
    put = _SharedWaves.put
    monkeypatch.setattr(_SharedWaves, "put", lambda self, wave: placed.append(put(self, wave)) or placed[-1])
    engine = EmotionEngine(Settings(model=str(models("random")), device="cpu", max_batch_size=8, warmup=False)).load()
    waves = [speech_like(1.0 + i % 4, seed=i) for i in range(14)]
    expected = [r.scores for r in engine.analyze_waves(waves)]
    path = str(tmp_path / "engine.sock")

    async def main():
        server = await asyncio.get_running_loop().create_unix_server(lambda: engine_process._serving(engine), path)
        client = EngineClient(Settings(), path)
        await client.start()
        try:
            for _ in range(2):  # the second round reuses what the first released
                results = await asyncio.gather(*(client.analyze_wave(w) for w in waves))
                for result, scores in zip(results, expected):
                    assert result.scores == pytest.approx(scores, abs=1e-5)
                assert client._shared.used == [] and client._lent == {}
        finally:
            await client.close()
            server.close()
            await engine.close()

    asyncio.run(main())
    if mappable:
        assert len(placed) == 28 and 2 <= sum(p is not None for p in placed) < 28, placed
    else:
        assert placed == []
        assert "waves go through the engine socket: cannot map the worker's shared memory" in caplog.text


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

        return value(r'^emotion_turns_total\{outcome="tagged"\} (\S+)$'), value(r"^emotion_batch_size_count (\S+)$")

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
    started = time.monotonic()
    slots = slot_events(post(server, rasa_call("c-lost", {"audio": {"base64": b64(wav_bytes(1.0))}})))
    assert time.monotonic() - started < 2  # no waiting out the turn limit
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


def test_a_model_that_failed_to_load_in_the_engine_process(start_action_server, tmp_path):
    srv = start_action_server({"EMOTION_MODEL": str(tmp_path / "no-model-here"), **SERVER_ENV})
    ready = httpx.get(srv.url + "/ready")
    assert ready.status_code == 503 and "no model directory" in ready.json()["error"]
    slots = slot_events(post(srv, rasa_call("c-1", {"audio": {"base64": b64(wav_bytes(1.0))}})))
    assert slots["emotion_error"].startswith("[model_unavailable] no model directory") and slots["escalate"] is False


def test_fail_fast_stops_the_server_when_the_engine_process_cannot_load(tmp_path):
    proc = run_server_to_exit({"EMOTION_MODEL": str(tmp_path / "missing"), "EMOTION_FAIL_FAST": "true", **SERVER_ENV})
    assert proc.returncode != 0
    assert "EMOTION_FAIL_FAST: no model directory at" in proc.stdout + proc.stderr
