"""The engine: long turns windowed, segments, frames, embeddings, timings, tracing spans."""

import asyncio

import numpy as np
import pytest
from conftest import encode, speech_like

from emotion.config import EngineConfig
from emotion.engine import EmotionEngine, _windows
from emotion.errors import ConfigError, InvalidAudio, TimedOut


@pytest.fixture(scope="module")
def engine(tiny_model):
    return EmotionEngine(EngineConfig(model=str(tiny_model), device="cpu", window_seconds=10.0, warmup=False)).load()


@pytest.mark.parametrize("n,size,hop,expected", [
    (5, 10, 10, [(0, 5)]),
    (10, 10, 10, [(0, 10)]),
    (25, 10, 10, [(0, 10), (10, 20), (20, 25)]),
    (23, 10, 10, [(0, 10), (10, 23)]),
    (7, 3, 1.5, None),
])
def test_windows(n, size, hop, expected):
    if expected is None:
        spans = _windows(70, 30, 15)
        assert spans == [(0, 30), (15, 45), (30, 60), (45, 70)]
        return
    assert _windows(n, size, hop) == expected


def test_long_turn_is_windowed_and_aggregated(engine):
    wave = speech_like(25.0, seed=4)
    (result,) = engine.analyze_waves([wave], embeddings=True)
    windows = [wave[0:160_000], wave[160_000:320_000], wave[320_000:]]
    outs = engine.model.forward(windows, embeddings=True)
    frames = np.array([o.frames for o in outs])
    mean = (np.stack([o.embedding for o in outs]) * frames[:, None]).sum(0) / frames.sum()
    assert np.abs(result.embedding - mean).max() < 1e-5
    expected = engine.model.probs_from_embedding(mean.astype(np.float32))
    assert np.abs(np.array(list(result.scores.values())) - expected).max() < 1e-5
    assert result.duration_s == 25.0


def test_turn_within_the_window_is_one_clip(engine):
    wave = speech_like(8.0, seed=5)
    (result,) = engine.analyze_waves([wave])
    assert np.abs(np.array(list(result.scores.values())) - engine.model.forward([wave])[0].probs).max() < 1e-6


def test_segments_and_frames(engine):
    wave = speech_like(7.0, seed=6)
    seg, frame = engine.analyze_waves([wave], granularity="segment")[0], engine.analyze_waves([wave], granularity="frame")[0]
    assert [(s.start_s, s.end_s) for s in seg.segments] == [(0.0, 3.0), (1.5, 4.5), (3.0, 6.0), (4.5, 7.0)]
    assert all(abs(sum(s.scores.values()) - 1) < 1e-5 for s in seg.segments)
    assert len(frame.segments) == 349 and frame.segments[-1].end_s == pytest.approx(6.98)


def test_frame_embeddings_on_request(engine):
    (result,) = engine.analyze_waves([speech_like(2.0)], granularity="frame", embeddings=True)
    assert result.frame_embeddings.shape == (99, engine.model.embed_dim)
    assert result.embedding.shape == (engine.model.embed_dim,)


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
    engine = EmotionEngine(EngineConfig(model=str(tiny_model), device="cpu", warmup=False))
    engine.tracer = provider.get_tracer("test")

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


def test_inference_time_limit(tiny_model):
    engine = EmotionEngine(EngineConfig(model=str(tiny_model), device="cpu", warmup=False, turn_timeout_s=0.1))

    async def main():
        await engine.start()
        real = engine.model.forward
        engine.model.forward = lambda *a, **k: (__import__("time").sleep(0.5), real(*a, **k))[1]
        try:
            with pytest.raises(TimedOut, match="inference took longer"):
                await engine.analyze_wave(speech_like(1.0))
        finally:
            engine.model.forward = real
            await engine.close()

    asyncio.run(main())


def test_out_of_memory_batches_are_retried_smaller_then_fail_alone(tiny_model):
    """Fault injection on the real model wrapper: the forward pass raises CUDA's OOM error
    for batches over two clips, and for one clip longer than 5 s."""
    import torch

    engine = EmotionEngine(EngineConfig(model=str(tiny_model), device="cpu", warmup=False, max_batch_size=8, max_wait_ms=50))
    engine.load()
    real = engine.model.net.extract_features

    def flaky(source, **kwargs):
        if source.shape[0] > 2 or source.shape[1] > 5 * 16000:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(source, **kwargs)

    engine.model.net.extract_features = flaky
    waves = [speech_like(1.0 + i % 3, seed=i) for i in range(6)] + [speech_like(6.0, seed=9)]

    async def main():
        out = await asyncio.gather(*(engine.analyze_wave(w) for w in waves), return_exceptions=True)
        stats = engine._batcher.stats
        await engine.close()
        return out, stats

    out, stats = asyncio.run(main())
    from emotion.errors import InferenceFailed

    assert all(not isinstance(r, Exception) for r in out[:6])
    assert isinstance(out[6], InferenceFailed) and "out of memory" in str(out[6])
    assert stats.splits >= 1 and max(stats.sizes) <= 2


def test_warmup_covers_the_shapes_a_batching_engine_will_see(tiny_model, monkeypatch):
    """Each shape family (one clip, full unpadded batch, padded batch up to the longest
    window) is compiled on a GPU at its first forward: warm-up must reach them all first."""
    from emotion.model import EmotionModel

    seen = []
    forward = EmotionModel.forward

    def recording(self, waves, **kwargs):
        seen.append([len(w) / 16000 for w in waves])
        return forward(self, waves, **kwargs)

    monkeypatch.setattr(EmotionModel, "forward", recording)
    config = EngineConfig(model=str(tiny_model), device="cpu", max_batch_size=8, window_seconds=10.0, max_batch_audio_seconds=40.0)
    engine = EmotionEngine(config).load()
    assert engine.warm
    assert [1.0] in seen and [10.0] in seen and [5.0] * 8 in seen
    padded = [s for s in seen if len(set(s)) > 1]
    assert max(len(s) for s in padded) == 8
    widest = max(padded, key=max)
    assert min(widest) == 1.0 and max(widest) == 10.0 and len(widest) * max(widest) <= 40.0
