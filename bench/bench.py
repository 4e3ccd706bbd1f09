"""``python bench/bench.py``: FunASR's one-clip-per-call generate() against our batched engine,
in one process and one run, plus the end-to-end path through the real action server. Prints JSON."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from emotion.engine.audio import SAMPLE_RATE_HZ, encode_audio
from emotion.engine.backend import InProcessBackend
from emotion.engine.core import EmotionEngine
from emotion.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/bench.py", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", help="hub id, alias or local directory; default: a random-weight checkpoint of --size")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", help="auto, float32, bfloat16, float16 or int8 (onnx)")
    parser.add_argument("--runtime", choices=("auto", "torch", "onnx"), default="auto",
                        help="what runs the model (EMOTION_RUNTIME); auto is what the server runs here")
    parser.add_argument("--size", choices=("tiny", "base", "large"), default="large", help="checkpoint built when --model is not given")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--baseline-clips", type=int, default=16)
    parser.add_argument("--seconds", type=float, nargs=2, default=(1.0, 15.0), metavar=("MIN", "MAX"))
    parser.add_argument("--fixed-seconds", type=float, help="every clip this long (e.g. 5)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--server-turns", type=int, default=64, help="turns through the action server over HTTP, per path (0: skip)")
    parser.add_argument("--server-rate", type=float, default=8.0, help="turns per second offered to the server")
    parser.add_argument("--arrivals", choices=("poisson", "even"), default="poisson",
                        help="Poisson arrivals, or one every 1/rate seconds")
    parser.add_argument("--load-processes", type=int, default=2, help="processes sending those turns")
    parser.add_argument("--server-workers", type=int, default=1, help="the action server's Sanic workers (ACTION_SERVER_SANIC_WORKERS)")
    parser.add_argument("--engine-process", choices=("auto", "on", "off"), default="auto",
                       help="the model in a process of its own (EMOTION_ENGINE_PROCESS)")
    parser.add_argument("--compare-fp32", action="store_true", help="check bf16/fp16 against fp32: argmax agreement on mixed clips")
    parser.add_argument("--agreement-clips", type=int, default=1000, help="clips for --compare-fp32")
    print(json.dumps(run_bench(parser.parse_args(argv)), indent=2))
    return 0


def run_bench(args: argparse.Namespace) -> dict:
    # Stdout is the report: what FunASR and torchaudio print goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        return _run_bench(args)


def _run_bench(args: argparse.Namespace) -> dict:
    from emotion.engine.model import EmotionModel

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if not model_dir:
            from emotion.tools.checkpoint import write_checkpoint

            model_dir = str(write_checkpoint(Path(tmp) / args.size, size=args.size))
        # The ONNX export, where the runtime is onnx, is cached in the run's own directory.
        config = Settings.from_env(model=model_dir, runtime=args.runtime, onnx_cache_dir=str(Path(tmp) / "onnx"),
                                   **{k: getattr(args, k) for k in ("device", "dtype") if getattr(args, k)})
        backend = InProcessBackend(config).load()
        engine, model = EmotionEngine(config, backend=backend), backend.model
        clips = _clips(args)
        report = {
            "model": args.model or f"random-weight {args.size} checkpoint (real architecture, no accuracy)",
            "device": _device_name(model.device),
            "runtime": model.runtime,
            "precision": model.precision,
            "torch_threads": _torch_threads(),
            "clips": len(clips),
            "clip_seconds": [round(min(map(len, clips)) / SAMPLE_RATE_HZ, 2), round(max(map(len, clips)) / SAMPLE_RATE_HZ, 2)],
            "max_batch_size": backend.max_batch_size,
            "date": time.strftime("%Y-%m-%d"),
        }
        # FunASR's own model as loaded, fp32 and uncompiled: the baseline and the reference.
        plain = EmotionModel(model_dir, hub=config.hub, device=str(model.device), dtype="float32", compile="off")
        report["parameters_m"] = round(sum(p.numel() for p in plain.net.parameters()) / 1e6, 1)
        report["funasr_generate_baseline"] = _baseline(plain, clips[: args.baseline_clips])
        report["engine"] = {str(c): asyncio.run(_engine_level(engine, backend, clips, c)) for c in args.concurrency}
        best = max(level["clips_per_s"] for level in report["engine"].values())
        report["speedup_over_baseline"] = round(best / report["funasr_generate_baseline"]["clips_per_s"], 2)
        report["recompiles_after_ready"] = asyncio.run(engine.status())["graph_compiles_after_ready"]
        if args.compare_fp32 and model.dtype_name != "float32":
            report["reduced_precision_vs_fp32"] = _compare_fp32(model, plain, args)
        if args.server_turns:
            report["action_server"] = _server(model_dir, config, args)
        report["peak_memory_mb"] = _peak_memory(model.device)
        asyncio.run(engine.close())
        return report


def _clips(args: argparse.Namespace) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    if args.fixed_seconds:
        lengths = [args.fixed_seconds] * args.clips
    else:
        lengths = rng.uniform(args.seconds[0], args.seconds[1], args.clips)
    return [_speech(rng, s) for s in lengths]


def _stats(latencies_s: list[float], clips: list[np.ndarray], elapsed_s: float) -> dict:
    audio_s = sum(len(c) for c in clips) / SAMPLE_RATE_HZ
    return {
        "clips_per_s": round(len(clips) / elapsed_s, 2),
        "audio_seconds_per_s": round(audio_s / elapsed_s, 1),
        "latency_ms": _percentiles_ms(latencies_s, 50, 95, 99),
    }


def _percentiles_ms(latencies_s: list[float], *percents: int) -> dict:
    lat = np.array(latencies_s) * 1000
    return {f"p{p}": round(float(np.percentile(lat, p)), 1) for p in percents}


def _baseline(model, clips: list[np.ndarray]) -> dict:
    """What a naive integration does: FunASR's AutoModel.generate(), one clip per call."""
    model.funasr.generate(input=clips[0], disable_pbar=True)  # warm
    latencies = []
    started = time.perf_counter()
    for clip in clips:
        t = time.perf_counter()
        model.funasr.generate(input=clip, granularity="utterance", extract_embedding=False, disable_pbar=True)
        _sync(model.device)
        latencies.append(time.perf_counter() - t)
    out = _stats(latencies, clips, time.perf_counter() - started)
    out["dtype"] = "float32"  # generate() runs the weights as loaded
    return out


