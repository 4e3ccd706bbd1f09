"""emotion2vec as an ONNX graph: the export of any checkpoint the engine loads, checked
against FunASR's own ``generate()``, and the runner the engine uses on CPU.

Nobody ships emotion2vec in ONNX (FunASR #1690 and #2291, emotion2vec #55). The graph
runs one clip at a time, as ``generate()`` does: padding a batch changes emotion2vec's
scores. Inputs and outputs:

    waveform  float32 (1, samples)  16 kHz mono, raw (the model's per-clip normalisation is inside)
    scores    float32 (1, tokens)   softmax over every token of tokens.txt, as generate() gives it
    embedding float32 (1, dim)      mean of the final frame features (generate()'s utterance feats)
    frames    float32 (1, T, dim)   final per-frame features

The labels (tokens.txt order) and the source model are in the file's metadata_props.
onnxruntime and onnx are imported only here, and only when used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from emotion.engine.loading import _alibi_unit, _conv_layers, _root_log_at, _samples_for_frames, _scored, build_automodel
from emotion.errors import InferenceFailed, ModelUnavailable, first_line
from emotion.settings import SAMPLE_RATE_HZ

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "rasa-emotion2vec[onnx]"'
# 20: GELU is one op (Gelu-20); in 18 it is five, which ONNX Runtime's fusion does not recognise.
OPSET = 20
# Lengths checked against generate() at export, besides the shortest clip the graph takes
# (two frames, see _check_lengths): 1 s; 45 s, the longest clip the engine runs with the
# default EMOTION_WINDOW_SECONDS (30 s: a longer turn is cut into windows, the last taking a
# tail under half a window); and one that is no multiple of the conv stride.
CHECK_SAMPLES = (SAMPLE_RATE_HZ, 45 * SAMPLE_RATE_HZ, 2 * SAMPLE_RATE_HZ + 4321)
MAX_SCORE_DIFF = 1e-4
# Bumped when the graph changes, so that cached exports of an older graph are not reused.
GRAPH_VERSION = "2"


def onnxruntime():
    """The onnxruntime module, or ModelUnavailable saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # absent, or installed but broken (a missing shared library)
        raise ModelUnavailable(f"the onnx runtime needs onnxruntime, which cannot be imported ({first_line(exc)}): "
                               f"{INSTALL_HINT}") from exc
    return ort


def export_onnx(model: str, out: Path, *, hub: str = "ms", int8: bool = False) -> dict:
    """Export a checkpoint (hub id or FunASR directory) to ``out``, check it against
    FunASR's generate() and return a report; fp32 scores further than MAX_SCORE_DIFF
    from generate() fail the export. ``int8``: MatMul/Gemm weights quantised afterwards.
    Raises OSError where ``out`` cannot be written."""
    ort = onnxruntime()
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter's; say so before it fails deep inside)
    except ImportError as exc:
        raise ModelUnavailable(f"exporting to ONNX needs onnx and onnxscript ({first_line(exc)}): {INSTALL_HINT}") from exc
    started = time.monotonic()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # As FunASR builds it: none of EmotionModel's hooks or attention wrappers in the traced graph.
    auto = build_automodel(model, hub, torch.device("cpu"))
    if auto.model.proj is None:
        raise ModelUnavailable(f"{model}: checkpoint has no classification head")
    tokens = list(auto.kwargs.get("token_list") or [])
    # Written beside ``out`` and renamed over it once checked: a reader never sees half a file.
    float32, quantised = (out.with_name(f".{out.name}.{os.getpid()}.{kind}") for kind in ("float32", "int8"))
    try:
        _export_graph(auto.model, tokens, float32)
        proto = onnx.load(str(float32))
        for key, value in {"labels": json.dumps(tokens, ensure_ascii=False), "source_model": model,
                           "sample_rate_hz": str(SAMPLE_RATE_HZ), "producer": "rasa-emotion2vec"}.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(float32))
        del proto
        waves = [_check_wave(n) for n in _check_lengths(auto.model)]
        got = _run(ort, float32, waves)
        report = {"model": model, "out": str(out), "opset": OPSET, "lengths_s": [len(w) / SAMPLE_RATE_HZ for w in waves],
                  **_against_generate(auto, tokens, waves, got)}
        if max(report["max_score_diff"]) > MAX_SCORE_DIFF:
            raise ModelUnavailable(f"{model}: the ONNX export's scores differ from FunASR's generate() by up to "
                                   f"{max(report['max_score_diff']):.2e} (allowed {MAX_SCORE_DIFF:g}); the export is not usable")
        if int8:
            _quantise(float32, quantised)
            report["int8"] = _against_float32(_run(ort, quantised, waves), got)
        os.replace(quantised if int8 else float32, out)
    finally:
        for temporary in (float32, quantised):
            temporary.unlink(missing_ok=True)
    report.update(precision="int8" if int8 else "float32", bytes=out.stat().st_size,
                  seconds=round(time.monotonic() - started, 1))
    return report


