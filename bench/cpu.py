"""``python bench/cpu.py``: the CPU runtimes side by side in one run, against FunASR's
``generate()`` on the same clips (issue "Part 13 - Call centres without a GPU"). Prints JSON.

Each mode runs in a process of its own (so its resident memory is its alone), on the same
mixed-length clips (fixed seeds):

    generate     FunASR AutoModel.generate(), one clip a call, fp32: the reference
    torch        the engine, fp32 (exact)
    torch-bf16   the engine with EMOTION_DTYPE=bfloat16 (autocast; avx512_bf16/AMX do it natively)
    torch-int8   the engine's model with every nn.Linear but the head dynamically quantised
                 (torch.ao.quantization.quantize_dynamic); bench-only
    torch-compile  the engine with EMOTION_COMPILE=on (the conv front end through Inductor)
    onnx         the engine with EMOTION_RUNTIME=onnx (ONNX Runtime, fp32; exact)
    onnx-int8    the same with EMOTION_DTYPE=int8 (dynamically quantised MatMuls)

Per mode: one turn alone (each clip sent when the last is answered: latency and clips/s),
two turns at once with one intra-op thread each (bench-only: two threads into the model,
where the engine runs one turn at a time), the model's outputs on ``--fidelity-clips`` more
clips, and the process's RSS after warm-up. Exact modes are compared with ``generate()``,
inexact ones with fp32 (``onnx`` where it runs, being exact and the faster; else ``torch``).
Then ``--server-mode`` through the real action server: ``/v1/analyze`` with raw bytes, open
loop at ``--server-load`` of its in-process capacity, for each of ``--server-arrivals``.

The checkpoint is random-weight (real architecture, real speed). Its head is spread (see
``_spread_head``) so that scores differ from clip to clip and argmax agreement means
something; the fidelity clips are synthetic voiced sounds of varied pitch, timbre, rhythm and
noise (``_voiced``), since white-noise clips all look alike to the model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# This checkout's emotion/, not the one an editable install points at (that finder comes
# after sys.path); children and the action server inherit it through PYTHONPATH.
sys.path.insert(1, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import bench as common  # noqa: E402  (bench/bench.py: clips, stats, the action server and its load)
from emotion.engine.audio import SAMPLE_RATE_HZ  # noqa: E402

MODES = ("generate", "torch", "torch-bf16", "torch-int8", "torch-compile", "onnx", "onnx-int8")
EXACT = ("torch", "torch-compile", "onnx")  # compared with generate(); the others with torch
DEFAULT_MODES = ("generate", "torch", "torch-bf16", "torch-int8", "onnx", "onnx-int8")
# The spread head's logits have this standard deviation over the calibration clips: top
# scores then range from about 0.2 to 0.95, as a trained head's do.
HEAD_LOGIT_STD = 2.0
CALIBRATION_CLIPS = 24


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/cpu.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a FunASR model directory; default: a random-weight checkpoint of --size, head spread")
    parser.add_argument("--size", choices=("tiny", "base", "large"), default="large")
    parser.add_argument("--modes", nargs="+", choices=MODES, help=f"default: {' '.join(DEFAULT_MODES)}")
    parser.add_argument("--clips", type=int, default=16, help="timed clips (mixed lengths), the same for every mode")
    parser.add_argument("--seconds", type=float, nargs=2, default=(1.0, 15.0), metavar=("MIN", "MAX"))
    parser.add_argument("--fidelity-clips", type=int, default=200, help="more clips, untimed, for inexact modes against fp32")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads of one turn at a time")
    parser.add_argument("--server-mode", help="the mode served through the action server (default: none)")
    parser.add_argument("--server-turns", type=int, default=60)
    parser.add_argument("--server-load", type=float, default=0.8, help="offered rate as a share of in-process clips/s")
    parser.add_argument("--server-arrivals", nargs="+", choices=("poisson", "even"), default=["poisson", "even"])
    parser.add_argument("--load-processes", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoint, a few clips: checks the harness in seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.clips, args.fidelity_clips, args.server_turns = "tiny", 4, 4, 8
        args.modes = args.modes or ["generate", "torch", "torch-int8", "onnx-int8"]
        args.server_mode = args.server_mode or "onnx-int8"
    args.modes = args.modes or list(DEFAULT_MODES)
    if args.child:
        with contextlib.redirect_stdout(sys.stderr):  # FunASR's banner; stdout is the report
            report = _run_child(args)
        print(json.dumps(report))
        return 0
    with contextlib.redirect_stdout(sys.stderr):
        report = _run(args)
    print(json.dumps(report, indent=2))
    return 0


# -- the parent: a process per mode, then the comparisons and the server ----------------


def _run(args: argparse.Namespace) -> dict:
    report = {"date": time.strftime("%Y-%m-%d"), **_machine(args), "load_average_before": os.getloadavg()[:3]}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if not model_dir:
            from emotion.tools.checkpoint import write_checkpoint

            model_dir = str(write_checkpoint(Path(tmp) / args.size, size=args.size))
            report["head"] = _child(args, "spread-head", model_dir, tmp)
        report["model"] = args.model or f"random-weight {args.size} checkpoint, head spread (real architecture, no accuracy)"
        report["clips"] = args.clips
        report["fidelity_clips"] = args.fidelity_clips
        modes = {}
        for mode in args.modes:
            modes[mode] = _child(args, mode, model_dir, tmp)
            print(f"cpu bench: {mode} done at {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        _compare(modes, tmp)
        report["modes"] = modes
        if args.server_mode:
            report["action_server"] = _server(args, model_dir, modes.get(args.server_mode))
    report["load_average_after"] = os.getloadavg()[:3]
    report["wall_s"] = round(time.monotonic() - started)
    return report


def _machine(args: argparse.Namespace) -> dict:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "device": f"cpu, {os.cpu_count()} cores",
        "cpu_model": model,
        # What the int8 and bf16 kernels can use: VNNI for int8 dot products, avx512_bf16 and
        # AMX for bf16.
        "cpu_flags": sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                                      "amx_bf16", "amx_int8", "amx_tile"}),
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": ort_version,
    }


def _child(args: argparse.Namespace, mode: str, model_dir: str, tmp: str) -> dict:
    argv = [sys.executable, __file__, "--child", mode, "--child-dir", tmp, "--model", model_dir, "--clips", str(args.clips),
            "--seconds", *map(str, args.seconds), "--fidelity-clips", str(args.fidelity_clips), "--threads", str(args.threads),
            "--reference", _reference(args.modes)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
                "stderr_tail": proc.stderr[-1500:]}
    return json.loads(proc.stdout)


def _reference(modes) -> str:
    """The fp32 mode the inexact ones are compared with."""
    return "onnx" if "onnx" in modes else "torch"


def _compare(modes: dict, tmp: str) -> None:
    """Ratios to generate(), and fidelity: exact modes against generate() on the timed clips,
    inexact ones against fp32 (``_reference``) on the timed and the fidelity clips."""
    def load(mode):
        path = Path(tmp) / f"{mode}.npz"
        return np.load(path) if path.exists() else None

    base = modes.get("generate", {})
    reference, fp32 = load("generate"), load(_reference(modes))
    for mode, r in modes.items():
        if "error" in r:
            continue
        if mode != "generate" and "one_turn_alone" in base:
            alone, b = r["one_turn_alone"], base["one_turn_alone"]
            r["vs_generate"] = {
                "clips_per_s": round(r["best"]["clips_per_s"] / b["clips_per_s"], 2),
                "audio_seconds_per_s": round(r["best"]["audio_seconds_per_s"] / b["audio_seconds_per_s"], 2),
                "one_turn_latency_p50": round(alone["latency_ms"]["p50"] / b["latency_ms"]["p50"], 2),
            }
        out = load(mode)
        if out is None or mode == "generate":
            continue
        timed = len(reference["scores"]) if reference is not None else 0
        if reference is not None:
            r["fidelity_vs_generate"] = _fidelity(out["scores"][:timed], reference["scores"], None, None)
        if mode not in EXACT and fp32 is not None:
            r["fidelity_vs_fp32"] = _fidelity(out["scores"], fp32["scores"], out["embeddings"], fp32["embeddings"])
    if fp32 is not None:
        top = fp32["scores"].max(1)
        # How far the spread head spreads: a constant head would give one score and one label.
        modes[_reference(modes)]["fp32_score_spread"] = {
            "top_score_p5_p50_p95": [round(float(np.percentile(top, p)), 3) for p in (5, 50, 95)],
            "argmax_labels_seen": int(len(set(fp32["scores"].argmax(1).tolist()))),
        }


def _fidelity(scores, ref_scores, emb, ref_emb) -> dict:
    out = {
        "clips": int(len(scores)),
        "max_score_diff": float(f"{np.abs(scores - ref_scores).max():.3g}"),
        "argmax_agreement": round(float((scores.argmax(1) == ref_scores.argmax(1)).mean()), 4),
    }
    if emb is not None:
        cos = (emb * ref_emb).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref_emb, axis=1))
        out["embedding_cosine_min"] = round(float(cos.min()), 5)
        out["embedding_cosine_mean"] = round(float(cos.mean()), 5)
    return out


def _server(args: argparse.Namespace, model_dir: str, measured: dict | None) -> dict:
    """The chosen mode through the real action server: ``/v1/analyze`` with raw WAV bytes at
    ``--server-load`` of the clips/s it served in-process, for each of ``--server-arrivals``."""
    import httpx

    mode = args.server_mode
    if not measured or "error" in measured or "settings" not in measured:
        return {"mode": mode, "error": "the mode was not measured in-process, or is bench-only"}
    env = {"EMOTION_MODEL": model_dir, "EMOTION_DEVICE": "cpu", "EMOTION_URL_ALLOW": "127.0.0.1/32"}
    env.update(measured["settings"])
    capacity = measured["one_turn_alone"]["clips_per_s"]
    one_turn_p50 = measured["one_turn_alone"]["latency_ms"]["p50"]
    report = {"mode": mode, "env": measured["settings"], "path": "api_raw_bytes", "in_process_clips_per_s": capacity,
              "in_process_one_turn_p50_ms": one_turn_p50}
    load = argparse.Namespace(server_turns=args.server_turns, server_rate=args.server_load * capacity, seconds=args.seconds,
                              fixed_seconds=None, load_processes=args.load_processes)
    with tempfile.TemporaryDirectory() as clips_dir:
        wavs = common._turn_wavs(load, Path(clips_dir))  # the same turns for each arrival process
        try:
            with common.action_server(env) as (_proc, url), common._file_server(clips_dir) as clips_url:
                pid = httpx.get(url + "/ready").json()["pid"]  # the worker that holds the model
                report["rss_after_warmup_mb"] = _rss_mb(pid)
                for arrivals in args.server_arrivals:
                    load.arrivals = arrivals
                    run = asyncio.run(common._open_loop(url, "api_raw_bytes", load, clips_url, len(wavs)))
                    run["p95_over_in_process_p50"] = round(run["latency_ms"]["p95"] / one_turn_p50, 2) if run["latency_ms"] else None
                    report[arrivals] = run
                report["rss_after_load_mb"] = _rss_mb(pid)
        except RuntimeError as exc:
            return {**report, "error": str(exc)}
    return report


def _rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


# -- a child: one mode -------------------------------------------------------------------


def _run_child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    mode, tmp = args.child, Path(args.child_dir)
    if mode == "spread-head":
        return _spread_head(args.model)
    clips = common._clips(argparse.Namespace(clips=args.clips, seconds=args.seconds, fixed_seconds=None))
    rng = np.random.default_rng(3)
    fidelity = [_voiced(rng, s) for s in rng.uniform(*args.seconds, args.fidelity_clips)]
    loaded = time.perf_counter()
    runner = _Generate(args.model) if mode == "generate" else _Engine(mode, args.model, str(tmp / "onnx-cache"))
    out = {"load_and_warmup_s": round(time.perf_counter() - loaded, 1), "rss_after_warmup_mb": _rss_mb()}
    if hasattr(runner, "settings"):
        out["settings"] = runner.settings
    out["one_turn_alone"] = runner.one_at_a_time(clips)
    out["intra_op_threads"] = torch.get_num_threads()
    best = {"variant": f"one turn at a time, {args.threads} intra-op threads", **out["one_turn_alone"]}
    two = runner.two_at_once(clips)
    if two is not None:
        out["two_turns_at_once_1_thread_each"] = two
        if two["clips_per_s"] > best["clips_per_s"]:
            best = {"variant": "two turns at once, 1 intra-op thread each (bench-only)", **two}
    out["best"] = {k: best[k] for k in ("variant", "clips_per_s", "audio_seconds_per_s")}
    # The fidelity clips where they are compared: in the inexact modes and their fp32 reference.
    scores, embeddings = runner.outputs(clips + fidelity if mode == args.reference or mode not in EXACT + ("generate",) else clips)
    np.savez(tmp / f"{mode}.npz", scores=scores, embeddings=embeddings)
    out["peak_rss_mb"] = round(int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                                        if line.startswith("VmHWM:")).split()[1]) / 1024, 1)
    return out


class _Generate:
    """FunASR's own AutoModel.generate(), one clip per call, fp32: what a naive integration does."""

    def __init__(self, model_dir: str) -> None:
        from emotion.engine.model import EmotionModel

        self.model = EmotionModel(model_dir, device="cpu", dtype="float32", compile="off")
        self.model.funasr.generate(input=common._speech(np.random.default_rng(0), 5.0), disable_pbar=True)

    def one_at_a_time(self, clips):
        return common._baseline(self.model, clips)

    def two_at_once(self, clips):
        return None

    def outputs(self, clips):
        from emotion.engine.model import english_label

        scores, embeddings = [], []
        for clip in clips:
            res = self.model.funasr.generate(input=clip, granularity="utterance", extract_embedding=True, disable_pbar=True)[0]
            by_label = {english_label(token): score for token, score in zip(res["labels"], res["scores"])}
            scores.append([by_label[lab] for lab in self.model.labels])
            embeddings.append(np.asarray(res["feats"], dtype=np.float32).reshape(-1))
        return np.array(scores, dtype=np.float64), np.stack(embeddings)