async def _engine_level(engine: EmotionEngine, backend: InProcessBackend, clips: list[np.ndarray], concurrency: int) -> dict:
    """``concurrency`` conversations, each sending its next turn as soon as the last is tagged."""
    backend.reset_stats()  # fresh batch statistics per level
    await engine.start()
    queue = list(range(len(clips)))
    latencies: list[float] = []

    async def caller():
        while queue:
            clip = clips[queue.pop()]
            t = time.perf_counter()
            await engine.analyze_wave(clip)
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    out = _stats(latencies, clips, time.perf_counter() - started)
    stats = backend.reset_stats()
    await engine.close()
    out["batches"] = stats.batches
    out["mean_batch_size"] = round(stats.mean_batch_size, 1)
    out["batch_sizes_seen"] = dict(sorted(stats.sizes.items()))
    return out


def _compare_fp32(model, reference, args: argparse.Namespace) -> dict:
    """The reduced-precision model against fp32 on ``--agreement-clips`` mixed clips."""
    rng = np.random.default_rng(2)
    clips = [_speech(rng, s) for s in rng.uniform(*args.seconds, args.agreement_clips)]
    chunks = [clips[i:i + 32] for i in range(0, len(clips), 32)]
    low = np.stack([o.probs for chunk in chunks for o in model.forward(chunk)])
    high = np.stack([o.probs for chunk in chunks for o in reference.forward(chunk)])
    return {
        "clips": len(clips),
        "argmax_agreement": round(float((low.argmax(1) == high.argmax(1)).mean()), 4),
        "max_abs_score_diff": round(float(np.abs(low - high).max()), 5),
    }


