"""What users install: the engine under `emotion`, never a top-level `actions`; a small public API."""

import subprocess
import sys
import zipfile

from conftest import ROOT

import emotion


def test_public_api_is_exactly_this():
    assert sorted(emotion.__all__) == [
        "Decision", "EmotionEngine", "EmotionError", "EmotionResult", "EngineConfig", "EscalationRule", "Segment", "Turn",
        "evaluate_rules", "load_rules",
    ]


def test_importing_the_engine_does_not_import_rasa_or_torch():
    code = "import sys, emotion; print(any(m.split('.')[0] in ('rasa_sdk', 'rasa', 'torch', 'funasr') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip() == "False"


def test_rules_and_results_import_light_for_the_rasa_pro_server():
    """The CALM command generator runs inside Rasa Pro, whose environment has no torch,
    soundfile or httpx of ours: rules and result checks must import without them."""
    code = ("import sys, emotion.rules, emotion.windows; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'funasr', 'soundfile', 'soxr', 'httpx', 'rasa_sdk'}))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip() == "[]"


def test_wheel_holds_the_engine_and_no_actions_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("rasa_emotion2vec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "emotion/rasa_actions.py" in names and "emotion/cli.py" in names and "emotion/ui/review.html" in names
    assert not [n for n in names if n.startswith(("actions/", "tests/", "examples/"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "emotion2vec-rasa = emotion.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
