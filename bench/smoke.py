"""A smoke run of the benchmarks, tiny model, small counts: they run, and report what they
should. Not a measurement (bench/RESULTS.md has those). scripts/test.sh runs it after the
tests; it exits non-zero naming the first check that failed.

    python bench/smoke.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=HERE.parent, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def check(ok: bool, what) -> None:
    if not ok:
        sys.exit(f"smoke check failed: {what}")


def bench_one_process() -> None:
    report = json.loads(run("bench/bench.py", "--size", "tiny", "--device", "cpu", "--clips", "12", "--baseline-clips", "4",
                            "--concurrency", "1", "4", "--server-turns", "12", "--server-rate", "6", "--load-processes", "2").stdout)
    check(report["funasr_generate_baseline"]["clips_per_s"] > 0, report["funasr_generate_baseline"])
    check(set(report["engine"]) == {"1", "4"}, report["engine"])
    check(sum(int(n) * count for n, count in report["engine"]["4"]["batch_sizes_seen"].items()) == 12, report["engine"]["4"])
    for path in ("api_raw_bytes", "webhook_url", "webhook_base64"):
        r = report["action_server"][path]
        check(r["errors"] == 0 and r["turns"] == 12 and r["health_ms_while_busy"]["probes"] > 0, r)
        check(0 < r["offered_turns_per_s"] and 0 < r["turns_per_s"] and r["latency_ms"]["p50"] <= r["latency_ms"]["p99"], r)
        cpu = r["server_cpu_ms_per_turn"]
        check(set(cpu) == {"process", "event_loop", "decode", "inference"} and min(cpu.values()) > 0, cpu)
        check(cpu["process"] > cpu["inference"], cpu)
    check(report["recompiles_after_ready"] == 0 and report["action_server"]["recompiles_after_ready"] == 0, report)
    tracker = report["action_server"]["tracker_bytes_per_turn"]
    check(tracker["metadata.emotion (api or EmotionRestInput)"] < 1500 < 20_000 < tracker["metadata.audio.base64"], tracker)


def bench_engine_process() -> None:
    """The server's CPU summed over two Sanic workers and the engine process."""
    server = json.loads(run("bench/bench.py", "--size", "tiny", "--device", "cpu", "--clips", "2", "--baseline-clips", "1",
                            "--concurrency", "1", "--server-turns", "8", "--server-rate", "6", "--load-processes", "1",
                            "--server-workers", "2").stdout)["action_server"]
    check(server["workers"] == 2 and server["engine_process"] is True, server)
    for path in ("api_raw_bytes", "webhook_url", "webhook_base64"):
        r = server[path]
        check(r["errors"] == 0 and r["turns"] == 8, r)
        cpu = r["server_cpu_ms_per_turn"]
        check(set(cpu) == {"process", "event_loop", "decode", "inference", "engine_process", "engine_event_loop"}, cpu)
        # The workers hold no model: inference is the engine process's, and most of its CPU.
        check(cpu["engine_process"] > cpu["inference"] > 0 and cpu["engine_process"] > cpu["process"] >= cpu["event_loop"] > 0, cpu)


def cpu_modes() -> None:
    """bench/cpu.py, tiny: every mode answers, the exact ones equal generate(), the server path runs."""
    report = json.loads(run("bench/cpu.py", "--smoke").stdout)
    modes = report["modes"]
    check(set(modes) == {"generate", "torch", "torch-int8", "onnx-int8"} and not any("error" in m for m in modes.values()), modes)
    for name, mode in modes.items():
        check(mode["one_turn_alone"]["clips_per_s"] > 0 and mode["rss_after_warmup_mb"] > 0, (name, mode))
    check(modes["torch"]["fidelity_vs_generate"]["max_score_diff"] <= 1e-4, modes["torch"])
    for name in ("torch-int8", "onnx-int8"):
        fidelity = modes[name]["fidelity_vs_fp32"]
        check(fidelity["clips"] == 8 and 0 < fidelity["embedding_cosine_min"] <= 1.00001, (name, fidelity))
    # The spread head: scores differ from clip to clip.
    check(modes["torch"]["fp32_score_spread"]["top_score_p5_p50_p95"][0] < modes["torch"]["fp32_score_spread"]
          ["top_score_p5_p50_p95"][2], modes["torch"])
    server = report["action_server"]
    check(server["mode"] == "onnx-int8" and server["rss_after_warmup_mb"] > 0, server)
    for arrivals in ("poisson", "even"):
        run_ = server[arrivals]
        check(run_["arrivals"] == arrivals and run_["errors"] == 0 and run_["turns"] == 8, run_)
        check(run_["health_ms_while_busy"]["probes"] > 0 and run_["p95_over_in_process_p50"] > 0, run_)


def load_test() -> None:
    """Hostile and good turns mixed through the action server: no 5xx, each case answered as it should be."""
    proc = subprocess.run([sys.executable, "bench/load_test.py", "--turns", "90", "--concurrency", "16", "--timeout-s", "300"],
                          cwd=HERE.parent, capture_output=True, text=True, timeout=600)
    report = json.loads(proc.stdout)
    check(proc.returncode == 0, report.get("failures"))
    check(report["turns"] == 90 and set(report["status_counts"]) == {"200"}, report)
    check(all(case["wrong"] == 0 and case["turns"] == 10 for case in report["cases"].values()), report["cases"])


def loop_cost() -> None:
    out = run("bench/loop_cost.py", "--batch", "16", "--turns", "200").stdout
    means = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("event-loop CPU")]
    check(len(means) == 3 and all(1 < m <= 16 for m in means), out)
    out = run("bench/loop_cost.py", "--batch", "16", "--turns", "100", "--workers", "2").stdout
    rounds = re.findall(r"engine-process event-loop CPU ([0-9.]+) ms a turn, a worker's ([0-9.]+), ([0-9]+) turns/s from 2 workers", out)
    check(len(rounds) == 3 and all(float(engine) > 0 and float(worker) > 0 for engine, worker, _ in rounds), out)


def queue_model() -> None:
    report = json.loads(run("bench/queue_model.py", "--turns", "5000", "--short-runs", "5").stdout)
    # Even arrivals queue less than Poisson ones at the same load.
    check(0 < report["even_first_come"]["p95"] < report["poisson_first_come"]["p95"], report)


if __name__ == "__main__":
    for step in (bench_one_process, bench_engine_process, cpu_modes, load_test, loop_cost, queue_model):
        step()
        print(f"bench smoke: {step.__name__} ok", flush=True)
