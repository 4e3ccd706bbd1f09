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
import gc
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from emotion.engine.loading import build_automodel
from emotion.errors import InferenceFailed, ModelUnavailable, first_line

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "rasa-emotion2vec[onnx]"'
OPSET = 18
SAMPLE_RATE_HZ = 16_000
# Lengths checked against generate() at export: the shortest and longest turns the engine
# runs whole (a window is at most 30 s), and one that is no multiple of the conv stride.
CHECK_SAMPLES = (SAMPLE_RATE_HZ, 30 * SAMPLE_RATE_HZ, 2 * SAMPLE_RATE_HZ + 4321)
MAX_SCORE_DIFF = 1e-4
# Bumped when the graph changes, so that cached exports of an older graph are not reused.
GRAPH_VERSION = "1"


def onnxruntime():
    """The onnxruntime module, or ModelUnavailable saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelUnavailable(f"the onnx runtime needs onnxruntime, which is not installed: {INSTALL_HINT}") from exc
    return ort


def onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def export_onnx(model: str, out: Path, *, hub: str = "ms", int8: bool = False, source: str | None = None) -> dict:
    """Export a checkpoint (hub id or FunASR directory) to ``out``, check it against
    FunASR's generate() and return a report; fp32 scores further than MAX_SCORE_DIFF
    from generate() fail the export. ``int8``: MatMul/Gemm weights quantised afterwards.
    ``source``: the model's name for the metadata, where ``model`` is its downloaded copy."""
    ort = onnxruntime()
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter's; say so before it fails deep inside)
    except ImportError as exc:
        raise ModelUnavailable(f"exporting to ONNX needs onnx and onnxscript: {INSTALL_HINT}") from exc
    started = time.monotonic()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    auto = build_automodel(model, hub, torch.device("cpu"))
    net = auto.model.eval()
    if net.proj is None:
        raise ModelUnavailable(f"{model}: checkpoint has no classification head")
    tokens = list(auto.kwargs.get("token_list") or [])
    float32 = out.with_name(f".{out.name}.{os.getpid()}.float32")
    try:
        _export_graph(net, tokens, float32)
        proto = onnx.load(str(float32))
        for key, value in {"labels": json.dumps(tokens, ensure_ascii=False), "source_model": source or model,
                           "sample_rate_hz": str(SAMPLE_RATE_HZ), "producer": "rasa-emotion2vec"}.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(float32))
        del proto
        waves = [_check_wave(n) for n in CHECK_SAMPLES]
        fp32 = _session(ort, float32, threads=torch.get_num_threads())
        got = [fp32.run(["scores", "embedding"], {"waveform": w[None]}) for w in waves]
        report = {"model": model, "out": str(out), "opset": OPSET, "lengths_s": [len(w) / SAMPLE_RATE_HZ for w in waves]}
        score_diff, embed_diff = [], []
        keep = [i for i, t in enumerate(tokens) if not t.startswith("unuse")]
        for wave, (scores, embedding) in zip(waves, got):
            ref = auto.generate(input=wave, granularity="utterance", extract_embedding=True, disable_pbar=True)[0]
            score_diff.append(float(np.abs(scores[0, keep] - np.asarray(ref["scores"])).max()))
            embed_diff.append(float(np.abs(embedding[0] - ref["feats"]).max()))
        report.update(max_score_diff=score_diff, max_embedding_diff=embed_diff)
        if max(score_diff) > MAX_SCORE_DIFF:
            raise ModelUnavailable(f"{model}: the ONNX export's scores differ from FunASR's generate() by up to "
                                   f"{max(score_diff):.2e} (allowed {MAX_SCORE_DIFF:g}); the export is not usable")
        if int8:
            quantised = out.with_name(f".{out.name}.{os.getpid()}.int8")
            _quantise(float32, quantised)
            q = _session(ort, quantised, threads=torch.get_num_threads())
            diffs, cosines, agrees = [], [], []
            for wave, (scores, embedding) in zip(waves, got):
                q_scores, q_embedding = q.run(["scores", "embedding"], {"waveform": wave[None]})
                diffs.append(float(np.abs(q_scores - scores).max()))
                cosines.append(_cosine(q_embedding[0], embedding[0]))
                agrees.append(bool(np.argmax(q_scores) == np.argmax(scores)))
            report["int8"] = {"max_score_diff_from_float32": diffs, "embedding_cosine_to_float32": cosines,
                              "argmax_agrees": agrees}
            del q
            os.replace(quantised, out)
        else:
            os.replace(float32, out)
    finally:
        for leftover in out.parent.glob(f".{out.name}.{os.getpid()}.*"):
            leftover.unlink()
        del auto, net
        gc.collect()
    report.update(precision="int8" if int8 else "float32", bytes=out.stat().st_size,
                  seconds=round(time.monotonic() - started, 1))
    return report


