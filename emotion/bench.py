"""``python -m emotion bench``: FunASR's one-clip-per-call generate() against our batched engine,
in one process and one run, plus the end-to-end path through the real action server."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
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

from emotion.audio import SAMPLE_RATE_HZ, encode_audio
from emotion.engine import EmotionEngine


def run_bench(args: argparse.Namespace) -> dict:
    # Stdout is the report: what FunASR and torchaudio print goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        return _run_bench(args)


def _run_bench(args: argparse.Namespace) -> dict:
    from emotion.cli import config_from_args
    from emotion.model import EmotionModel

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if not model_dir:
            from emotion.checkpoint import write_checkpoint

            model_dir = str(write_checkpoint(Path(tmp) / args.size, size=args.size))
        config = config_from_args(args, model=model_dir)
        engine = EmotionEngine(config).load()
        model = engine.model
        clips = _clips(args)
        report = {
            "model": args.model or f"random-weight {args.size} checkpoint (real architecture, no accuracy)",
            "parameters_m": round(sum(p.numel() for p in model.net.parameters()) / 1e6, 1),
            "device": _device_name(model.device),
            "dtype": model.dtype_name,
            "torch_threads": _torch_threads(),
            "clips": len(clips),
            "clip_seconds": [round(min(map(len, clips)) / SAMPLE_RATE_HZ, 2), round(max(map(len, clips)) / SAMPLE_RATE_HZ, 2)],
            "max_batch_size": engine.max_batch_size,
            "date": time.strftime("%Y-%m-%d"),
        }
        # FunASR's own model as loaded, fp32 and uncompiled: the baseline and the reference.
        plain = EmotionModel(model_dir, hub=config.hub, device=str(model.device), dtype="float32", compile="off")
        report["funasr_generate_baseline"] = _baseline(plain, clips[: args.baseline_clips])
        report["engine"] = {str(c): asyncio.run(_engine_level(engine, clips, c)) for c in args.concurrency}
        best = max(level["clips_per_s"] for level in report["engine"].values())
        report["speedup_over_baseline"] = round(best / report["funasr_generate_baseline"]["clips_per_s"], 2)
        if args.compare_fp32 and model.dtype_name != "float32":
            report["reduced_precision_vs_fp32"] = _compare_fp32(model, plain, clips[:64])
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
    return [(rng.standard_normal(int(s * SAMPLE_RATE_HZ)) * 0.1).astype(np.float32) for s in lengths]


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


async def _engine_level(engine: EmotionEngine, clips: list[np.ndarray], concurrency: int) -> dict:
    """``concurrency`` conversations, each sending its next turn as soon as the last is tagged."""
    engine.reset_stats()  # fresh batch statistics per level
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
    stats = engine.reset_stats()
    await engine.close()
    out["batches"] = stats.batches
    out["mean_batch_size"] = round(stats.mean_batch_size, 1)
    out["batch_sizes_seen"] = dict(sorted(stats.sizes.items()))
    return out


def _compare_fp32(model, reference, clips: list[np.ndarray]) -> dict:
    low = np.stack([o.probs for o in model.forward(clips)])
    high = np.stack([o.probs for o in reference.forward(clips)])
    return {
        "clips": len(clips),
        "argmax_agreement": round(float((low.argmax(1) == high.argmax(1)).mean()), 4),
        "max_abs_score_diff": round(float(np.abs(low - high).max()), 5),
    }


def _server(model_dir: str, config, args: argparse.Namespace) -> dict:
    """Turns over HTTP through the real rasa-sdk server: fetch + decode + inference + slots."""
    env = {"EMOTION_MODEL": model_dir, "EMOTION_DEVICE": config.device, "EMOTION_DTYPE": config.dtype}
    if config.max_batch_size:
        env["EMOTION_MAX_BATCH"] = str(config.max_batch_size)
    try:
        with action_server(env) as (_proc, url):
            return {"webhook_base64": asyncio.run(_server_load(url, args, "webhook")),
                    "api_raw_bytes": asyncio.run(_server_load(url, args, "api"))}
    except RuntimeError as exc:
        return {"error": str(exc)}


def tracker_bytes_per_turn(wav: bytes, result: dict) -> dict:
    """What each way of bringing audio to Rasa adds to the tracker per turn: the message's
    metadata is kept twice (the user event and latest_message), stored in the tracker store
    and sent to the action server on every later action call. Slot events are the same
    for every path and not counted."""
    import json

    utterance = {k: result[k] for k in ("emotion", "confidence", "scores", "duration_s", "model")}
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
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rasa_sdk", "--actions", "emotion.rasa_actions", "--port", str(port)],
        env={**os.environ, "SANIC_HOST": "127.0.0.1", **env}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # Sanic kills a failed worker's whole process group
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError("action server did not start: " + log.read()[-1500:])
            time.sleep(0.3)
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


async def _server_load(url: str, args: argparse.Namespace, path: str) -> dict:
    """``path`` "webhook": Rasa's action call with the audio inline; "api": the raw audio
    bytes to /v1/analyze, as a voice gateway sends them."""
    import httpx

    rng = np.random.default_rng(1)
    bodies = []
    for i in range(args.server_turns):
        seconds = args.fixed_seconds or rng.uniform(*args.seconds)
        wav = encode_audio((rng.standard_normal(int(seconds * SAMPLE_RATE_HZ)) * 0.1).astype(np.float32), SAMPLE_RATE_HZ, "WAV", "PCM_16")
        if path == "api":
            bodies.append({"content": wav, "headers": {"Content-Type": "audio/wav"}})
        else:
            bodies.append({"json": webhook_call(f"bench-{i}", {"base64": base64.b64encode(wav).decode()})})
    endpoint = url + ("/v1/analyze" if path == "api" else "/webhook")
    first: list = []  # the first answered API turn: (audio, result)
    latencies, health, statuses = [], [], []
    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=args.server_concurrency + 4)) as client:
        async def caller():
            while bodies:
                body = bodies.pop()
                t = time.perf_counter()
                r = await client.post(endpoint, **body)
                latencies.append(time.perf_counter() - t)
                statuses.append(r.status_code)
                if path == "api" and not first and r.status_code == 200:
                    first[:] = [body["content"], r.json()]

        async def probe():
            await asyncio.sleep(0.01)  # once the first turns are in flight
            while True:
                t = time.perf_counter()
                await client.get(url + "/health")
                health.append((time.perf_counter() - t) * 1000)
                if done.is_set():
                    break
                await asyncio.sleep(0.05)

        prober = asyncio.create_task(probe())
        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(args.server_concurrency)))
        elapsed = time.perf_counter() - started
        done.set()
        await prober
    return {
        "turns": len(latencies),
        "concurrency": args.server_concurrency,
        "non_200": sum(s != 200 for s in statuses),
        "turns_per_s": round(len(latencies) / elapsed, 2),
        "latency_ms": _percentiles_ms(latencies, 50, 95, 99),
        "health_ms_while_busy": {"probes": len(health), "p50": round(float(np.median(health)), 1) if health else None,
                                 "max": round(max(health), 1) if health else None},
        **({"tracker_bytes_per_turn": tracker_bytes_per_turn(*first)} if first else {}),
    }


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
