"""The engine: long turns windowed, segments, frames, embeddings, timings, tracing spans."""

import asyncio
import time

import numpy as np
import pytest
from conftest import encode, loaded, speech_like

from emotion.engine.core import EmotionEngine
from emotion.engine.plan import split
from emotion.errors import ConfigError, InvalidAudio, TimedOut
from emotion.settings import Settings


@pytest.fixture(scope="module")
def engine(tiny_model):
    return loaded(Settings(model=str(tiny_model), device="cpu", window_seconds=10.0, warmup=False))


@pytest.mark.parametrize("n,size,hop,expected", [
    (5, 10, 10, [(0, 5)]),
    (10, 10, 10, [(0, 10)]),
    (25, 10, 10, [(0, 10), (10, 20), (20, 25)]),
    (23, 10, 10, [(0, 10), (10, 23)]),
    (7, 3, 1.5, None),
])
def testsplit(n, size, hop, expected):
    if expected is None:
        spans = split(70, 30, 15)
        assert spans == [(0, 30), (15, 45), (30, 60), (45, 70)]
        return
    assert split(n, size, hop) == expected


def test_long_turn_is_windowed_and_aggregated(engine):
    wave = speech_like(25.0, seed=4)
    (result,) = engine.analyze_waves([wave], embeddings=True)
    windows = [wave[0:160_000], wave[160_000:320_000], wave[320_000:]]
    outs = engine.backend.model.forward(windows, embeddings=True)
    frames = np.array([o.frames for o in outs])
    mean = (np.stack([o.embedding for o in outs]) * frames[:, None]).sum(0) / frames.sum()
    assert np.abs(result.embedding - mean).max() < 1e-5
    expected = engine.backend.model.head.probs(mean.astype(np.float32))
    assert np.abs(np.array(list(result.scores.values())) - expected).max() < 1e-5
    assert result.duration_s == 25.0


def test_turn_within_the_window_is_one_clip(engine):
    wave = speech_like(8.0, seed=5)
    (result,) = engine.analyze_waves([wave])
    assert np.abs(np.array(list(result.scores.values())) - engine.backend.model.forward([wave])[0].probs).max() < 1e-6


def test_segments_and_frames(engine):
    wave = speech_like(7.0, seed=6)
    seg, frame = engine.analyze_waves([wave], granularity="segment")[0], engine.analyze_waves([wave], granularity="frame")[0]
    assert [(s.start_s, s.end_s) for s in seg.segments] == [(0.0, 3.0), (1.5, 4.5), (3.0, 6.0), (4.5, 7.0)]
    assert all(abs(sum(s.scores.values()) - 1) < 1e-5 for s in seg.segments)
    assert len(frame.segments) == 349 and frame.segments[-1].end_s == pytest.approx(6.98)


def test_frame_embeddings_on_request(engine):
    (result,) = engine.analyze_waves([speech_like(2.0)], granularity="frame", embeddings=True)
    assert result.frame_embeddings.shape == (99, engine.backend.model.embed_dim)
    assert result.embedding.shape == (engine.backend.model.embed_dim,)


def test_unknown_granularity(engine):
    with pytest.raises(ConfigError, match="granularity"):
        engine.analyze_waves([speech_like(1.0)], granularity="word")


def test_async_bytes_path_records_timings_and_spans(tiny_model):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = EmotionEngine(Settings(model=str(tiny_model), device="cpu", warmup=False), tracer=provider.get_tracer("test"))

    async def main():
        result = await engine.analyze_bytes(encode(speech_like(2.0, 8000), 8000, "WAV", "PCM_16"))
        with pytest.raises(InvalidAudio):
            await engine.analyze_bytes(b"")
        await engine.close()
        return result

    result = asyncio.run(main())
    assert set(result.timings_ms) == {"decode", "inference"} and all(v > 0 for v in result.timings_ms.values())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"emotion.decode", "emotion.inference"} <= set(spans)
    assert spans["emotion.inference"].attributes["audio_seconds"] == 2.0