class _Graph(torch.nn.Module):
    """FunASR's Emotion2vec as generate() runs it on one clip, with the three outputs."""

    def __init__(self, net: torch.nn.Module, tokens: list[str]) -> None:
        super().__init__()
        self.net = net
        # generate() sets the 'unuse*' tokens' logits to -inf before its softmax.
        self.register_buffer("unused", torch.tensor([t.startswith("unuse") for t in tokens]), persistent=False)

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
    # its frames came out wrong at every length we checked, the trace having baked in
    # shapes of the example clip.
    from funasr.models.emotion2vec.base import get_alibi

    enc = net.modality_encoders["AUDIO"]
    heads = enc.modality_cfg.num_alibi_heads
    unit = get_alibi(2, heads)[:, 0, 1].float()  # -slope per head: the bias at distance 1

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
    samples = Dim("samples", min=_samples_for_frames(enc, 2))
    example = torch.from_numpy(_check_wave(3 * SAMPLE_RATE_HZ + 123))[None]
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the exporter's INFO per initializer it merges
    try:
        # The exporter prints its progress; stdout is the CLI's JSON report.
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            torch.onnx.export(_Graph(net, tokens).eval(), (example,), str(path), dynamo=True, opset_version=OPSET,
                              input_names=["waveform"], output_names=["scores", "embedding", "frames"],
                              dynamic_shapes={"waveform": {1: samples}}, external_data=False, verbose=False)
    except Exception as exc:
        raise ModelUnavailable(f"ONNX export failed: {type(exc).__name__}: {first_line(exc, 300)}") from exc
    finally:
        root.setLevel(level)
        enc.get_alibi_bias = own


def _samples_for_frames(enc, frames: int) -> int:
    samples = 1
    layers = [(int(k), int(s)) for _dim, k, s in enc.feature_enc_layers]
    for kernel, stride in reversed(layers):
        samples = (samples - 1) * stride + kernel
    return samples + (frames - 1) * int(np.prod([s for _k, s in layers]))


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
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cache_path(model_dir: Path, precision: str, cache_dir: Path) -> Path:
    """Where a checkpoint's export lives in the cache: named by a hash of its files'
    contents and the precision, so a changed checkpoint is exported afresh."""
    digest = hashlib.sha256(f"{GRAPH_VERSION} {precision} {torch.__version__}".encode())
    for name in ("model.pt", "config.yaml", "tokens.txt"):
        file = model_dir / name
        if file.is_file():
            with open(file, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
        digest.update(b"\0")
    return cache_dir / f"emotion2vec-{digest.hexdigest()[:24]}-{precision}.onnx"


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


def load_cached(model_dir: Path, source: str, *, hub: str, precision: str, cache_dir: Path, threads: int) -> OnnxFrames:
    """The checkpoint's export from the cache, exported there first if it is not."""
    onnxruntime()
    path = cache_path(model_dir, precision, cache_dir)
    if not path.is_file():
        log.info("exporting %s to ONNX (%s) at %s, once", source, precision, path)
        report = export_onnx(str(model_dir), path, hub=hub, int8=precision == "int8", source=source)
        log.info("ONNX export of %s: %s", source, report)
    return OnnxFrames(path, threads=threads)