def _server(model_dir: str, config, args: argparse.Namespace) -> dict:
    """Turns over HTTP through the real rasa-sdk server, offered open-loop (Poisson arrivals
    at ``--server-rate`` from ``--load-processes`` processes), mixed lengths, on each way
    audio reaches the server."""
    env = {"EMOTION_MODEL": model_dir, "EMOTION_DEVICE": config.device, "EMOTION_DTYPE": config.dtype,
           "EMOTION_RUNTIME": config.runtime, "EMOTION_ONNX_CACHE_DIR": config.onnx_cache_dir, "EMOTION_URL_ALLOW": "127.0.0.1/32"}
    if config.max_batch_size:
        env["EMOTION_MAX_BATCH"] = str(config.max_batch_size)
    env["ACTION_SERVER_SANIC_WORKERS"], env["EMOTION_ENGINE_PROCESS"] = str(args.server_workers), args.engine_process
    import httpx

    # The /health prober runs in this process, beside the model loaded for the in-process
    # levels: a full garbage collection over that heap (~0.4 s on 2 cores) would be counted
    # as the server's /health latency.
    gc.collect()
    gc.freeze()
    with tempfile.TemporaryDirectory() as clips_dir:
        wavs = _turn_wavs(args, Path(clips_dir))
        try:
            with action_server(env) as (_proc, url), _file_server(clips_dir) as clips_url:
                workers = args.server_workers
                probe_s = _health_cpu_s(url, workers)
                status = httpx.get(url + "/ready").json()
                report = {"workers": workers, "engine_process": bool(status.get("engine_process")),
                          "health_probe_event_loop_ms": round(probe_s * 1000, 3)}
                for path in SERVER_PATHS:
                    before = _server_cpu(url, workers)
                    run = report[path] = asyncio.run(_open_loop(url, path, args, clips_url, len(wavs)))
                    spent = {k: v - before.get(k, 0.0) for k, v in _server_cpu(url, workers).items()}
                    for k in ("process", "event_loop"):  # the /health prober's share is not a turn's
                        if k in spent:
                            spent[k] -= run["health_ms_while_busy"]["probes"] * probe_s
                    run["server_cpu_ms_per_turn"] = {k: round(v * 1000 / run["turns"], 2) for k, v in spent.items()}
                result = httpx.post(url + "/v1/analyze", content=wavs[0], headers={"Content-Type": "audio/wav"}, timeout=120).json()
                report["tracker_bytes_per_turn"] = tracker_bytes_per_turn(wavs[0], result)
                report["recompiles_after_ready"] = httpx.get(url + "/ready").json()["graph_compiles_after_ready"]
                return report
        except RuntimeError as exc:
            return {"error": str(exc)}


def _server_cpu(url: str, workers: int = 1) -> dict[str, float]:
    """The server's CPU seconds by thread role, from /ready: summed over its Sanic workers
    (each new connection reaches one of them), the engine process's counted once. The
    event loop's share per turn caps what one worker serves, whatever the model's speed."""
    import httpx

    seen: dict[int, dict[str, float]] = {}
    give_up = time.monotonic() + 120  # a worker still starting answers nothing yet
    while len(seen) < workers:
        if time.monotonic() > give_up:
            raise RuntimeError(f"only {len(seen)} of {workers} Sanic workers answered /ready")
        status = httpx.get(url + "/ready", timeout=30).json()
        seen[status["pid"]] = status["cpu_seconds"]
    total: dict[str, float] = {}
    for cpu in seen.values():
        for role, seconds in cpu.items():
            shared = "engine_process" in cpu and role in ("inference", "engine_process", "engine_event_loop")
            total[role] = seconds if shared else total.get(role, 0.0) + seconds
    return total


def _health_cpu_s(url: str, workers: int, probes: int = 200) -> float:
    """Event-loop CPU seconds one /health costs the server (measured on it idle)."""
    import httpx

    before = _server_cpu(url, workers).get("event_loop", 0.0)
    with httpx.Client(timeout=30) as client:
        for _ in range(probes):
            client.get(url + "/health")
    return max(_server_cpu(url, workers).get("event_loop", 0.0) - before, 0.0) / probes


# The production paths the README recommends (the API with raw bytes; the webhook with URL
# references), and the inline base64 one it warns about.
SERVER_PATHS = ("api_raw_bytes", "webhook_url", "webhook_base64")


def _turn_wavs(args: argparse.Namespace, directory: Path) -> list[bytes]:
    """Mixed-length turns as WAV files, the same for every path; 64 distinct, reused."""
    rng = np.random.default_rng(1)
    wavs = []
    for i in range(min(64, args.server_turns)):
        seconds = args.fixed_seconds or rng.uniform(*args.seconds)
        wav = encode_audio(_speech(rng, seconds), SAMPLE_RATE_HZ, "WAV", "PCM_16")
        (directory / f"turn-{i}.wav").write_bytes(wav)
        wavs.append(wav)
    return wavs