def test_cpu_seconds_by_thread_role(tiny_model):
    engine = EmotionEngine(Settings(model=str(tiny_model), device="cpu", warmup=False))
    flac = encode(speech_like(30.0, 44_100, seed=3), 44_100, "FLAC")  # decoding and resampling cost CPU

    async def main():
        await engine.start()
        before = engine.cpu_seconds()
        await asyncio.gather(*(engine.analyze_bytes(flac) for _ in range(3)))
        after = engine.cpu_seconds()
        await engine.close()
        return before, after

    before, after = asyncio.run(main())
    spent = {k: after[k] - before.get(k, 0.0) for k in after}
    assert set(spent) == {"process", "event_loop", "decode", "inference"}
    assert spent["decode"] > 0 and spent["inference"] > 0 and spent["event_loop"] > 0
    assert spent["process"] >= spent["decode"] + spent["inference"] + spent["event_loop"] - 0.01
    assert spent["event_loop"] < spent["decode"]  # decoding runs off the loop (~10x apart here)
    assert asyncio.run(engine.status())["cpu_seconds"]["decode"] == pytest.approx(after["decode"])


def test_the_servers_engine_freezes_what_loading_left_on_the_heap(tiny_model):
    import gc

    engine = EmotionEngine(Settings(model=str(tiny_model), device="cpu", warmup=False), freeze_heap=True)

    async def main():
        await engine.start()
        await engine.close()

    try:
        asyncio.run(main())
        assert gc.get_freeze_count() > 10_000  # the loaded model and its libraries
    finally:
        gc.unfreeze()
    plain = loaded(Settings(model=str(tiny_model), device="cpu", warmup=False))
    assert plain.backend.model is not None and gc.get_freeze_count() == 0  # a library caller's heap is theirs


def test_inference_time_limit(tiny_model):
    engine = EmotionEngine(Settings(model=str(tiny_model), device="cpu", warmup=False, turn_timeout_s=0.1))

    async def main():
        await engine.start()
        real = engine.backend.model.forward
        engine.backend.model.forward = lambda *a, **k: (__import__("time").sleep(0.5), real(*a, **k))[1]
        try:
            with pytest.raises(TimedOut, match="ran past its 0.1 s limit while running inference"):
                await engine.analyze_wave(speech_like(1.0))
        finally:
            engine.backend.model.forward = real
            await engine.close()

    asyncio.run(main())


def test_out_of_memory_batches_are_retried_smaller_then_fail_alone(tiny_model):
    """Fault injection on the real model wrapper: the forward pass raises CUDA's OOM error
    for batches over two clips, and for one clip longer than 5 s."""
    import torch

    engine = loaded(Settings(model=str(tiny_model), device="cpu", warmup=False, max_batch_size=8, max_wait_ms=50))

    def flaky(real):
        def run(waves):
            if len(waves) > 2 or max(map(len, waves)) > 5 * 16000:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return real(waves)

        return run

    engine.backend.model._packed, engine.backend.model._alone = flaky(engine.backend.model._packed), flaky(engine.backend.model._alone)
    waves = [speech_like(1.0 + i % 3, seed=i) for i in range(6)] + [speech_like(6.0, seed=9)]

    async def main():
        out = await asyncio.gather(*(engine.analyze_wave(w) for w in waves), return_exceptions=True)
        stats = engine.backend.stats
        await engine.close()
        return out, stats

    out, stats = asyncio.run(main())
    from emotion.errors import InferenceFailed

    assert all(not isinstance(r, Exception) for r in out[:6])
    assert isinstance(out[6], InferenceFailed) and "out of memory" in str(out[6])
    assert stats.splits >= 1 and max(stats.sizes) <= 2


@pytest.mark.parametrize("max_batch", [64, 8])
def test_warmup_runs_every_token_budget_a_batch_can_need(tiny_model, max_batch):
    """On a GPU each token budget is a graph compiled at its first forward: warm-up must
    run every budget a batch can reach (and none it cannot)."""
    from emotion.engine.model import TOKEN_BUDGETS, plan_pack

    config = Settings(model=str(tiny_model), device="cpu", warmup=False, max_batch_size=max_batch, window_seconds=30.0)
    engine = loaded(config)
    model = engine.backend.model
    model.budgets = TOKEN_BUDGETS  # as on a GPU; the batches are recorded, not run
    budgets = []
    model.forward = lambda waves, **_: budgets.append(len(plan_pack(
        [len(w) for w in waves], frames=model.frames, stride=model.stride, receptive=model.frames_to_samples(1),
        extra=model.tokens(0), gap=model._gap, budgets=model.budgets).doc))
    engine.backend._warmup()
    largest = min(engine.backend._max_batch_cost, max_batch * model.tokens(30 * 16000))
    needed = [b for i, b in enumerate(TOKEN_BUDGETS) if i == 0 or TOKEN_BUDGETS[i - 1] < largest]
    assert sorted(set(budgets)) == needed
    assert (max_batch == 64) == (32768 in needed)


