"""The batcher's scheduling, with a recording fake model; parity through it with the real one."""

import asyncio
import threading
import time

import numpy as np
import pytest
from conftest import speech_like

from emotion.engine.batching import MicroBatcher
from emotion.engine.core import EmotionEngine
from emotion.errors import InferenceFailed, Overloaded, TimedOut
from emotion.settings import Settings


class Recorder:
    """Stands in for the model: records each batch, optionally sleeps or fails."""

    def __init__(self, delay_s=0.0, fail_on=None, oom_above=None):
        self.batches = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.oom_above = oom_above
        self.threads = set()

    def __call__(self, items):
        self.threads.add(threading.get_ident())
        self.batches.append(list(items))
        time.sleep(self.delay_s)
        if self.oom_above is not None and len(items) > self.oom_above:
            raise InferenceFailed(f"GPU out of memory on a batch of {len(items)} clips")
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("poisoned item")
        return [f"done:{i}" for i in items]


def run(coro):
    return asyncio.run(coro)


def submit_all(run_batch, items, *, return_exceptions=False, **options):
    """Submit every item at once to a fresh batcher; return the answers and the batcher."""

    async def main():
        b = MicroBatcher(run_batch, **options)

        async def one(item):  # a full queue refuses in submit() itself
            return await b.submit(item)

        out = await asyncio.gather(*(one(i) for i in items), return_exceptions=return_exceptions)
        await b.close()
        return out, b

    return run(main())


def test_fills_up_to_max_batch_size():
    rec = Recorder(delay_s=0.01)
    out, _ = submit_all(rec, range(10), max_batch_size=4, max_wait_ms=50)
    assert out == [f"done:{i}" for i in range(10)]
    assert max(len(x) for x in rec.batches) == 4
    assert sum(len(x) for x in rec.batches) == 10
    assert len(rec.threads) == 1  # one inference thread


def test_max_wait_closes_a_partial_batch():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch_size=64, max_wait_ms=30)
        first = b.submit("a")
        await asyncio.sleep(0.005)
        second = b.submit("b")
        # 2 of 64: only the window's end can close this batch (a bound in place of a hang).
        results = await asyncio.wait_for(asyncio.gather(first, second), 30)
        await asyncio.sleep(0.06)
        late = await asyncio.wait_for(b.submit("c"), 30)
        await b.close()
        return results, late

    results, late = run(main())
    assert results == ["done:a", "done:b"] and late == "done:c"
    assert rec.batches[0] == ["a", "b"]  # b came 5 ms after a: the engine waited for it
    assert rec.batches[1] == ["c"]


def test_packs_within_the_cost_cap_oldest_first():
    rec = Recorder()
    sizes = [1, 10, 2, 9, 1, 10, 3, 8]
    submit_all(rec, sizes, size=lambda x: x, max_batch_size=16, max_wait_ms=20, max_batch_cost=40)
    assert sorted(i for batch in rec.batches for i in batch) == sorted(sizes)
    assert all(sum(batch) <= 40 for batch in rec.batches) and len(rec.batches) == 2
    assert rec.batches[0][0] == 1


def test_a_failing_item_fails_alone():
    out, _ = submit_all(Recorder(fail_on=3), range(8), return_exceptions=True, max_batch_size=8, max_wait_ms=20)
    assert isinstance(out[3], InferenceFailed) and "poisoned" in str(out[3])
    assert [o for i, o in enumerate(out) if i != 3] == [f"done:{i}" for i in range(8) if i != 3]


def test_out_of_memory_retries_smaller_batches():
    out, b = submit_all(Recorder(oom_above=2), range(8), max_batch_size=8, max_wait_ms=20)
    assert out == [f"done:{i}" for i in range(8)]
    assert b.stats.splits >= 3 and max(b.stats.sizes) == 2


def test_full_queue_answers_overloaded_at_once():
    out, _ = submit_all(Recorder(delay_s=0.2), range(6), return_exceptions=True, max_batch_size=1, max_wait_ms=0, max_queue=2)
    overloaded = [o for o in out if isinstance(o, Overloaded)]
    assert overloaded and "overloaded" in str(overloaded[0])
    assert sum(isinstance(o, str) for o in out) >= 2


