"""The ONNX export and runtime: the file alone (onnxruntime, no project code) matches FunASR's
generate(); the engine's onnx runtime matches its torch one; the export cache; the settings;
the export-onnx command."""

import asyncio
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import loaded, speech_like

from emotion.errors import ConfigError, ModelUnavailable
from emotion.settings import Settings

# 1 s; the longest clip the engine runs with the default window (30 s, its last window taking
# a tail under 15 s); lengths that are no multiple of the conv stride (320 samples). The
# export itself checks the shortest clip the graph takes.
LENGTHS = (16_000, 45 * 16_000 - 1, 2 * 16_000 + 4321, 7919)

pytestmark = pytest.mark.onnx


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def apart():
    """What onnx_model's load ran in a process of its own."""
    return []


@pytest.fixture(scope="module")
def onnx_model(tiny_model, onnx_cache, apart):
    from emotion.engine import onnx
    from emotion.engine.model import EmotionModel

    run_apart = onnx._apart

    def recorded(fn, *args, **kwargs):
        apart.append(fn.__name__)
        return run_apart(fn, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(onnx, "_apart", recorded)
        return EmotionModel(str(tiny_model), device="cpu", runtime="onnx", onnx_cache_dir=str(onnx_cache))


def _in_process(monkeypatch):
    """Exports made here, not in a child process: a test's stand-in for export_onnx cannot be
    sent to one."""
    from emotion.engine import onnx

    monkeypatch.setattr(onnx, "_apart", lambda fn, *args, **kwargs: fn(*args, **kwargs))


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


def test_the_export_runs_in_a_process_of_its_own_and_says_why_it_failed(onnx_model, apart, tmp_path):
    """The exporter keeps hold of the weights it traced: the serving process never runs it."""
    from emotion.engine import onnx

    assert apart == ["export_onnx"]
    with pytest.raises(ModelUnavailable, match=r"^no model directory at /nonexistent/model$"):
        onnx._apart(onnx.export_onnx, "/nonexistent/model", str(tmp_path / "model.onnx"))


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
    _in_process(monkeypatch)
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


def test_the_cache_key_is_made_of_the_weights_funasr_loaded(tiny_model, tmp_path):
    """config.yaml may name other weights than model.pt (FunASR's init_param): those are hashed."""
    import torch

    from emotion.engine import onnx
    from emotion.engine.loading import build_automodel
    from emotion.tools.checkpoint import write_checkpoint

    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    (copy / "model.pt").rename(copy / "weights.pt")
    with open(copy / "config.yaml", "a", encoding="utf-8") as f:
        f.write(f"init_param: {copy / 'weights.pt'}\n")
    before = onnx.cache_paths(build_automodel(str(copy), "ms", torch.device("cpu")), tmp_path)
    shutil.copy(write_checkpoint(tmp_path / "other", size="tiny", seed=7) / "model.pt", copy / "weights.pt")
    after = onnx.cache_paths(build_automodel(str(copy), "ms", torch.device("cpu")), tmp_path)
    assert before["float32"] != after["float32"] and before["int8"] != after["int8"]


@pytest.mark.parametrize("damage", ["not_onnx", "other_labels", "made_afresh_unusable"])
def test_a_damaged_cached_export_is_made_afresh_once(tiny_model, onnx_model, tmp_path, monkeypatch, caplog, damage):
    """A torn write, a file from elsewhere: exported again, not a model that never loads.
    The export is replaced by a copy of the one made already, or by another damaged file."""
    import onnx as onnx_lib
    import torch

    from emotion.engine import onnx
    from emotion.engine.loading import build_automodel
    from emotion.engine.model import EmotionModel

    made = onnx_model._onnx.path
    cache = tmp_path / "cache"
    cache.mkdir()
    path = onnx.cache_paths(build_automodel(str(tiny_model), "ms", torch.device("cpu")), cache)["float32"]
    if damage == "other_labels":
        proto = onnx_lib.load(str(made))
        next(p for p in proto.metadata_props if p.key == "labels").value = json.dumps(["生气/angry", "开心/happy"])
        onnx_lib.save(proto, str(path))
    else:
        path.write_bytes(b"not an ONNX file")
    exported = []

    def export(model, out, **_):
        exported.append(model)
        if damage == "made_afresh_unusable":
            Path(out).write_bytes(b"not an ONNX file")
        else:
            shutil.copy(made, out)

    _in_process(monkeypatch)
    monkeypatch.setattr(onnx, "export_onnx", export)
    if damage == "made_afresh_unusable":
        with pytest.raises(ModelUnavailable, match=r"the ONNX export .*-float32\.onnx, made just now, is unusable: InvalidProtobuf"):
            EmotionModel(str(tiny_model), device="cpu", runtime="onnx", onnx_cache_dir=str(cache))
    else:
        model = EmotionModel(str(tiny_model), device="cpu", runtime="onnx", onnx_cache_dir=str(cache))
        wave = speech_like(2.0)
        assert np.abs(model.forward([wave])[0].probs - onnx_model.forward([wave])[0].probs).max() <= 1e-6
    assert exported == [str(tiny_model)] and "is unusable" in caplog.text


@pytest.mark.parametrize("trouble", ["unwritable_cache", "unforeseen"])
def test_a_model_that_fails_to_load_says_why_in_the_status(tiny_model, tmp_path, monkeypatch, trouble):
    from emotion.engine import onnx
    from emotion.engine.core import EmotionEngine

    (tmp_path / "a-file").write_text("")
    cache = tmp_path / "a-file" / "onnx"  # unwritable for root too
    reason = rf"EMOTION_ONNX_CACHE_DIR={re.escape(str(cache))}: cannot write the ONNX export {re.escape(str(cache))}/" \
             r"emotion2vec-\w+-float32\.onnx: .*Not a directory"
    if trouble == "unforeseen":  # an error no boundary translates, as a bug would raise

        def load_cached(*_args, **_options):
            raise RuntimeError("something unforeseen\nand its second line")

        monkeypatch.setattr(onnx, "load_cached", load_cached)
        reason = r"could not load the model: RuntimeError: something unforeseen$"
    engine = EmotionEngine(Settings(model=str(tiny_model), device="cpu", runtime="onnx", onnx_cache_dir=str(cache)))
    with pytest.raises(ModelUnavailable, match=reason):
        engine.backend.load()
    status = asyncio.run(engine.status())
    assert not status["ready"] and re.match(reason, status["error"])


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
    assert report["precision"] == "int8" and report["opset"] == 20 and report["bytes"] == out.stat().st_size
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


def test_export_onnx_command_refuses_a_checkpoint_that_does_not_fit_its_config(tmp_path, capsys):
    """FunASR would keep random weights for the tensors that do not fit, and the export would
    check those against themselves."""
    import torch

    from emotion.tools.checkpoint import write_checkpoint
    from emotion.tools.cli import main

    model = write_checkpoint(tmp_path / "model")
    state = torch.load(model / "model.pt")
    state["proj.weight"] = torch.zeros(9, 16)  # wrong width
    torch.save(state, model / "model.pt")
    assert main(["export-onnx", str(model), str(tmp_path / "out.onnx")]) == 2
    assert "checkpoint does not match its config.yaml: proj.weight" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


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
    with pytest.raises(ModelUnavailable, match=r'onnxruntime, which cannot be imported \(import of onnxruntime halted.*\): '
                                               r'pip install "rasa-emotion2vec\[onnx\]"'):
        onnx.onnxruntime()
