"""``python -m emotion``: analyze (text, JSON, plots), make-checkpoint, and a small benchmark run."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, encode, free_port, speech_like

from emotion.settings import LABELS


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "emotion", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_main(capsys, *args):
    """The CLI in this process (no subprocess needed to test its outputs)."""
    code, out, _err = run_main_with_stderr(capsys, *args)
    return code, out


def run_main_with_stderr(capsys, *args):
    from emotion.tools.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    (d / "a.wav").write_bytes(encode(speech_like(2.0), 16000, "WAV", "PCM_16"))
    (d / "b.flac").write_bytes(encode(speech_like(3.5, 44100, seed=1), 44100, "FLAC"))
    (d / "c.mp3").write_bytes(encode(speech_like(1.2, 24000, seed=2), 24000, "MP3", "MPEG_LAYER_III"))
    (d / "bad.wav").write_bytes(b"RIFF not really")
    (d / "phone.ulaw").write_bytes(encode(speech_like(2.0, 8000), 8000, "RAW", "ULAW"))
    return d


def test_analyze_json_one_line_per_input_and_nonzero_exit_on_failure(files, models, capsys):
    model = models("angry90", angry=0.9)
    code, out = run_main(capsys, "analyze", files / "a.wav", files / "bad.wav", files / "b.flac", files / "c.mp3",
                         files / "missing.wav", "--model", model, "--json")
    assert code == 1
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["file"] for line in lines] == [str(files / n) for n in ("a.wav", "bad.wav", "b.flac", "c.mp3", "missing.wav")]
    for good in (lines[0], lines[2], lines[3]):
        assert good["emotion"] == "angry" and good["confidence"] == pytest.approx(0.9, abs=1e-5)
        assert set(good["scores"]) == set(LABELS)
    assert lines[1]["error"]["code"] == "decode_failed"
    assert lines[4]["error"]["code"] == "fetch_failed"


def test_analyze_text_output_and_success_exit(files, models, capfd):
    from emotion.tools.cli import main

    model = models("angry90", angry=0.9)
    capfd.readouterr()  # FunASR's notice on its first import in this process (the subprocess test below sees it held back)
    assert main(["analyze", str(files / "a.wav"), "--model", str(model)]) == 0
    out, err = capfd.readouterr()  # the file descriptors: what C code writes is caught too
    assert out.startswith(f"{files / 'a.wav'}: angry 0.90")
    assert err == ""


def test_json_output_is_one_line_and_the_model_libraries_say_nothing(files, models):
    """Through ``python -m emotion`` itself, its exit status the process's. FunASR prints an
    ffmpeg notice and its version on import and logs trust_remote_code on the root logger per
    load; none of it may reach stdout (the JSON) or stderr (our messages)."""
    proc = cli("analyze", files / "a.wav", "--model", models("angry90", angry=0.9), "--json")
    assert proc.returncode == 0
    assert proc.stderr == ""
    (line,) = proc.stdout.splitlines()
    assert json.loads(line)["emotion"] == "angry"


def test_a_model_that_fails_to_load_says_why_and_nothing_else(files, models, tmp_path, capsys):
    """Our error stays visible while FunASR's output during the load is held back."""
    import shutil

    broken = tmp_path / "no-weights"
    shutil.copytree(models("angry90", angry=0.9), broken)
    (broken / "model.pt").unlink()
    code, out, err = run_main_with_stderr(capsys, "analyze", files / "a.wav", "--model", broken)
    assert code == 2 and out == ""
    assert err == f"error [model_unavailable]: could not load model '{broken}': AssertionError: init_param does not exist\n"


def test_analyze_headerless_telephony(files, models, capsys):
    code, out = run_main(capsys, "analyze", files / "phone.ulaw", "--encoding", "mulaw", "--sample-rate", "8000",
                         "--model", models("angry90", angry=0.9), "--json")
    assert code == 0 and json.loads(out)["duration_s"] == pytest.approx(2.0, abs=0.01)