class _Engine:
    """The engine in this process, as the action server runs it (one turn at a time on CPU)."""

    def __init__(self, mode: str, model_dir: str, onnx_cache: str) -> None:
        from emotion.engine.backend import InProcessBackend
        from emotion.engine.core import EmotionEngine
        from emotion.settings import Settings

        torch_ = {"EMOTION_RUNTIME": "torch", "EMOTION_DTYPE": "float32"}
        env = {"torch": torch_, "torch-bf16": {**torch_, "EMOTION_DTYPE": "bfloat16"}, "torch-int8": torch_,
               "torch-compile": {**torch_, "EMOTION_COMPILE": "on"},
               "onnx": {"EMOTION_RUNTIME": "onnx", "EMOTION_DTYPE": "float32"},
               "onnx-int8": {"EMOTION_RUNTIME": "onnx", "EMOTION_DTYPE": "int8"}}[mode]
        if mode.startswith("onnx"):  # the export is made once, at the first load, and cached here for the server
            env = {**env, "EMOTION_ONNX_CACHE_DIR": onnx_cache}
        if mode != "torch-int8":  # the others are settings the server takes as they are
            self.settings = env
        config = Settings.from_env({**env, "EMOTION_MODEL": model_dir, "EMOTION_DEVICE": "cpu"})
        self.backend = InProcessBackend(config).load()
        if mode == "torch-int8":
            _quantize_linear(self.backend.model)
            self.backend._warmup()
        self.engine = EmotionEngine(config, backend=self.backend)
        self.model = self.backend.model

    def one_at_a_time(self, clips):
        level = asyncio.run(common._engine_level(self.engine, self.backend, clips, 1))
        return {k: level[k] for k in ("clips_per_s", "audio_seconds_per_s", "latency_ms")}

    def two_at_once(self, clips):
        """Two threads into the model at once, one intra-op thread each: what two turns in
        flight would give if the engine ran them so (it runs one at a time on CPU). Bench-only:
        it calls the model past its lock."""
        import concurrent.futures

        import torch

        onnx_frames = getattr(self.model, "_onnx", None)
        if onnx_frames is not None:  # one session, one intra-op thread, run from two threads
            from emotion.engine.onnx import OnnxFrames

            forward = OnnxFrames(onnx_frames.path, threads=1)
        else:
            def forward(clip):
                with torch.inference_mode(), self.model._autocast():
                    self.model._alone([clip])

        def one(clip):
            t = time.perf_counter()
            forward(clip)
            return time.perf_counter() - t

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one(clips[0])
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                latencies = list(pool.map(one, clips))
            return common._stats(latencies, clips, time.perf_counter() - started)
        finally:
            torch.set_num_threads(threads)

    def outputs(self, clips):
        results = self.backend.infer_waves(clips, embeddings=True)
        labels = self.model.labels
        scores = np.array([[r.scores[lab] for lab in labels] for r in results], dtype=np.float64)
        return scores, np.stack([np.asarray(r.embedding, dtype=np.float32) for r in results])