def test_segment_headline_is_the_utterance_result(engine):
    wave = speech_like(7.0, seed=6)
    utterance, segment = engine.analyze_waves([wave])[0], engine.analyze_waves([wave], granularity="segment")[0]
    assert segment.emotion == utterance.emotion
    assert max(abs(segment.scores[k] - v) for k, v in utterance.scores.items()) < 1e-6
    assert len(segment.segments) == 4


def test_long_turns_are_aggregated_on_the_host_while_a_batch_runs(engine):
    """The head is applied in numpy: aggregating a long turn's windows needs neither the
    device nor the model's lock, which a batch in flight holds."""
    import torch

    from emotion.engine.plan import assemble, clips_for

    x = np.random.default_rng(0).standard_normal((5, engine.backend.model.embed_dim)).astype(np.float32)
    with torch.inference_mode():
        expected = engine.backend.model._probs(torch.from_numpy(x)).numpy()
    assert np.abs(engine.backend.model.head.probs(x) - expected).max() < 1e-6

    wave = speech_like(25.0, seed=4)
    plan = engine.backend._plan(len(wave), "utterance")
    outputs = engine.backend.model.forward([c.wave for c in clips_for(wave, plan, False)], embeddings=True)
    with engine.backend.model._lock:  # as while the inference thread runs a batch
        result = assemble(plan, outputs, engine.backend.model.head)
    (reference,) = engine.analyze_waves([wave])
    assert result.scores == pytest.approx(reference.scores, abs=1e-6)


def test_analyze_waves_batches_like_the_micro_batcher(tiny_model):
    """Same plan, same cost cap, and a clip that fails fails only its own file."""
    engine = loaded(Settings(model=str(tiny_model), device="cpu", warmup=False, max_batch_size=64,
                             max_batch_audio_seconds=12.0))
    seen = []
    real = engine.backend.model.forward

    def recording(waves, **kwargs):
        seen.append([len(w) / 16000 for w in waves])
        if any(len(w) == 16000 * 3 + 7 for w in waves):
            raise RuntimeError("poisoned clip")
        return real(waves, **kwargs)

    engine.backend.model.forward = recording
    waves = [speech_like(s, seed=i) for i, s in enumerate([1.0, 1.5, 2.0, 4.0, 6.0, 1.2])]
    waves.insert(3, np.concatenate([speech_like(3.0, seed=9), np.zeros(7, np.float32)]))  # the poisoned one
    results = engine.analyze_waves(waves)
    from emotion.errors import InferenceFailed

    assert isinstance(results[3], InferenceFailed) and "poisoned" in results[3].message
    assert all(not isinstance(r, Exception) for i, r in enumerate(results) if i != 3)
    cap = engine.backend.model.tokens(12 * 16000)
    assert len(seen) > 1 and all(sum(engine.backend.model.tokens(int(s * 16000)) for s in batch) <= cap for batch in seen)


def test_a_decode_past_its_time_limit_stops_its_thread(monkeypatch):
    """The turn gets `timeout`, and the thread that decodes it stops at its next block
    instead of decoding on for nobody: each block takes 50 ms here, the turn's 15 would
    take 0.75 s, the limit is 0.2 s."""
    import soundfile as sf

    real_read, reads = sf.SoundFile.read, []

    def slow_read(self, *args, **kwargs):
        time.sleep(0.05)
        reads.append(time.monotonic())
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", slow_read)
    engine = EmotionEngine(Settings(device="cpu", warmup=False, decode_timeout_s=0.2))
    real_decode, ended = engine.decode_sync, []

    def decode(*args):
        try:
            return real_decode(*args)
        except Exception as exc:
            ended.append(exc)
            raise

    engine.decode_sync = decode
    data = encode(speech_like(60.0), 16000, "WAV", "PCM_16")

    async def main():
        # The loop's timer usually answers first ("decoding took longer than 0.2 s"); when the
        # thread's check between blocks wins the race, its own TimedOut is the answer.
        with pytest.raises(TimedOut, match="decoding (took longer than 0.2 s|ran past its time limit)"):
            await engine.analyze_bytes(data)
        await asyncio.to_thread(engine._decoder.shutdown, wait=True)
        await engine.close()

    asyncio.run(main())
    assert len(ended) == 1 and isinstance(ended[0], TimedOut), ended
    assert len(reads) < 16  # 15 blocks and the read that finds the end


