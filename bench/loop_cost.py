"""What the engine's own machinery costs its event loop per turn (admission, planning,
batching, futures, assembling the result), with inference made free: the share that
stays however fast the GPU is. 50 callers send mixed 1-15 s turns; prints CPU ms a turn.

    python bench/loop_cost.py --batch 64               # the engine in this process
    python bench/loop_cost.py --batch 64 --workers 2   # an engine process, 2 worker processes

With ``--workers`` the turns reach the engine process as a Sanic worker sends
them, and the engine process's loop (receiving every worker's turns) is the figure: its
turns a second at 1 ms of loop a turn is 1,000, whatever the GPU does.
"""

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time

import numpy as np

from emotion.engine.backend import InProcessBackend
from emotion.engine.core import EmotionEngine
from emotion.serving import engine_process
from emotion.serving.engine_process import EngineProcessBackend
from emotion.settings import Settings
from emotion.tools.checkpoint import write_checkpoint

CALLERS = 50


def _waves(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(int(s * 16_000)).astype(np.float32) for s in rng.uniform(1, 15, 16)]


def _free_inference(backend: InProcessBackend) -> InProcessBackend:
    one = backend.model.forward([np.zeros(16_000, np.float32)])[0]
    backend.model.forward = lambda waves, **_: [one] * len(waves)
    return backend


def _serve(path: str) -> None:
    """The engine process, as the action server starts it, with inference made free."""
    load = InProcessBackend.load
    InProcessBackend.load = lambda self: _free_inference(load(self))
    engine_process.serve(path)


def _client(path: str) -> EmotionEngine:
    """A worker's engine, as the action server builds it."""
    return EmotionEngine(Settings(), backend=EngineProcessBackend(Settings(), path))


async def _calls(engine: EmotionEngine, turns: int, waves: list[np.ndarray]) -> None:
    async def caller(k: int) -> None:
        for i in range(turns // CALLERS):
            await engine.analyze_wave(waves[(k + i) % len(waves)])

    await asyncio.gather(*(caller(k) for k in range(CALLERS)))


def _worker(path: str, turns: int, started, done) -> None:
    async def main() -> None:
        client = _client(path)
        await client.start()
        waves = _waves(os.getpid())
        done.put("ready")
        started.wait()
        before = client.cpu_seconds()["event_loop"]
        await _calls(client, turns, waves)
        done.put(client.cpu_seconds()["event_loop"] - before)
        await client.close()

    asyncio.run(main())


def in_process(args, checkpoint: str) -> None:
    settings = Settings(model=checkpoint, device="cpu", warmup=False, max_batch_size=args.batch)
    backend = _free_inference(InProcessBackend(settings).load())
    engine = EmotionEngine(settings, backend=backend)
    waves = _waves(0)

    async def main() -> None:
        await engine.start()
        for _ in range(3):
            started = time.thread_time()
            await _calls(engine, args.turns, waves)
            print(f"event-loop CPU {(time.thread_time() - started) * 1000 / args.turns:.3f} ms a turn,"
                  f" mean batch {backend.reset_stats().mean_batch_size:.1f}")
        await engine.close()

    asyncio.run(main())


def through_engine_process(args, checkpoint: str, tmp: str) -> None:
    os.environ.update(EMOTION_MODEL=checkpoint, EMOTION_DEVICE="cpu", EMOTION_WARMUP="0", EMOTION_MAX_BATCH=str(args.batch))
    ctx = multiprocessing.get_context("spawn")
    path = os.path.join(tmp, "engine.sock")
    engine = ctx.Process(target=_serve, args=(path,), daemon=True)
    engine.start()
    try:
        for _ in range(3):
            started, done = ctx.Event(), ctx.Queue()
            workers = [ctx.Process(target=_worker, args=(path, args.turns, started, done)) for _ in range(args.workers)]
            for w in workers:
                w.start()
            assert [done.get(timeout=300) for _ in workers] == ["ready"] * len(workers)
            before = asyncio.run(_engine_cpu(path))
            wall = time.monotonic()
            started.set()
            mine = [done.get(timeout=600) for _ in workers]
            wall = time.monotonic() - wall
            after = asyncio.run(_engine_cpu(path))
            for w in workers:
                w.join()
            turns = args.turns * args.workers
            print(f"engine-process event-loop CPU {(after['engine_event_loop'] - before['engine_event_loop']) * 1000 / turns:.3f}"
                  f" ms a turn, a worker's {sum(mine) * 1000 / turns:.3f},"
                  f" {turns / wall:.0f} turns/s from {args.workers} workers")
    finally:
        engine.terminate()
        engine.join()


async def _engine_cpu(path: str) -> dict:
    client = _client(path)
    await client.start()
    status = await client.status()
    await client.close()
    return status["cpu_seconds"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64, help="EMOTION_MAX_BATCH")
    parser.add_argument("--turns", type=int, default=2000, help="per round (per worker with --workers)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes sending to an engine process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(write_checkpoint(os.path.join(tmp, "model"), size="tiny"))
        if args.workers:
            through_engine_process(args, checkpoint, tmp)
        else:
            in_process(args, checkpoint)
