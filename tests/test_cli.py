"""``python -m emotion``: analyze (text, JSON, plots), make-checkpoint, and a small benchmark run."""

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
    from emotion.tools.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().out


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


def test_analyze_text_output_and_success_exit(files, models):
    """Through ``python -m emotion`` itself: its exit status is the process's."""
    proc = cli("analyze", files / "a.wav", "--model", models("angry90", angry=0.9))
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"{files / 'a.wav'}: angry 0.90")


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
        saved = np.load(tmp_path / "npy" / (Path(line["file"]).stem + ".npy"))
        assert saved.shape == (32,) and np.abs(saved - np.array(line["embedding"])).max() < 1e-6
    assert not (tmp_path / "npy" / "bad.npy").exists()


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
    assert code == 0 and np.load(tmp_path / "frames" / "a.npy").shape == (99, 32)


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
    assert (tmp_path / "cm.png").stat().st_size > 1000
    code, text = run_main(capsys, "evaluate", tmp_path / "labels.csv", "--model", models("angry90", angry=0.9),
                          "--map", "angry=ang,happy=hap")
    assert "accuracy: 0.5000   unweighted average recall: 0.3333" in text
    assert text.splitlines()[-3].split() == ["angry", "3", "0", "0"]


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