def test_one_deadline_for_the_whole_turn(tiny_model, http_server):
    """Fetch, decode, load and inference share EMOTION_TURN_TIMEOUT_S: a slow audio URL
    within its own fetch limit still cannot hold the turn past the turn's limit."""
    from emotion.engine.fetch import AudioRef

    http_server.routes["/slow.wav"] = (200, {"Content-Length": "100000"}, lambda w: (w.write(b"RIFF"), w.flush(), time.sleep(4)))
    engine = EmotionEngine(Settings(model=str(tiny_model), device="cpu", warmup=False, url_allow=("127.0.0.1",),
                                        fetch_timeout_s=3.0, turn_timeout_s=1.0))

    async def main():
        started = time.monotonic()
        with pytest.raises(TimedOut, match="ran past its 1 s limit while fetching the audio"):
            await engine.analyze_ref(AudioRef("url", http_server.url + "/slow.wav"))
        elapsed = time.monotonic() - started
        await engine.close()
        return elapsed

    assert asyncio.run(main()) < 1.8


def test_model_code_that_cannot_load_is_named(tiny_model, monkeypatch):
    """An old torch without FlexAttention: /ready says why instead of error: null."""
    import sys

    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)
    monkeypatch.delitem(sys.modules, "emotion.engine.model", raising=False)
    engine = EmotionEngine(Settings(model=str(tiny_model), device="cpu", warmup=False))
    from emotion.errors import ModelUnavailable

    with pytest.raises(ModelUnavailable, match=r"torch .* is too old: .* needs torch >= 2.5"):
        engine.backend.load()
    status = asyncio.run(engine.status())
    assert "too old" in status["error"] and status["ready"] is False


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_an_error_without_a_message_still_says_what_failed(tiny_model, runtime, monkeypatch):
    from emotion.errors import InferenceFailed

    def empty(*args, **kwargs):
        raise RuntimeError("")

    model = loaded(Settings(model=str(tiny_model), device="cpu", runtime=runtime, warmup=False)).backend.model
    # What runs a clip: FunASR's forward, or the ONNX Runtime session.
    target, name = (model.net, "extract_features") if runtime == "torch" else (model._onnx.session, "run")
    monkeypatch.setattr(target, name, empty)
    with pytest.raises(InferenceFailed, match="inference failed: RuntimeError"):
        model.forward([speech_like(1.0)])


def test_label_subset_renormalises(models):
    model_dir = models("spread", angry=0.4, happy=0.2, neutral=0.1, sad=0.1)
    full = loaded(Settings(model=str(model_dir), device="cpu", warmup=False))
    subset = loaded(Settings(model=str(model_dir), device="cpu", warmup=False, labels=("angry", "happy", "neutral", "sad")))
    wave = speech_like(2.0)
    (a,), (b,) = full.analyze_waves([wave]), subset.analyze_waves([wave], granularity="segment")
    assert list(b.scores) == ["angry", "happy", "neutral", "sad"] and subset.labels == list(b.scores)
    assert b.scores["angry"] == pytest.approx(0.4 / 0.8, abs=1e-5) and b.confidence == pytest.approx(0.5, abs=1e-5)
    assert set(b.segments[0].scores) == set(b.scores)
    assert a.scores["angry"] == pytest.approx(0.4, abs=1e-5)


def test_label_subset_the_model_lacks(models):
    from emotion.errors import ModelUnavailable
    from emotion.tools.checkpoint import TOKENS, write_checkpoint

    four = write_checkpoint(models("random").parent / "four", tokens=TOKENS[:4] + ["unuse_1", "<unk>"])
    with pytest.raises(ModelUnavailable, match=r"EMOTION_LABELS names \['sad'\], which this model lacks"):
        loaded(Settings(model=str(four), device="cpu", warmup=False, labels=("angry", "sad")))


def test_the_callers_channel_alone_is_scored(tiny_model):
    caller, agent = speech_like(2.0, seed=1), speech_like(2.0, seed=2)
    stereo = encode(np.stack([caller, agent], axis=1), 16000, "WAV", "FLOAT")
    engine = EmotionEngine(Settings(model=str(tiny_model), device="cpu", warmup=False))

    async def main():
        out = [await engine.analyze_bytes(stereo, channel=c) for c in (0, 1, None)]
        out.append(await engine.analyze_bytes(encode(agent, 16000, "WAV", "FLOAT")))
        await engine.close()
        return out

    left, right, mix, agent_alone = asyncio.run(main())
    assert right.scores == pytest.approx(agent_alone.scores, abs=1e-6)
    assert max(abs(left.scores[k] - right.scores[k]) for k in left.scores) > 1e-4
    assert max(abs(mix.scores[k] - right.scores[k]) for k in mix.scores) > 1e-4