@pytest.mark.parametrize("granularity", ["frame", "segment"])
def test_analyze_granularity_and_plot(files, tiny_model, tmp_path, granularity, capsys):
    png = tmp_path / "timeline.png"
    code, text = run_main(capsys, "analyze", files / "b.flac", "--model", tiny_model, "--granularity", granularity, "--json", "--plot", png)
    assert code == 0
    out = json.loads(text)
    segments = out["segments"]
    if granularity == "frame":
        assert len(segments) == 174 and segments[1]["start_s"] == pytest.approx(0.02)
    else:
        assert [(s["start_s"], s["end_s"]) for s in segments] == [(0.0, 3.0), (1.5, 3.5)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_make_checkpoint_with_a_fixed_head(tmp_path, files, capsys):
    assert run_main(capsys, "make-checkpoint", tmp_path / "m", "--head", "sad=0.8")[0] == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.yaml", "model.pt", "tokens.txt"]
    out = json.loads(run_main(capsys, "analyze", files / "a.wav", "--model", tmp_path / "m", "--json")[1])
    assert out["emotion"] == "sad" and out["confidence"] == pytest.approx(0.8, abs=1e-5)


def test_bad_model_is_a_clear_error(files, tmp_path):
    proc = cli("analyze", files / "a.wav", "--model", tmp_path / "nothing")
    assert proc.returncode == 2 and "error [model_unavailable]: no model directory at" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_csv_and_npy_exports_match_the_json(files, models, tmp_path, capsys):
    import csv

    import numpy as np

    model = models("random")
    inputs = [files / "a.wav", files / "bad.wav", files / "b.flac"]
    code, out = run_main(capsys, "analyze", *inputs, "--model", model, "--json", "--embeddings",
                         "--csv", tmp_path / "out.csv", "--embeddings-out", tmp_path / "npy")
    assert code == 1
    lines = [json.loads(line) for line in out.splitlines()]
    rows = list(csv.DictReader((tmp_path / "out.csv").read_text(encoding="utf-8").splitlines()))
    assert [r["file"] for r in rows] == [str(p) for p in inputs]
    for line, row in zip(lines, rows):
        if "error" in line:
            assert row["error"] == f"[{line['error']['code']}] {line['error']['message']}" and row["emotion"] == ""
            continue
        assert row["emotion"] == line["emotion"] and float(row["confidence"]) == pytest.approx(line["confidence"], abs=1e-6)
        assert {k: float(row[k]) for k in LABELS} == pytest.approx(line["scores"], abs=1e-6)
        saved = np.load(tmp_path / "npy" / (Path(line["file"]).name + ".npy"))
        assert saved.shape == (32,) and np.abs(saved - np.array(line["embedding"])).max() < 1e-6
    assert sorted(p.name for p in (tmp_path / "npy").iterdir()) == ["a.wav.npy", "b.flac.npy"]


def test_csv_per_segment_and_frame_embeddings(files, models, tmp_path, capsys):
    import csv

    import numpy as np

    code, out = run_main(capsys, "analyze", files / "b.flac", "--model", models("random"), "--json", "--granularity", "segment",
                         "--csv", tmp_path / "seg.csv")
    assert code == 0
    segments = json.loads(out)["segments"]
    rows = list(csv.DictReader((tmp_path / "seg.csv").read_text(encoding="utf-8").splitlines()))
    assert [(float(r["start_s"]), float(r["end_s"]), r["emotion"]) for r in rows] == [
        (s["start_s"], s["end_s"], s["emotion"]) for s in segments]
    code, _ = run_main(capsys, "analyze", files / "a.wav", "--model", models("random"), "--granularity", "frame",
                       "--embeddings-out", tmp_path / "frames")
    assert code == 0 and np.load(tmp_path / "frames" / "a.wav.npy").shape == (99, 32)


def test_evaluate_gives_the_exact_confusion_matrix_of_a_hand_set_head(models, tmp_path, capsys):
    """Every clip scores angry 0.9 with this head, so the matrix is known exactly."""
    for i, name in enumerate(["a1", "a2", "a3", "s1", "s2", "h1"]):
        (tmp_path / f"{name}.wav").write_bytes(encode(speech_like(1.0, seed=i), 16000, "WAV", "PCM_16"))
    (tmp_path / "broken.wav").write_bytes(b"nope")
    (tmp_path / "labels.csv").write_text("file,label\na1.wav,ang\na2.wav,ang\na3.wav,ang\ns1.wav,sad\ns2.wav,sad\n"
                                         "h1.wav,hap\nbroken.wav,ang\na1.wav,xxx\n")
    code, out = run_main(capsys, "evaluate", tmp_path / "labels.csv", "--model", models("angry90", angry=0.9),
                         "--map", "angry=ang,happy=hap", "--json", "--plot", tmp_path / "cm.png")
    report = json.loads(out)
    assert code == 0
    assert report["labels"] == ["angry", "happy", "sad"]
    assert report["confusion_matrix"] == [[3, 0, 0], [1, 0, 0], [2, 0, 0]]
    assert report["accuracy"] == 0.5 and report["unweighted_average_recall"] == pytest.approx(1 / 3, abs=1e-4)
    assert report["per_class"]["angry"] == {"precision": 0.5, "recall": 1.0, "f1": 0.6667, "support": 3}
    assert report["failed"] == {"decode_failed": 1, "unknown_label": 1}
    broken, unknown = report["failed_files"]
    assert broken["message"].startswith("could not decode audio")
    assert broken == {"file": str(tmp_path / "broken.wav"), "line": 8, "code": "decode_failed", "message": broken["message"]}
    assert unknown == {"file": str(tmp_path / "a1.wav"), "line": 9, "code": "unknown_label",
                       "message": "label 'xxx' is not one of ours; map it with --map"}
    assert (tmp_path / "cm.png").stat().st_size > 1000
    code, text, err = run_main_with_stderr(capsys, "evaluate", tmp_path / "labels.csv", "--model", models("angry90", angry=0.9),
                                           "--map", "angry=ang,happy=hap")
    assert "accuracy: 0.5000   unweighted average recall: 0.3333" in text
    assert text.splitlines()[-3].split() == ["angry", "3", "0", "0"]
    assert "files scored: 6, failed: 2" in text
    assert err.splitlines() == [f"{tmp_path / 'broken.wav'}: error [decode_failed] {broken['message']}",
                                f"{tmp_path / 'a1.wav'}: error [unknown_label] label 'xxx' is not one of ours; map it with --map"]


CALIBRATED_RULES = ("rules:\n  - name: angry_caller\n    emotions: [angry]\n    min_confidence: 0.7\n    cooldown_turns: 10\n"
                    "  - name: sad_watch\n    emotions: sad\n    min_confidence: 0.5\n    action: alert\n")


def test_calibrate_finds_the_thresholds_of_scores_known_exactly(models, tmp_path, capsys):
    """Each group of files is scored by its own hand-set head (``analyze --csv``), so every
    score, and so every figure, is known: angry 0.9 on 4 angry turns and 1 neutral, angry 0.6
    on 2 angry and 2 neutral, sad 0.7 on 3 sad and 1 neutral."""
    from emotion.rules import load_rules

    groups = {models("angry90", angry=0.9): ["ang"] * 4 + ["neu", "broken"], models("angry60", angry=0.6): ["ang", "ang", "neu", "neu"],
              models("sad70", sad=0.7): ["sad", "sad", "sad", "neu"]}
    rows, csvs = ["file,label"], []
    for g, (model, labels) in enumerate(groups.items()):
        names = [f"{g}-{i}.wav" for i in range(len(labels))]
        for i, (name, label) in enumerate(zip(names, labels)):
            (tmp_path / name).write_bytes(b"nope" if label == "broken" else encode(speech_like(1.0, seed=10 * g + i), 16000, "WAV", "PCM_16"))
            rows.append(f"{name},{'ang' if label == 'broken' else label}")
        csvs.append(tmp_path / f"scores-{g}.csv")
        run_main(capsys, "analyze", *[tmp_path / n for n in names], "--model", model, "--csv", csvs[-1])
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "rules.yml").write_text(CALIBRATED_RULES)
    common = [tmp_path / "labels.csv", "--rules", tmp_path / "rules.yml", "--map", "angry=ang,neutral=neu"]

    code, out = run_main(capsys, "calibrate", *common, "--scores", *csvs, "--precision", "0.75", "--min-positives", "4", "--json",
                         "--plot", tmp_path / "pr.png", "--suggest-rules", tmp_path / "suggested.yml")
    report = json.loads(out)
    assert code == 0
    assert (report["turns"], report["labelled"], report["failed"]) == (13, {"angry": 6, "neutral": 4, "sad": 3}, {"decode_failed": 1})
    angry, sad = report["targets"]
    # angry: 9 turns flagged up to 0.60 (6 angry), 5 from 0.61 to 0.90 (4 angry), none above.
    curve = {p["threshold"]: (p["flagged"], p["true_positives"], p["precision"], p["recall"]) for p in angry["curve"]}
    assert curve[0.0] == curve[0.6] == (9, 6, 0.6667, 1.0)
    assert curve[0.61] == curve[0.9] == (5, 4, 0.8, 0.6667)
    assert curve[0.91] == curve[1.0] == (0, 0, None, 0.0)
    assert angry["rules"] == [{"name": "angry_caller", "threshold": 0.7, "precision": 0.8, "recall": 0.6667, "flagged": 5,
                               "true_positives": 4, "escalations_per_1000": 384.6}]
    assert {k: angry[k] for k in ("positives", "threshold", "precision", "recall", "escalations_per_1000", "reliable", "recommended")} == {
        "positives": 6, "threshold": 0.61, "precision": 0.8, "recall": 0.6667, "escalations_per_1000": 384.6, "reliable": True,
        "recommended": 0.61}
    # sad: 3 of the 4 turns it flags are sad, precision 0.75 from 0.00 on; 3 labelled turns, fewer than 4.
    assert (sad["positives"], sad["threshold"], sad["precision"], sad["reliable"], sad["recommended"]) == (3, 0.0, 0.75, False, None)
    assert sad["note"] == "0.00 is unreliable, not recommended: measured on 3 labelled sad turns of 13, fewer than 4"

    suggested = load_rules(tmp_path / "suggested.yml")
    assert [(r.name, r.min_confidence, r.cooldown_turns, r.action) for r in suggested] == [
        ("angry_caller", 0.61, 10, "handoff"), ("sad_watch", 0.5, 0, "alert")]
    text = (tmp_path / "suggested.yml").read_text()
    assert "# angry: 0.61 (was 0.7): the lowest threshold with precision >= 0.75 on 6 labelled angry turns of 13:" in text
    assert "# sad: kept at 0.5: 0.00 is unreliable, not recommended" in text
    assert (tmp_path / "pr.png").read_bytes()[:4] == b"\x89PNG"

    code, text = run_main(capsys, "calibrate", *common, "--scores", *csvs, "--precision", "0.75", "--min-positives", "4")
    lines = text.splitlines()
    assert lines[0] == ("calibrated on 13 labelled turns (failed: 1); target precision 0.75; a threshold is recommended only "
                        "from at least 4 labelled turns of its emotion")
    assert lines[2:5] == [
        "angry: 6 labelled angry turns of 13",
        "  now      angry_caller 0.70: precision 0.8000 (4 of 5 flagged), recall 0.6667 (of 6 angry), 384.6 escalations per 1,000 turns",
        "  lowest reaching precision 0.75: 0.61: precision 0.8000 (4 of 5 flagged), recall 0.6667 (of 6 angry), 384.6 escalations "
        "per 1,000 turns (recommended)"]
    assert [line.split() for line in lines[7:10]] == [["0.00-0.60", "0.6667", "1.0000", "9"], ["0.61-0.90", "0.8000", "0.6667", "5"],
                                                       ["0.91-1.00", "-", "0.0000", "0"]]
    assert "UNRELIABLE, not recommended" in text

    # Through the model, as most runs go: the angry-0.9 head on every file reaches no target.
    code, out = run_main(capsys, "calibrate", *common, "--model", models("angry90", angry=0.9), "--json")
    report = json.loads(out)
    assert (code, report["turns"], report["test_checkpoint"], report["target_precision"], report["min_positives"]) == (0, 13, True, 0.9, 30)
    angry, sad = report["targets"]
    assert angry["rules"][0] | {"name": None} == {"name": None, "threshold": 0.7, "precision": 0.4615, "recall": 1.0, "flagged": 13,
                                                  "true_positives": 6, "escalations_per_1000": 1000.0}
    assert (angry["threshold"], angry["recommended"]) == (None, None)
    assert angry["note"] == "no threshold reaches precision 0.9 on 6 labelled angry turns of 13 (the best is 0.4615, at 0.00)"
    assert sad["note"] == "no threshold reaches precision 0.9 on 3 labelled sad turns of 13 (no turn is flagged)"


