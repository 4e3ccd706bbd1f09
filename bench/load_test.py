"""Load test through the real action server over loopback HTTP, good and hostile audio mixed.

    python bench/load_test.py --turns 2000 --concurrency 32        # the full run
    python bench/load_test.py --turns 200 --concurrency 16         # what CI runs

Checks, and exits non-zero if any fails: no 5xx, every good turn tagged, every bad turn
answered with emotion_error (and the expected code), and the server's resident memory
grows by at most --max-rss-growth-mb between the end of warm-up and the end of the run.
Bounded in count and time; it talks only to the servers it starts on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np

from bench import action_server, webhook_call  # bench/bench.py, beside this script
from emotion.engine.audio import encode_audio


def _cases(audio_url: str) -> list[tuple[str, dict, str | None]]:
    """(name, metadata.audio, expected error code or None for a good turn)."""
    rng = np.random.default_rng(0)
    speech = (rng.standard_normal(16000 * 3) * 0.1).astype(np.float32)
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    wav = encode_audio(speech, 16000, "WAV", "PCM_16")
    return [
        ("wav", {"base64": b64(wav)}, None),
        ("mulaw", {"base64": b64(encode_audio(speech[::2], 8000, "RAW", "ULAW")), "encoding": "mulaw", "sample_rate": 8000}, None),
        ("flac-url", {"url": audio_url}, None),
        ("random-bytes", {"base64": b64(rng.bytes(5000))}, "decode_failed"),
        ("truncated", {"base64": b64(wav[:200])}, "invalid_audio"),
        ("10ms", {"base64": b64(encode_audio(speech[:160], 16000, "WAV", "PCM_16"))}, "invalid_audio"),
        ("bad-base64", {"base64": "!!not base64!!"}, "bad_reference"),
        ("internal-url", {"url": "http://169.254.169.254/latest"}, "refused"),
        ("path-not-allowed", {"path": "/etc/passwd"}, "refused"),
    ]


def _serve_audio(data: bytes) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/turn.flac"


def _rss_mb(pid: int) -> float:
    """Resident memory of the server and its worker processes."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


async def _run(url: str, cases, turns: int, concurrency: int, timeout_s: float, on_warm) -> dict:
    results: dict[str, list] = {name: [] for name, _, _ in cases}
    statuses: list[int] = []
    latencies: list[float] = []
    counter = iter(range(turns))
    deadline = time.monotonic() + timeout_s
    warm_at = max(1, turns // 10)

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency + 2)) as client:
        async def caller():
            for i in counter:
                if time.monotonic() > deadline:
                    return
                name, audio, _ = cases[i % len(cases)]
                body = webhook_call(f"load-{i}", audio, "hello")
                t = time.perf_counter()
                r = await client.post(url + "/webhook", json=body)
                latencies.append(time.perf_counter() - t)
                statuses.append(r.status_code)
                slots = {e["name"]: e["value"] for e in r.json().get("events", []) if e.get("event") == "slot"} if r.status_code == 200 else {}
                results[name].append(slots)
                if len(statuses) == warm_at:
                    on_warm()

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"results": results, "statuses": statuses, "latencies": latencies, "elapsed_s": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--model", help="model directory (default: a tiny random-weight checkpoint)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=150.0)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if not model:
            from emotion.tools.checkpoint import write_checkpoint

            model = str(write_checkpoint(Path(tmp) / "model", size="tiny"))
        rng = np.random.default_rng(1)
        flac = encode_audio((rng.standard_normal(16000 * 2) * 0.1).astype(np.float32), 16000, "FLAC", "PCM_16")
        audio_server, audio_url = _serve_audio(flac)
        cases = _cases(audio_url)
        # The server's default runtime; an ONNX export it makes stays in the run's directory.
        env = {"EMOTION_MODEL": model, "EMOTION_URL_ALLOW": "127.0.0.1/32", "EMOTION_ONNX_CACHE_DIR": str(Path(tmp) / "onnx")}
        try:
            with action_server(env, timeout_s=180) as (proc, url):
                rss: dict[str, float] = {"start": _rss_mb(proc.pid)}
                ready = httpx.get(url + "/ready", timeout=5).json()
                run = asyncio.run(_run(url, cases, args.turns, args.concurrency, args.timeout_s,
                                       lambda: rss.__setitem__("after_warmup", _rss_mb(proc.pid))))
                rss["end"] = _rss_mb(proc.pid)
                healthy = httpx.get(url + "/health", timeout=5).status_code == 200
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 2
        finally:
            audio_server.shutdown()

    failures = []
    statuses = run["statuses"]
    if len(statuses) < args.turns:
        failures.append(f"only {len(statuses)} of {args.turns} turns ran within {args.timeout_s:g} s")
    if any(s >= 500 for s in statuses):
        failures.append(f"{sum(s >= 500 for s in statuses)} responses were 5xx")
    per_case = {}
    for name, _, code in cases:
        got = run["results"][name]
        if code is None:
            bad = [s for s in got if not s.get("emotion") or s.get("emotion_error")]
        else:
            bad = [s for s in got if not str(s.get("emotion_error", "")).startswith(f"[{code}]")]
        per_case[name] = {"turns": len(got), "wrong": len(bad)}
        if bad:
            failures.append(f"{name}: {len(bad)} of {len(got)} turns wrong, e.g. {bad[0]}")
    growth = rss["end"] - rss.get("after_warmup", rss["start"])
    if growth > args.max_rss_growth_mb:
        failures.append(f"resident memory grew {growth:.0f} MB after warm-up (bound {args.max_rss_growth_mb:g} MB)")
    if not healthy:
        failures.append("server unhealthy after the run")
    lat = np.array(run["latencies"]) * 1000
    report = {
        "turns": len(statuses),
        "runtime": ready.get("runtime"),
        "dtype": ready.get("dtype"),
        "concurrency": args.concurrency,
        "turns_per_s": round(len(statuses) / run["elapsed_s"], 1),
        "status_counts": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1), "p95": round(float(np.percentile(lat, 95)), 1)},
        "rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "rss_growth_after_warmup_mb": round(growth, 1),
        "cases": per_case,
        "failures": failures,
    }
    print(json.dumps(report, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