def _run(ort, path: Path, waves: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    session = _session(ort, path, threads=torch.get_num_threads())
    return [tuple(session.run(["scores", "embedding"], {"waveform": w[None]})) for w in waves]


def _against_generate(auto, tokens: list[str], waves, got) -> dict:
    """Largest differences from FunASR's own generate(), per clip."""
    keep = _scored(tokens)
    scores, embeddings = [], []
    for wave, (score, embedding) in zip(waves, got):
        try:
            ref = auto.generate(input=wave, granularity="utterance", extract_embedding=True, disable_pbar=True)[0]
        except Exception as exc:  # FunASR's own, on a clip the graph took
            raise ModelUnavailable(f"FunASR's generate() failed on a {len(wave)}-sample check clip: {type(exc).__name__}: "
                                   f"{first_line(exc)}") from exc
        scores.append(float(np.abs(score[0, keep] - np.asarray(ref["scores"])).max()))
        embeddings.append(float(np.abs(embedding[0] - ref["feats"]).max()))
    return {"max_score_diff": scores, "max_embedding_diff": embeddings}


def _against_float32(quantised, got) -> dict:
    """How far int8 lies from fp32, per clip: no fixed bound, a report."""
    return {"max_score_diff_from_float32": [float(np.abs(q[0] - f[0]).max()) for q, f in zip(quantised, got)],
            "embedding_cosine_to_float32": [_cosine(q[1][0], f[1][0]) for q, f in zip(quantised, got)],
            "argmax_agrees": [bool(np.argmax(q[0]) == np.argmax(f[0])) for q, f in zip(quantised, got)]}


class _Graph(torch.nn.Module):
    """FunASR's Emotion2vec as generate() runs it on one clip, with the three outputs."""

    def __init__(self, net: torch.nn.Module, tokens: list[str]) -> None:
        super().__init__()
        self.net = net
        # generate() sets the 'unuse*' tokens' logits to -inf before its softmax.
        unused = torch.ones(len(tokens), dtype=torch.bool)
        unused[_scored(tokens)] = False
        self.register_buffer("unused", unused, persistent=False)

    def forward(self, waveform: torch.Tensor):
        x = waveform
        if self.net.cfg.normalize:
            # generate()'s F.layer_norm(source, source.shape), written out: a normalized_shape
            # taken from the input would not stay dynamic.
            mean = x.mean(dim=1, keepdim=True)
            var = x.var(dim=1, keepdim=True, unbiased=False)
            x = (x - mean) / torch.sqrt(var + 1e-5)
        frames = self.net.extract_features(x, padding_mask=None)["x"]
        embedding = frames.mean(dim=1)
        logits = self.net.proj(embedding).masked_fill(self.unused, float("-inf"))
        return torch.softmax(logits, dim=-1), embedding, frames


def _export_graph(net: torch.nn.Module, tokens: list[str], path: Path) -> None:
    # torch's dynamo exporter (torch.export, then onnxscript): its graph keeps the clip
    # length symbolic throughout. The TorchScript exporter (dynamo=False) also runs, but
    # its frames differed from FunASR's at every length we checked.
    enc = net.modality_encoders["AUDIO"]
    unit = _alibi_unit(enc.modality_cfg.num_alibi_heads)

    def dynamic_alibi(batch_size, time_steps, heads, dtype, device, **_):
        # FunASR's get_alibi_bias caches a (heads x T x T) tensor sized by a Python int:
        # traced, it becomes a constant for the example's length. The same values, from
        # the symbolic length; FunASR then scales and pads it as it does its own.
        pos = torch.arange(time_steps, device=device).to(dtype)
        bias = unit.to(device, dtype).view(1, heads, 1, 1) * (pos[None, :] - pos[:, None]).abs()
        return bias.expand(batch_size, -1, -1, -1)

    own = enc.get_alibi_bias
    if own is not None:
        enc.get_alibi_bias = dynamic_alibi
    from torch.export import Dim

    # Two frames' worth of samples and more: a length of 0 or 1 would be specialised.
    samples = Dim("samples", min=_check_lengths(net)[0])
    example = torch.from_numpy(_check_wave(3 * SAMPLE_RATE_HZ + 123))[None]
    try:
        # The exporter logs a line per initializer it merges and prints its progress; stdout
        # is the CLI's JSON report.
        with torch.no_grad(), _root_log_at(logging.WARNING), contextlib.redirect_stdout(sys.stderr):
            torch.onnx.export(_Graph(net, tokens).eval(), (example,), str(path), dynamo=True, opset_version=OPSET,
                              input_names=["waveform"], output_names=["scores", "embedding", "frames"],
                              dynamic_shapes={"waveform": {1: samples}}, external_data=False, verbose=False)
    except OSError:
        raise  # writing the file: the caller says where
    except Exception as exc:
        raise ModelUnavailable(f"ONNX export failed: {type(exc).__name__}: {first_line(exc, 300)}") from exc
    finally:
        enc.get_alibi_bias = own


def _check_lengths(net: torch.nn.Module) -> list[int]:
    """Clip lengths checked at export: the shortest the graph takes (two frames), then CHECK_SAMPLES."""
    return [_samples_for_frames(_conv_layers(net), 2), *CHECK_SAMPLES]


def _check_wave(samples: int) -> np.ndarray:
    """A fixed voiced signal with noise: not silence, so every layer sees varied input."""
    rng = np.random.default_rng(samples)
    t = np.arange(samples) / SAMPLE_RATE_HZ
    wave = 0.3 * np.sin(2 * np.pi * 150 * t) * np.clip(np.sin(2 * np.pi * 3 * t), 0, None) + 0.02 * rng.standard_normal(samples)
    return wave.astype(np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def _quantise(src: Path, dst: Path) -> None:
    # Dynamic quantisation of the transformer's weights only: the conv front end stays in
    # fp32, where it sees the raw waveform.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _root_log_at(logging.ERROR):  # its advice to pre-process, meant for static quantisation
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                         per_channel=True)


def _session(ort, path: Path, *, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle workers would otherwise spin after each clip, taking CPU from the decoder
    # threads and the event loop between turns.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The arena would keep the longest clip's activations for the life of the process;
    # without it they are returned after each clip, at no speed cost we could measure.
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cache_paths(auto, cache_dir: Path) -> dict[str, Path]:
    """Where a checkpoint's exports live in the cache, by precision: named by a hash of the
    files FunASR loaded (the weights it read, which config.yaml or a hub's configuration.json
    may name; config.yaml, tokens.txt) and of the versions that make the file, so a changed
    checkpoint or exporter exports afresh."""
    model_dir = Path(auto.kwargs["model_path"])
    digest = hashlib.sha256(f"{GRAPH_VERSION} torch {torch.__version__} funasr {importlib.metadata.version('funasr')}".encode())
    for file in (Path(auto.kwargs["init_param"]), *(model_dir / n for n in ("config.yaml", "configuration.json", "tokens.txt"))):
        if file.is_file():
            with open(file, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
        digest.update(b"\0")
    float32 = digest.hexdigest()[:24]
    digest.update(f"onnxruntime {onnxruntime().__version__}".encode())  # int8: its quantiser's
    return {"float32": cache_dir / f"emotion2vec-{float32}-float32.onnx",
            "int8": cache_dir / f"emotion2vec-{digest.hexdigest()[:24]}-int8.onnx"}


class OnnxFrames:
    """An exported checkpoint in an ONNX Runtime session: a clip in, its final frames out."""

    def __init__(self, path: Path, *, threads: int) -> None:
        self.path = path
        self.session = _session(onnxruntime(), path, threads=threads)

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        try:
            return self.session.run(["frames"], {"waveform": np.ascontiguousarray(wave, dtype=np.float32)[None]})[0][0]
        except Exception as exc:  # onnxruntime's own exception types, not RuntimeError
            raise InferenceFailed(f"inference failed: {first_line(exc)}") from exc


def load_cached(auto, source: str, *, hub: str, precision: str, cache_dir: Path, threads: int) -> OnnxFrames:
    """The export of a checkpoint (``auto``: its FunASR AutoModel, of which only the files it
    loaded are read) from the cache, exported there first if it is not, in a process of its
    own (``_apart``); int8 quantises the cached fp32 export, so a change of precision exports
    nothing again. A cached file that onnxruntime cannot open, or whose labels are not the
    checkpoint's tokens, is made afresh."""
    paths = cache_paths(auto, cache_dir)
    float32, path = paths["float32"], paths[precision]
    tokens = list(auto.kwargs.get("token_list") or [])
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fresh = not float32.is_file()
            if fresh:
                log.info("exporting %s to ONNX at %s, once", source, float32)
                log.info("ONNX export of %s: %s", source, _apart(export_onnx, source, str(float32), hub=hub))
            try:
                if not path.is_file():  # int8
                    log.info("ONNX int8 export of %s at %s: %s", source, path, _apart(_quantise_beside, str(float32), str(path)))
                frames = OnnxFrames(path, threads=threads)
                if json.loads(frames.session.get_modelmeta().custom_metadata_map.get("labels", "null")) == tokens:
                    return frames
                reason = "its labels are not the checkpoint's tokens"
            except OSError:
                raise
            except Exception as exc:  # onnxruntime's and onnx's own types: a damaged file
                reason = f"{type(exc).__name__}: {first_line(exc)}"
            if fresh:
                raise ModelUnavailable(f"{source}: the ONNX export {path}, made just now, is unusable: {reason}")
            log.warning("the cached ONNX export %s is unusable (%s): exporting it afresh", path, reason)
            for stale in (path, float32):  # for int8, its fp32 source may be the damaged one
                stale.unlink(missing_ok=True)
    except OSError as exc:
        raise ModelUnavailable(f"EMOTION_ONNX_CACHE_DIR={cache_dir}: cannot write the ONNX export {path}: {first_line(exc)}; "
                               "set it to a writable directory") from exc


def _apart(fn, *args: str, **kwargs: str):
    """``fn(*args, **kwargs)``, a function of this module, in a Python of its own; its
    ModelUnavailable and OSError raised here. The exporter and the quantiser keep hold of what
    they built after they return (the model's weights among it, past gc), and a server that
    exported in its own process would carry that for life. Not multiprocessing: its spawn
    runs the host's main script again, which a script that loads the model unguarded cannot take."""
    call = json.dumps([fn.__name__, args, kwargs])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))}  # this process's emotion
    done = subprocess.run([sys.executable, "-c", "from emotion.engine.onnx import _child; _child()", call],
                          stdout=subprocess.PIPE, env=env, text=True, check=False)
    try:
        out = json.loads(done.stdout.splitlines()[-1])
    except (IndexError, ValueError):
        out = None
    if done.returncode != 0 or not isinstance(out, dict):
        killed = " (killed: out of memory?)" if done.returncode < 0 else ""
        raise ModelUnavailable(f"the ONNX export's process ended with status {done.returncode}{killed} before it finished")
    if "error" in out:
        raise (OSError if out["kind"] == "OSError" else ModelUnavailable)(out["error"])
    return out["report"]


def _child() -> None:
    """A process that ``_apart`` started: its call from argv, its result as the last line of stdout."""
    name, args, kwargs = json.loads(sys.argv[1])
    fn = {"export_onnx": export_onnx, "_quantise_beside": _quantise_beside}[name]
    try:
        out = {"report": fn(*args, **kwargs)}
    except OSError as exc:
        out = {"error": str(exc), "kind": "OSError"}
    except ModelUnavailable as exc:
        out = {"error": exc.message, "kind": "ModelUnavailable"}
    except Exception as exc:  # onnx's and onnxruntime's own types, on a damaged fp32 file
        out = {"error": f"{type(exc).__name__}: {first_line(exc)}", "kind": type(exc).__name__}
    print(json.dumps(out))


def _quantise_beside(float32: str, path: str) -> dict:
    """int8 of the fp32 export at ``path``, with its distance from fp32 on the check clips."""
    ort = onnxruntime()
    float32, path = Path(float32), Path(path)
    waves = [_check_wave(n) for n in CHECK_SAMPLES]
    # Written beside ``path`` and renamed over it once checked: a reader never sees half a file.
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        _quantise(float32, temporary)
        report = _against_float32(_run(ort, temporary, waves), _run(ort, float32, waves))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return report