def _speech(rng, seconds: float) -> np.ndarray:
    return (rng.standard_normal(int(seconds * SAMPLE_RATE_HZ)) * 0.1).astype(np.float32)


_FILE_SERVER = """
import functools, http.server, sys
# HTTP/1.1, so connections stay open between fetches, as a recordings store's do
# (python -m http.server speaks 1.0: a new connection, and its setup, for every turn).
http.server.SimpleHTTPRequestHandler.protocol_version = "HTTP/1.1"
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
"""


@contextlib.contextmanager
def _file_server(directory: str):
    """Python's own static file server in a child process on loopback: the recordings store
    the webhook's URL references point at."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", _FILE_SERVER, str(port), directory],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(f"http://127.0.0.1:{port}/", proc, 30.0)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def _open_loop(url: str, path: str, args: argparse.Namespace, clips_url: str, distinct: int) -> dict:
    """Offer ``--server-turns`` turns at ``--server-rate`` per second (``--arrivals``), each
    sent at its arrival time whether or not earlier ones were answered, and probe /health
    meanwhile."""
    import concurrent.futures
    import multiprocessing

    import httpx

    processes = max(1, args.load_processes)
    start_at = time.monotonic() + 2.0  # every load process is up by then
    health: list[float] = []
    done = asyncio.Event()

    async def probe():
        # From the first arrival: before it, the load processes' start-up shares the CPU.
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        async with httpx.AsyncClient(timeout=30) as client:
            while not done.is_set():
                t = time.perf_counter()
                await client.get(url + "/health")
                health.append((time.perf_counter() - t) * 1000)
                await asyncio.sleep(0.02)

    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = [loop.run_in_executor(pool, _load_process, url, path, clips_url, distinct, args.server_turns // processes
                                     + (k < args.server_turns % processes), args.server_rate / processes, start_at, k,
                                     args.arrivals, processes)
                for k in range(processes)]
        prober = asyncio.create_task(probe())
        parts = await asyncio.gather(*runs)
        done.set()
        await prober
    sent = sorted(t for part in parts for t in part["sent_at"])
    ok = [lat for part in parts for lat, status in zip(part["latency_s"], part["status"]) if status == 200]
    finished = max(part["last_done"] for part in parts)
    statuses = [s for part in parts for s in part["status"]]
    return {
        "arrivals": args.arrivals,
        "turns": len(statuses),
        "offered_turns_per_s": round((len(sent) - 1) / (sent[-1] - sent[0]), 1) if len(sent) > 1 else None,
        "turns_per_s": round(len(ok) / (finished - sent[0]), 1),
        "latency_ms": _percentiles_ms(ok, 50, 95, 99) if ok else None,
        "errors": len(statuses) - len(ok),
        "error_kinds": {str(s): statuses.count(s) for s in sorted(set(statuses), key=str) if s != 200},
        "health_ms_while_busy": {"probes": len(health), "p50": round(float(np.median(health)), 1),
                                 "max": round(max(health), 1)},
    }


def _load_process(url: str, path: str, clips_url: str, distinct: int, turns: int, rate: float, start_at: float, seed: int,
                  arrivals: str, processes: int) -> dict:
    """One load process: arrivals at ``rate``, from ``start_at`` (CLOCK_MONOTONIC is shared
    by every process on the machine)."""
    return asyncio.run(_arrivals(url, path, clips_url, distinct, turns, rate, start_at, seed, arrivals, processes))


async def _arrivals(url, path, clips_url, distinct, turns, rate, start_at, seed, arrivals, processes) -> dict:
    import httpx

    rng = np.random.default_rng(100 + seed)
    if rate <= 0:
        offsets = np.zeros(turns)
    elif arrivals == "even":  # the processes' turns interleaved: together, one every 1/(rate x processes) s
        offsets = (np.arange(turns) + seed / processes) / rate
    else:
        offsets = np.cumsum(rng.exponential(1 / rate, turns))
    wavs = {}
    out = {"sent_at": [], "latency_s": [], "status": [], "last_done": 0.0}

    def body(i: int) -> dict:
        clip = int(rng.integers(distinct))
        if path == "webhook_url":
            return {"json": webhook_call(f"load-{seed}-{i}", {"url": f"{clips_url}/turn-{clip}.wav"})}
        if clip not in wavs:
            wavs[clip] = httpx.get(f"{clips_url}/turn-{clip}.wav").content
        if path == "api_raw_bytes":
            return {"content": wavs[clip], "headers": {"Content-Type": "audio/wav"}}
        return {"json": webhook_call(f"load-{seed}-{i}", {"base64": base64.b64encode(wavs[clip]).decode()})}

    bodies = [body(i) for i in range(turns)]  # built before the clock starts
    # A process ready after the shared start keeps its rate from when it is ready, rather
    # than sending its overdue turns at once.
    start_at = max(start_at, time.monotonic())
    endpoint = url + ("/v1/analyze" if path == "api_raw_bytes" else "/webhook")
    # Rasa opens a connection for every action call and closes it after the answer (a
    # client session per request, 3.6 and Pro alike); the API's callers (our channels, a
    # gateway) keep theirs open.
    keep_alive = 64 if path == "api_raw_bytes" else 0
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=None, max_keepalive_connections=keep_alive)) as client:
        async def send(i: int) -> None:
            await asyncio.sleep(max(0.0, start_at + offsets[i] - time.monotonic()))
            t = time.monotonic()
            out["sent_at"].append(t)
            try:
                r = await client.post(endpoint, **bodies[i])
                status = r.status_code
                if status == 200 and path != "api_raw_bytes":  # Rasa's action call: a failed turn is a slot
                    slots = {e.get("name"): e.get("value") for e in r.json().get("events", [])}
                    status = "emotion_error" if slots.get("emotion_error") else 200
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            out["latency_s"].append(time.monotonic() - t)
            out["status"].append(status)
            out["last_done"] = max(out["last_done"], time.monotonic())

        await asyncio.gather(*(send(i) for i in range(turns)))
    return out


def tracker_bytes_per_turn(wav: bytes, result: dict) -> dict:
    """What each way of bringing audio to Rasa adds to the tracker per turn: the message's
    metadata is kept twice (the user event and latest_message), stored in the tracker store
    and sent to the action server on every later action call. Slot events are the same
    for every path and not counted."""
    import json

    from emotion.tools.client import RESULT_KEYS

    utterance = {k: result[k] for k in RESULT_KEYS if k in result}
    paths = {
        "metadata.audio.base64": {"audio": {"base64": base64.b64encode(wav).decode()}},
        "metadata.audio.url": {"audio": {"url": "https://recordings.example.com/calls/0042/turn-0003.wav"}},
        "metadata.emotion (api or EmotionRestInput)": {"emotion": utterance},
    }
    return {name: 2 * len(json.dumps(meta)) for name, meta in paths.items()}


def webhook_call(sender: str, audio: dict, text: str = "") -> dict:
    """The smallest /webhook body Rasa would send for a user turn carrying ``audio``."""
    return {
        "next_action": "action_analyze_emotion", "sender_id": sender, "version": "3.6.21", "domain": {},
        "tracker": {"sender_id": sender, "slots": {}, "events": [], "paused": False,
                    "latest_message": {"text": text, "metadata": {"audio": audio}}},
    }


@contextlib.contextmanager
def action_server(env: dict[str, str], *, timeout_s: float = 300.0):
    """The real rasa-sdk action server with our actions, in a child process on a free
    loopback port; yields (process, url) once /ready answers 200."""
    port = _free_port()
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rasa_sdk", "--actions", "emotion.serving.actions", "--port", str(port)],
        env={**os.environ, "SANIC_HOST": "127.0.0.1", **env}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # Sanic kills a failed worker's whole process group
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            _wait_for(url + "/ready", proc, timeout_s)
        except RuntimeError:
            log.seek(0)
            raise RuntimeError("action server did not start: " + log.read()[-1500:]) from None
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout_s:g} s")
        time.sleep(0.2)


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _device_name(device) -> str:
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _peak_memory(device) -> dict:
    out = {"host_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        import torch

        out["gpu_allocated"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


if __name__ == "__main__":
    sys.exit(main())
