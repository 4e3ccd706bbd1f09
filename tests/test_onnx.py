"""The ONNX export and runtime: the file alone (onnxruntime, no project code) matches FunASR's
generate(); the engine's onnx runtime matches its torch one; the export cache; the settings;
the export-onnx command."""

import asyncio
import json
import shutil

import numpy as np
import pytest
from conftest import loaded, speech_like

from emotion.errors import ConfigError, ModelUnavailable
from emotion.settings import Settings

# The shortest and longest clips the engine runs whole, and lengths that are no multiple of
# the conv stride (320 samples).
LENGTHS = (16_000, 30 * 16_000, 2 * 16_000 + 4321, 7919)

pytestmark = pytest.mark.onnx


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def onnx_model(tiny_model, onnx_cache):
    from emotion.engine.model import EmotionModel

    return EmotionModel(str(tiny_model), device="cpu", runtime="onnx", onnx_cache_dir=str(onnx_cache))


@pytest.fixture(scope="module")
def torch_model(tiny_model):
    from emotion.engine.model import EmotionModel

    return EmotionModel(str(tiny_model), device="cpu", runtime="torch")


def test_the_exported_file_alone_matches_funasr_generate(onnx_model, torch_model, onnx_cache, tiny_model):
    import onnxruntime as ort

    (path,) = onnx_cache.glob("*.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["labels"]) == (tiny_model / "tokens.txt").read_text(encoding="utf-8").split()
    assert meta["source_model"] == str(tiny_model)
    assert [i.name for i in session.get_inputs()] == ["waveform"]
    for seed, samples in enumerate(LENGTHS):
        wave = speech_like(samples / 16_000, seed=seed) * (0.1 + seed)  # loudness varies: the graph normalises
        scores, embedding, frames = session.run(["scores", "embedding", "frames"], {"waveform": wave[None]})
        ref = torch_model.funasr.generate(input=wave, granularity="utterance", extract_embedding=True, disable_pbar=True)[0]
        assert np.abs(scores[0] - np.array(ref["scores"])).max() <= 1e-4, samples
        assert np.abs(embedding[0] - ref["feats"]).max() <= 1e-4, samples
        assert frames.shape == (1, torch_model.frames(samples), torch_model.embed_dim)


def test_onnx_runtime_gives_the_torch_runtime_results(onnx_model, torch_model):
    assert (onnx_model.runtime, onnx_model.precision) == ("onnx", "float32")
    waves = [speech_like(n / 16_000, seed=i) for i, n in enumerate(LENGTHS)]
    ours = onnx_model.forward(waves, frames=True, embeddings=True)
    reference = torch_model.forward(waves, frames=True, embeddings=True)
    for a, b in zip(ours, reference):
        assert a.frames == b.frames
        assert np.abs(a.probs - b.probs).max() <= 1e-4
        assert np.abs(a.embedding - b.embedding).max() <= 1e-4
        assert np.abs(a.frame_probs - b.frame_probs).max() <= 1e-4
        assert np.abs(a.frame_embeddings - b.frame_embeddings).max() <= 1e-4
    # The torch copies of what the session holds are gone; the head stays.
    assert len(onnx_model.net.blocks) == 0 and len(onnx_model.net.modality_encoders) == 0
    assert onnx_model.head.weight.shape == torch_model.head.weight.shape


def test_the_engine_on_the_onnx_runtime_answers_as_on_torch(tiny_model, onnx_model, onnx_cache):
    common = {"model": str(tiny_model), "device": "cpu", "warmup": False, "onnx_cache_dir": str(onnx_cache)}
    on_onnx = loaded(Settings(runtime="onnx", **common))
    on_torch = loaded(Settings(runtime="torch", **common))
    wave = speech_like(4.0, seed=3)
    for granularity in ("utterance", "frame", "segment"):
        (a,), (b,) = (e.analyze_waves([wave], granularity=granularity, embeddings=True) for e in (on_onnx, on_torch))
        assert a.scores == pytest.approx(b.scores, abs=1e-4)
        assert np.abs(a.embedding - b.embedding).max() <= 1e-4
        if granularity == "frame":
            assert np.abs(a.frame_embeddings - b.frame_embeddings).max() <= 1e-4
        assert len(a.segments or ()) == len(b.segments or ())
        for x, y in zip(a.segments or (), b.segments or ()):
            assert x.scores == pytest.approx(y.scores, abs=1e-4)
    status = asyncio.run(on_onnx.status())
    assert (status["runtime"], status["dtype"]) == ("onnx", "float32")
    assert asyncio.run(on_torch.status())["runtime"] == "torch"


def test_the_export_is_cached_by_content_and_a_changed_checkpoint_exported_afresh(tiny_model, onnx_model, onnx_cache,
                                                                                   tmp_path, monkeypatch):
    """Which loads export, not the export itself (the tests above run it): the export is
    replaced by a copy of the one made already."""
    from emotion.engine import onnx
    from emotion.engine.model import EmotionModel
    from emotion.tools.checkpoint import write_checkpoint

    (made,) = onnx_cache.glob("*.onnx")
    exports = []
    monkeypatch.setattr(onnx, "export_onnx", lambda model, out, **_: exports.append(model) or shutil.copy(made, out))
    copy = shutil.copytree(tiny_model, tmp_path / "copy")  # the same files elsewhere: the same export
    EmotionModel(str(copy), device="cpu", runtime="onnx", onnx_cache_dir=str(onnx_cache))
    assert exports == []
    write_checkpoint(copy, size="tiny", seed=7)  # new weights in the same place
    EmotionModel(str(copy), device="cpu", runtime="onnx", onnx_cache_dir=str(onnx_cache))
    assert exports == [str(copy)] and len(list(onnx_cache.glob("*.onnx"))) == 2
    # int8 quantises the cached fp32 export: nothing is exported again.
    int8 = EmotionModel(str(copy), device="cpu", runtime="onnx", onnx_cache_dir=str(onnx_cache), dtype="int8")
    assert exports == [str(copy)] and len(list(onnx_cache.glob("*-int8.onnx"))) == 1
    assert int8.precision == "int8" and not list(onnx_cache.glob(".*")), "no temporary file is left behind"


@pytest.fixture(scope="module")
def spread_model(tiny_model, tmp_path_factory):
    """The random checkpoint with its head's weights scaled up: the scores spread (a clear
    winner) instead of lying near 1/9 each, where any noise would flip the argmax."""
    import torch

    directory = shutil.copytree(tiny_model, tmp_path_factory.mktemp("spread") / "model")
    state = torch.load(directory / "model.pt", weights_only=True)
    state["proj.weight"] *= 30
    torch.save(state, directory / "model.pt")
    return directory


def test_export_onnx_command_int8(spread_model, torch_model, tmp_path, capsys):
    import onnxruntime as ort

    from emotion.tools.cli import main

    out = tmp_path / "spread-int8.onnx"
    assert main(["export-onnx", str(spread_model), str(out), "--int8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "int8" and report["opset"] == 18 and report["bytes"] == out.stat().st_size
    assert max(report["max_score_diff"]) <= 1e-4  # the fp32 graph, checked before quantising
    assert all(report["int8"]["argmax_agrees"]) and min(report["int8"]["embedding_cosine_to_float32"]) > 0.99
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # written atomically: no temporary file left

    from emotion.engine.loading import build_automodel

    reference = build_automodel(str(spread_model), "ms", torch_model.device)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for seed, seconds in enumerate((1.0, 4.0, 12.0, 30.0)):
        wave = speech_like(seconds, seed=seed)
        (scores,) = session.run(["scores"], {"waveform": wave[None]})
        fp32 = np.array(reference.generate(input=wave, disable_pbar=True)[0]["scores"])
        top, second = np.sort(fp32)[::-1][:2]
        assert top - second > 0.1, "the head must give a clear winner for this check to mean anything"
        assert np.argmax(scores[0]) == np.argmax(fp32) and np.abs(scores[0] - fp32).max() < 0.1


def test_runtime_and_dtype_settings_are_checked():
    with pytest.raises(ConfigError, match="EMOTION_RUNTIME=onnx runs on the CPU only"):
        Settings(runtime="onnx", device="cuda:0")
    with pytest.raises(ConfigError, match="EMOTION_DTYPE='int8': only with EMOTION_RUNTIME=onnx"):
        Settings(dtype="int8")
    with pytest.raises(ConfigError, match="EMOTION_DTYPE='float16': the onnx runtime runs"):
        Settings(runtime="onnx", dtype="float16")
    with pytest.raises(ConfigError, match="EMOTION_RUNTIME='tensorrt': expected one of auto, torch, onnx"):
        Settings.from_env({"EMOTION_RUNTIME": "tensorrt"})
    assert Settings.from_env({"EMOTION_RUNTIME": "onnx", "EMOTION_DTYPE": "int8"}).dtype == "int8"


@pytest.mark.model
def test_auto_runtime_is_onnx_on_cpu_where_installed_else_torch(monkeypatch):
    import importlib.util

    import torch

    from emotion.engine import onnx
    from emotion.engine.model import resolve_runtime

    cpu = torch.device("cpu")
    assert resolve_runtime("auto", cpu, "auto") == "onnx"
    assert resolve_runtime("auto", torch.device("cuda"), "auto") == "torch"
    assert resolve_runtime("auto", cpu, "bfloat16") == "torch"
    with pytest.raises(ConfigError, match="EMOTION_RUNTIME=onnx runs on the CPU only"):
        resolve_runtime("onnx", torch.device("cuda"), "auto")
    find_spec = importlib.util.find_spec
    for absent in ("onnxruntime", "onnx", "onnxscript"):  # .venv-sdk36: none of the extra; Rasa Pro: onnxruntime alone
        with monkeypatch.context() as m:
            m.setattr(importlib.util, "find_spec", lambda name, *a, absent=absent: None if name == absent else find_spec(name, *a))
            assert resolve_runtime("auto", cpu, "auto") == "torch"
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    with pytest.raises(ModelUnavailable, match=r'pip install "rasa-emotion2vec\[onnx\]"'):
        onnx.onnxruntime()