def test_send_turn_to_servers_that_are_not_there_or_not_rasa(files, http_server, capsys):
    """A wrong address or port is an error line and exit 2, not a traceback."""
    from emotion.tools.cli import main

    closed = f"http://127.0.0.1:{free_port()}"
    http_server.routes["/v1/analyze"] = (502, {"Content-Type": "text/html"}, b"<html>bad gateway</html>")
    for args, said in [
        (["--api", closed + "/v1/analyze"], "error [fetch_failed]: cannot reach http://127.0.0.1:"),
        (["--api", http_server.url + "/v1/analyze"], "error [fetch_failed]: the analysis API answered HTTP 502, not JSON"),
        (["--via", "metadata", "--rasa", closed], "error [fetch_failed]: cannot reach http://127.0.0.1:"),
        (["--via", "metadata", "--rasa", http_server.url], "/webhooks/rest/webhook answered HTTP 404"),
    ]:
        assert main(["send-turn", str(files / "a.wav"), *args]) == 2
        assert said in capsys.readouterr().err


def _audio_tree(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        fmt = {".wav": ("WAV", "PCM_16"), ".mp3": ("MP3", "MPEG_LAYER_III"), ".flac": ("FLAC", None)}[Path(name).suffix.lower()]
        (root / name).write_bytes(encode(speech_like(1.0, seed=i), 16000, *fmt))


def test_analyze_a_folder_takes_the_audio_files_under_it(files, models, tmp_path, capsys):
    calls = tmp_path / "calls"
    _audio_tree(calls, ["b.wav", "a/2.flac", "a/10.MP3", "z/deep/x.wav", ".hidden/y.wav", "._b.wav"])
    (calls / "notes.txt").write_text("not audio")
    (calls / "a" / "phone.ulaw").write_bytes((files / "phone.ulaw").read_bytes())  # headerless: named one by one
    code, out = run_main(capsys, "analyze", calls, files / "a.wav", "--model", models("angry90", angry=0.9), "--json")
    assert code == 0
    assert [json.loads(line)["file"] for line in out.splitlines()] == [
        str(calls / "a" / "10.MP3"), str(calls / "a" / "2.flac"), str(calls / "b.wav"), str(calls / "z" / "deep" / "x.wav"),
        str(files / "a.wav")]

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    code, out, err = run_main_with_stderr(capsys, "analyze", tmp_path / "empty", files / "a.wav", "--model", tmp_path / "unused")
    assert code == 2 and out == ""
    assert err.startswith(f"error [fetch_failed]: {tmp_path / 'empty'}: no audio files under this folder (looked for .wav, .flac")


def test_embeddings_out_keeps_each_file_apart(models, tmp_path, capsys, monkeypatch):
    """Same stem, other suffix; same name, other folder: each its own .npy, named predictably."""
    import numpy as np

    calls = tmp_path / "calls"
    _audio_tree(calls, ["angry.wav", "angry.mp3", "a/call.wav", "b/call.wav"])
    model = models("random")
    code, out = run_main(capsys, "analyze", calls, "--model", model, "--json", "--embeddings", "--embeddings-out", tmp_path / "npy")
    assert code == 0
    written = sorted(p.relative_to(tmp_path / "npy").as_posix() for p in (tmp_path / "npy").rglob("*.npy"))
    assert written == ["a/call.wav.npy", "angry.mp3.npy", "angry.wav.npy", "b/call.wav.npy"]
    for line in map(json.loads, out.splitlines()):
        saved = np.load(tmp_path / "npy" / (Path(line["file"]).relative_to(calls).as_posix() + ".npy"))
        assert np.abs(saved - np.array(line["embedding"])).max() < 1e-6

    # Files named one by one keep the relative path given; two that would share a name are
    # refused before the model loads.
    monkeypatch.chdir(calls)
    code, _ = run_main(capsys, "analyze", "a/call.wav", "./b/call.wav", "--model", model, "--embeddings-out", tmp_path / "rel")
    assert code == 0
    assert sorted(p.relative_to(tmp_path / "rel").as_posix() for p in (tmp_path / "rel").rglob("*.npy")) == [
        "a/call.wav.npy", "b/call.wav.npy"]
    code, out, err = run_main_with_stderr(capsys, "analyze", calls / "a" / "call.wav", calls / "b" / "call.wav",
                                          "--model", tmp_path / "unused", "--embeddings-out", tmp_path / "clash")
    assert code == 2 and out == "" and not (tmp_path / "clash").exists()
    assert err.startswith(f"error [bad_config]: --embeddings-out: {calls / 'a' / 'call.wav'} and {calls / 'b' / 'call.wav'} "
                          f"would both be written to {tmp_path / 'clash' / 'call.wav.npy'}")


class _Terminal(io.StringIO):
    """stdout or stderr as a terminal, recording each write in order with the other stream's."""

    def __init__(self, name: str, log: list) -> None:
        super().__init__()
        self.name, self.log = name, log

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.append((self.name, text))
        return super().write(text)


def test_progress_bar_says_it_is_loading_and_moves_file_by_file(files, models, monkeypatch):
    from emotion.engine.core import EmotionEngine
    from emotion.tools.cli import main

    log: list = []
    analyze_waves = EmotionEngine.analyze_waves

    def spy(self, waves, **kwargs):
        log.append(("analyse", len(waves)))
        return analyze_waves(self, waves, **kwargs)

    monkeypatch.setattr(EmotionEngine, "analyze_waves", spy)
    monkeypatch.setenv("TQDM_MININTERVAL", "0")  # draw every update, however fast
    monkeypatch.setattr(sys, "stdout", _Terminal("out", log))
    monkeypatch.setattr(sys, "stderr", _Terminal("err", log))
    inputs = [files / "a.wav", files / "b.flac", files / "c.mp3"]
    assert main(["analyze", *map(str, inputs), "--model", str(models("angry90", angry=0.9)), "--json"]) == 0

    analysed = [i for i, (kind, _) in enumerate(log) if kind == "analyse"]
    assert [log[i][1] for i in analysed] == [1, 1, 1]  # on CPU, one file at a time
    assert any(kind == "err" and "loading model angry90…" in text for kind, text in log[: analysed[0]])
    bounds = [*analysed, len(log)]
    for n, (start, end) in enumerate(zip(bounds, bounds[1:]), 1):
        between = log[start:end]
        # After each file: the bar counts it, then its line is printed above the bar.
        assert any(kind == "err" and "analysing:" in text and f"{n}/3" in text for kind, text in between)
        lines = [text for kind, text in between if kind == "out" and text.strip()]
        assert [json.loads(text)["file"] for text in lines] == [str(inputs[n - 1])]
    out = "".join(text for kind, text in log if kind == "out")
    assert "\r" not in out and len(out.splitlines()) == 3


@pytest.mark.parametrize("command, defaults", [
    ("analyze", ["(default: utterance)", "(default: 0.7)", "(default: EMOTION_MODEL, else iic/emotion2vec_plus_large)",
                 "(default: EMOTION_DEVICE, else auto)", "(default: the mix)"]),
    ("evaluate", ["(default: EMOTION_MODEL, else iic/emotion2vec_plus_large)", "(default: EMOTION_DTYPE, else auto)"]),
    ("calibrate", ["(default: 0.9)", "(default: 30)", "(default: EMOTION_RULES, else the default rules)"]),
    ("send-turn", ["(default: http://localhost:5005)", "(default: caller-1)", "(default: api)",
                   "(default: http://localhost:5055/v1/analyze)"]),
    ("make-checkpoint", ["(default: tiny)", "(default: 0)", "(default: random)"]),
])
def test_help_shows_the_defaults(command, defaults, capsys):
    from emotion.tools.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # as wrapped for any terminal width
    assert [d for d in defaults if d not in text] == []
    assert "(default: None)" not in text and "(default: False)" not in text
