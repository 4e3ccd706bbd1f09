"""The load test (bench/load_test.py) in a small size: hostile and good turns mixed, over HTTP."""

import json
import re
import subprocess
import sys

from conftest import ROOT


def test_mixed_load_through_the_action_server():
    proc = subprocess.run([sys.executable, "bench/load_test.py", "--turns", "270", "--concurrency", "16", "--timeout-s", "300"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, report["failures"]
    assert report["turns"] == 270 and set(report["status_counts"]) == {"200"}
    assert all(case["wrong"] == 0 and case["turns"] == 30 for case in report["cases"].values())


def test_the_engine_loop_cost_probe_batches_what_it_measures():
    proc = subprocess.run([sys.executable, "bench/loop_cost.py", "--batch", "16", "--turns", "200"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    means = [float(line.rsplit(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("event-loop CPU")]
    assert len(means) == 3 and all(1 < m <= 16 for m in means), proc.stdout


def test_the_engine_loop_cost_probe_through_an_engine_process():
    proc = subprocess.run([sys.executable, "bench/loop_cost.py", "--batch", "16", "--turns", "100", "--workers", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rounds = re.findall(r"engine-process event-loop CPU ([0-9.]+) ms a turn, a worker's ([0-9.]+), ([0-9]+) turns/s from 2 workers",
                        proc.stdout)
    assert len(rounds) == 3 and all(float(engine) > 0 and float(worker) > 0 for engine, worker, _ in rounds), proc.stdout
