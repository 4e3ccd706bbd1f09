"""``python bench/queue_model.py``: what queueing alone does to a single server's p95 at a
given load, for turns whose service time is proportional to their length (1-15 s by default),
as the CPU engine serves them one at a time. Prints JSON: the p95 and p50 time in the server,
as multiples of the median turn's service time, for Poisson and evenly spaced arrivals,
first-come first-served and shortest first, over a long run and over short runs (the median
of many). A model of the queue, not a measurement of the server: it says which p95 any
scheduler of one queue can reach, so the server's measured figure (bench/cpu.py) can be read
against it."""

from __future__ import annotations

import argparse
import heapq
import json

import numpy as np


def sojourn(service: np.ndarray, arrivals: np.ndarray, shortest_first: bool = False) -> np.ndarray:
    """Time in the system of each turn, one server."""
    out = np.empty(len(service))
    waiting: list[tuple[float, int]] = []
    now, i, n = 0.0, 0, len(service)
    while i < n or waiting:
        if not waiting and arrivals[i] > now:
            now = arrivals[i]
        while i < n and arrivals[i] <= now:
            heapq.heappush(waiting, (service[i] if shortest_first else arrivals[i], i))
            i += 1
        _, j = heapq.heappop(waiting)
        now += service[j]
        out[j] = now - arrivals[j]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/queue_model.py", description=__doc__)
    parser.add_argument("--load", type=float, default=0.8)
    parser.add_argument("--seconds", type=float, nargs=2, default=(1.0, 15.0), metavar=("MIN", "MAX"))
    parser.add_argument("--turns", type=int, default=200_000, help="the long run")
    parser.add_argument("--short-turns", type=int, default=60, help="a short run, as the server bench sends")
    parser.add_argument("--short-runs", type=int, default=300)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)

    def run(turns: int, arrival: str, shortest_first: bool) -> tuple[float, float]:
        service = rng.uniform(*args.seconds, turns)
        gap = service.mean() / args.load
        arrivals = np.cumsum(rng.exponential(gap, turns)) if arrival == "poisson" else np.arange(turns) * gap
        t = sojourn(service, arrivals, shortest_first) / np.median(service)
        return float(np.percentile(t, 95)), float(np.median(t))

    report = {"load": args.load, "turn_seconds": args.seconds, "unit": "the median turn's service time"}
    for arrival in ("poisson", "even"):
        for order, sjf in (("first_come", False), ("shortest_first", True)):
            p95, p50 = run(args.turns, arrival, sjf)
            short = [run(args.short_turns, arrival, sjf)[0] for _ in range(args.short_runs)]
            report[f"{arrival}_{order}"] = {"p95": round(p95, 2), "p50": round(p50, 2),
                                            f"p95_over_{args.short_turns}_turns_median": round(float(np.median(short)), 2)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