def test_items_that_waited_too_long_are_answered_before_inference():
    rec = Recorder(delay_s=0.3)

    async def main():
        b = MicroBatcher(rec, max_batch_size=1, max_wait_ms=0)
        first = b.submit("slow")
        await asyncio.sleep(0.01)
        second = b.submit("late", timeout_s=0.05)
        out = await asyncio.gather(first, second, return_exceptions=True)
        await b.close()
        return out

    first, second = run(main())
    assert first == "done:slow"
    assert isinstance(second, TimedOut)
    assert ["late"] not in rec.batches


def test_order_of_results_follows_the_callers():
    out, _ = submit_all(Recorder(), range(20), size=lambda x: -x, max_batch_size=5, max_wait_ms=10)
    assert out == [f"done:{i}" for i in range(20)]


def test_concurrent_turns_through_the_batcher_match_one_by_one(tiny_model):
    engine = EmotionEngine(Settings(model=str(tiny_model), device="cpu", max_batch_size=8, max_wait_ms=20, warmup=False))
    waves = [speech_like(s, seed=i) for i, s in enumerate([0.5, 1.0, 2.5, 4.0, 4.5, 9.0])]

    async def main():
        results = await asyncio.gather(*(engine.analyze_wave(w) for w in waves))
        stats = engine.backend.stats
        await engine.close()
        return results, stats

    results, stats = asyncio.run(main())
    assert max(stats.sizes) > 1  # they really were batched
    for wave, result in zip(waves, results):
        alone = engine.backend.model.forward([wave])[0].probs
        assert np.abs(np.array(list(result.scores.values())) - alone).max() < 1e-5


@pytest.mark.parametrize("bad", [0, -1, 2000])
def test_config_rejects_bad_batch_sizes(bad):
    from emotion.errors import ConfigError

    if bad == 0:
        assert Settings(max_batch_size=0).max_batch_size == 0
        return
    with pytest.raises(ConfigError, match=r"EMOTION_MAX_BATCH=.*\[0, 1024\]"):
        Settings(max_batch_size=bad)


def test_plan_batches_fills_the_first_batch_with_room_in_order():
    from emotion.engine.batching import plan_batches

    assert plan_batches([1, 10, 2, 9, 1, 10, 3, 8], max_batch_size=3, max_cost=25) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert plan_batches([10, 20, 5], max_batch_size=4, max_cost=16) == [[0, 2], [1]]  # the later short one fits first
    assert plan_batches([30, 1], max_batch_size=4, max_cost=16) == [[0], [1]]  # too large alone still runs, alone
    assert plan_batches([], max_batch_size=4) == []


def test_close_answers_items_already_taken_off_the_queue():
    """A batch being assembled (or run) when the engine shuts down: its callers get an
    answer instead of waiting forever."""
    rec = Recorder(delay_s=0.3)

    async def main():
        b = MicroBatcher(rec, max_batch_size=8, max_wait_ms=200)
        waiting = [b.submit(i) for i in range(3)]
        await asyncio.sleep(0.05)  # taken off the queue, the batch still open for more
        assert b.depth == 0
        await b.close()
        return await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 2)

    out = run(main())
    assert all(isinstance(o, Overloaded) and "shutting down" in str(o) for o in out)


def test_items_arriving_while_a_batch_runs_go_next_without_a_timer_wait():
    """Continuous batching: the wait for company is for an idle engine only."""
    rec = Recorder(delay_s=0.1)

    async def main():
        # An idle engine would wait 1000 s for a second item: c must not.
        b = MicroBatcher(rec, max_batch_size=2, max_wait_ms=1_000_000)
        first = [b.submit(i) for i in ("a", "b")]  # a full batch: runs at once
        await asyncio.sleep(0.03)
        late = await asyncio.wait_for(b.submit("c"), 30)  # arrives while [a, b] runs
        await asyncio.gather(*first)
        await b.close()
        return late

    late = run(main())
    assert late == "done:c" and rec.batches == [["a", "b"], ["c"]]


def test_mixed_lengths_fill_whole_batches_instead_of_fragments():
    """64 turns of two lengths, interleaved as calls send them: packed, they make four full
    batches, not eight half ones."""
    rec = Recorder(delay_s=0.01)
    sizes = [1.0, 5.0] * 32
    submit_all(rec, range(64), size=lambda i: sizes[i], max_batch_size=16, max_wait_ms=50)
    assert [len(b) for b in rec.batches] == [16, 16, 16, 16]