def _quantize_linear(model) -> None:
    """Dynamic int8 for every nn.Linear of the encoder (weights int8 per tensor, activations
    quantised per batch at run time); the head stays fp32, as the engine reads its weights."""
    import torch

    net = model.net
    for part in (net.modality_encoders["AUDIO"], net.blocks):
        torch.ao.quantization.quantize_dynamic(part, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def _spread_head(model_dir: str) -> dict:
    """Rewrite the random head so its scores spread from clip to clip: logits
    ``k * W (e - mu)``, W the random head's weights, mu the mean fp32 embedding of
    calibration clips, k set so that the logits' standard deviation over those clips is
    HEAD_LOGIT_STD. A bias set by hand would give every clip the same scores; W alone gives
    nearly the same (every clip's embedding is mostly the shared mean)."""
    import torch

    from emotion.engine.model import EmotionModel

    model = EmotionModel(model_dir, device="cpu", dtype="float32", compile="off")
    rng = np.random.default_rng(4)
    clips = [_voiced(rng, s) for s in rng.uniform(1.0, 4.0, CALIBRATION_CLIPS)]
    emb = np.stack([model.forward([clip], embeddings=True)[0].embedding for clip in clips])
    path = Path(model_dir) / "model.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    w, mu = state["proj.weight"].double(), torch.from_numpy(emb.mean(0)).double()
    centred = torch.from_numpy(emb).double() - mu
    k = HEAD_LOGIT_STD / float((centred @ w.T).std())
    state["proj.weight"] = (k * w).float()
    state["proj.bias"] = (-k * w @ mu).float()
    torch.save(state, path)
    return {"how": "logits = k * W (e - mu): W the random head, mu the mean embedding of the calibration clips",
            "factor_k": round(k, 2), "logit_std": HEAD_LOGIT_STD, "calibration_clips": CALIBRATION_CLIPS}


def _voiced(rng, seconds: float) -> np.ndarray:
    """A synthetic voiced sound: harmonics of a gliding pitch with a random spectral tilt,
    syllable-rate loudness, breath noise and a random level. Not speech; varied enough that
    the model's embeddings differ from clip to clip."""
    n = int(seconds * SAMPLE_RATE_HZ)
    t = np.arange(n) / SAMPLE_RATE_HZ
    f0 = rng.uniform(80, 300) * (1 + rng.uniform(0, 0.3) * np.sin(2 * np.pi * rng.uniform(0.2, 3) * t + rng.uniform(0, 6.3)))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE_HZ
    tilt = rng.uniform(0.5, 2.5)
    voice = sum(h ** -tilt * np.sin(h * phase + rng.uniform(0, 6.3)) for h in range(1, 25))
    envelope = (0.5 * (1 + np.sin(2 * np.pi * rng.uniform(2, 7) * t + rng.uniform(0, 6.3)))) ** rng.uniform(0.5, 3)
    noise = rng.standard_normal(n) * rng.uniform(0.01, 0.6)
    return ((voice * envelope + noise) * rng.uniform(0.02, 0.5)).astype(np.float32)


if __name__ == "__main__":
    sys.exit(main())
