"""What the engine's own machinery costs its event loop per turn (admission, planning,
batching, futures, assembling the result), with inference made free: the share that
stays however fast the GPU is. 50 callers send 8 s turns; prints CPU ms a turn.

    python bench/loop_cost.py --batch 64
"""

import argparse
import asyncio
import tempfile
import time

import numpy as np

from emotion.checkpoint import write_checkpoint
from emotion.config import EngineConfig
from emotion.engine import EmotionEngine

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=64, help="EMOTION_MAX_BATCH")
parser.add_argument("--turns", type=int, default=2000)
args = parser.parse_args()

with tempfile.TemporaryDirectory() as tmp:
    engine = EmotionEngine(EngineConfig(model=str(write_checkpoint(tmp, size="tiny")), device="cpu", warmup=False,
                                        max_batch_size=args.batch)).load()
one = engine.model.forward([np.zeros(16_000, np.float32)])[0]
engine.model.forward = lambda waves, **_: [one] * len(waves)
waves = [np.random.default_rng(i).standard_normal(8 * 16_000).astype(np.float32) for i in range(8)]


async def main() -> None:
    await engine.start()

    async def caller(k: int) -> None:
        for i in range(args.turns // 50):
            await engine.analyze_wave(waves[(k + i) % len(waves)])

    for _ in range(3):
        started = time.thread_time()
        await asyncio.gather(*(caller(k) for k in range(50)))
        print(f"event-loop CPU {(time.thread_time() - started) * 1000 / args.turns:.3f} ms a turn,"
              f" mean batch {engine.reset_stats().mean_batch_size:.1f}")
    await engine.close()


asyncio.run(main())