def test_ready_counts_graphs_compiled_after_warm_up(tiny_model):
    """A graph compiled while serving stalls every call; /ready reports how many were."""
    import torch

    engine = loaded(Settings(model=str(tiny_model), device="cpu", warmup=False))
    assert asyncio.run(engine.status())["graph_compiles_after_ready"] == 0
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
    assert asyncio.run(engine.status())["graph_compiles_after_ready"] == 1


def test_past_max_queue_a_turn_is_refused_before_its_audio_is_decoded(tiny_model):
    """Under overload the excess is answered at once, and the turns in progress finish."""
    from emotion.errors import Overloaded

    engine = loaded(Settings(model=str(tiny_model), device="cpu", warmup=False, max_turns_in_flight=2))
    real, decoded = engine.backend.model.forward, []

    def slow(waves, **kwargs):
        time.sleep(0.5)
        return real(waves, **kwargs)

    engine.backend.model.forward = slow
    engine.decode_sync = lambda data, *a: decoded.append(data) or speech_like(1.0)

    async def main():
        first = [asyncio.ensure_future(engine.analyze_bytes(f"turn {i}".encode())) for i in range(2)]
        await asyncio.sleep(0.1)
        third = asyncio.ensure_future(engine.analyze_bytes(b"turn 3"))
        await asyncio.sleep(0)
        refused_at_once = third.done()  # answered before its first await: no fetch, no decode, no wait
        with pytest.raises(Overloaded, match="2 turns already in progress"):
            await third
        results = await asyncio.gather(*first)
        after = await engine.analyze_bytes(b"turn 4")
        await engine.close()
        return refused_at_once, results, after

    refused_at_once, results, after = asyncio.run(main())
    assert refused_at_once and b"turn 3" not in decoded
    assert all(r.emotion for r in results) and after.emotion and engine._turns == 0


def test_a_turn_whose_windows_overflow_the_queue_is_refused_whole(tiny_model):
    """Five 1 s windows into a queue of three clips: the turn is refused, the windows
    already queued never reach the model, and the next turn is served."""
    from emotion.errors import Overloaded

    engine = loaded(Settings(model=str(tiny_model), device="cpu", warmup=False, max_queued_clips=3,
                             window_seconds=1.0, segment_seconds=1.0, segment_hop_seconds=0.5))
    real, ran = engine.backend.model.forward, []
    engine.backend.model.forward = lambda waves, **kwargs: ran.append(len(waves)) or real(waves, **kwargs)

    async def main():
        with pytest.raises(Overloaded, match="3 clips already waiting"):
            await engine.analyze_wave(speech_like(5.0))
        await asyncio.sleep(0.1)
        refused_ran = list(ran)
        after = await engine.analyze_wave(speech_like(2.0))
        await engine.close()
        return refused_ran, after

    refused_ran, after = asyncio.run(main())
    assert refused_ran == [] and after.emotion and ran and engine._turns == 0


def test_a_turn_that_would_finish_past_its_deadline_is_refused_at_once(tiny_model):
    """At the recent inference rate (here 5 clips/s), turns beyond what can finish within
    EMOTION_TURN_TIMEOUT_S are answered `overloaded` on arrival, not with a timeout later."""
    from emotion.errors import Overloaded

    engine = loaded(Settings(model=str(tiny_model), device="cpu", warmup=False, max_batch_size=1,
                             turn_timeout_s=2.0))
    real = engine.backend.model.forward

    def slow(waves, **kwargs):
        time.sleep(0.2)
        return real(waves, **kwargs)

    engine.backend.model.forward = slow
    engine.decode_sync = lambda data, *a: speech_like(1.0)

    async def main():
        await engine.analyze_bytes(b"learn the rate")
        turns = [asyncio.ensure_future(engine.analyze_bytes(b"turn")) for _ in range(20)]
        await asyncio.sleep(0)
        refused = [t for t in turns if t.done()]  # refused before their first await
        out = await asyncio.gather(*turns, return_exceptions=True)
        await engine.close()
        return refused, out

    refused, out = asyncio.run(main())
    overloaded = [r for r in out if isinstance(r, Overloaded)]
    assert 5 <= 20 - len(overloaded) <= 12  # about 5 clips/s x 2 s admitted
    assert len(refused) == len(overloaded) and "past the 2 s turn limit" in overloaded[0].message
    assert sum(not isinstance(r, Exception) for r in out) >= 5  # the admitted are served (the last may reach the deadline)
