"""GPU path: exact fp32 batches on CUDA, bf16/fp16 close to fp32, the batcher on the GPU.

These run where torch sees an NVIDIA GPU (bench/RESULTS.md records where they ran);
CI has no GPU, so there they are skipped, not passed.
"""

import asyncio

import numpy as np
import pytest
import torch
from conftest import loaded, speech_like

from emotion.engine.model import EmotionModel
from emotion.settings import Settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU; CI has none")
LENGTHS_S = [0.5, 1.3, 2.9, 5.0, 11.0, 30.0]


def test_cuda_fp32_batches_equal_funasr_generate(tiny_model):
    """The compiled path (front end, blocks, FlexAttention) against FunASR's own, uncompiled."""
    model = EmotionModel(str(tiny_model), device="cuda", dtype="float32")
    plain = EmotionModel(str(tiny_model), device="cuda", dtype="float32", compile="off")
    waves = [speech_like(s, seed=i) for i, s in enumerate(LENGTHS_S)]
    for wave, out in zip(waves, model.forward(waves)):
        ref = plain.funasr.generate(input=wave, extract_embedding=False, disable_pbar=True)[0]["scores"]
        assert np.abs(out.probs - np.array(ref)).max() < 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_stays_close_to_fp32(tiny_model, dtype):
    full = EmotionModel(str(tiny_model), device="cuda", dtype="float32", compile="off")
    low = EmotionModel(str(tiny_model), device="cuda", dtype=dtype)
    waves = [speech_like(s, seed=i) for i, s in enumerate(LENGTHS_S)]
    a = np.stack([o.probs for o in full.forward(waves)])
    b = np.stack([o.probs for o in low.forward(waves)])
    assert np.abs(a - b).max() < 0.02


def test_auto_picks_the_gpu_and_a_reduced_precision(tiny_model):
    model = EmotionModel(str(tiny_model))
    assert model.device.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16)


def test_engine_batches_on_the_gpu(tiny_model):
    engine = loaded(Settings(model=str(tiny_model), max_wait_ms=20))  # compiles while warming up
    waves = [speech_like(1.0 + i % 5, seed=i) for i in range(40)]

    async def main():
        out = await asyncio.gather(*(engine.analyze_wave(w) for w in waves))
        sizes = engine.backend.stats.sizes
        await engine.close()
        return out, sizes

    results, sizes = asyncio.run(main())
    assert engine.backend.max_batch_size == 64 and max(sizes) > 1
    assert all(abs(sum(r.scores.values()) - 1) < 1e-3 for r in results)


def test_no_graph_is_compiled_while_serving_random_lengths(tiny_model):
    """Warm-up runs every token budget, so turns of any length (0.2-300 s, cut into
    windows) compile no graph after the engine is ready, while callers wait."""
    engine = loaded(Settings(model=str(tiny_model)))
    rng = np.random.default_rng(0)
    lengths = list(rng.uniform(0.2, 300, 8)) + list(rng.uniform(0.2, 15, 200))
    waves = [speech_like(float(s), seed=i) for i, s in enumerate(lengths)]

    async def main():
        out = await asyncio.gather(*(engine.analyze_wave(w) for w in waves))
        await engine.close()
        return out

    results = asyncio.run(main())
    assert all(abs(sum(r.scores.values()) - 1) < 1e-3 for r in results)
    assert engine.backend.stats.mean_batch_size > 1
    assert asyncio.run(engine.status())["graph_compiles_after_ready"] == 0
