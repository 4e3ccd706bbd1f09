"""What users install: the engine under `emotion`, never a top-level `actions`; a small public API."""

import ast
import re
import subprocess
import sys
import zipfile

from conftest import ROOT

import emotion


def test_public_api_is_exactly_this():
    assert sorted(emotion.__all__) == [
        "Decision", "EmotionEngine", "EmotionError", "EmotionResult", "EscalationRule", "Segment", "Settings", "Turn",
        "evaluate_rules", "load_rules",
    ]


def test_importing_the_engine_does_not_import_rasa_or_torch():
    code = "import sys, emotion; print(any(m.split('.')[0] in ('rasa_sdk', 'rasa', 'torch', 'funasr') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip() == "False"


def test_rules_and_results_import_light_for_the_rasa_pro_server():
    """The CALM command generator runs inside Rasa Pro, whose environment has no torch,
    soundfile or httpx of ours: rules and result checks must import without them."""
    code = ("import sys, emotion.rules, emotion.engine.results; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'funasr', 'soundfile', 'soxr', 'httpx', 'rasa_sdk'}))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip() == "[]"


def test_wheel_holds_the_engine_and_no_actions_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("rasa_emotion2vec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"emotion/rasa_actions.py", "emotion/tools/cli.py", "emotion/serving/ui/review.html", "emotion/engine/model.py"} <= set(names)
    assert not [n for n in names if "bench" in n], "the benchmark harness lives in bench/, outside the wheel"
    assert not [n for n in names if n.startswith(("actions/", "tests/", "examples/"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "emotion2vec-rasa = emotion.tools.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def _imports() -> dict[str, set[str]]:
    """Each module of emotion/ and the emotion modules it imports, function-level imports included."""
    graph = {}
    for path in (ROOT / "emotion").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[module] = found
    return {m: {i for i in found if i in graph and i != m} for m, found in graph.items()}


def test_the_layers_import_downwards_only_and_nothing_imports_in_a_cycle():
    graph = _imports()
    upward = sorted((m, i) for m, found in graph.items() if m.startswith("emotion.engine")
                    for i in found if i.startswith(("emotion.serving", "emotion.tools")))
    assert upward == []
    assert not [i for i in graph["emotion.tools.cli"] if i.startswith("emotion.serving")]

    def cycle_from(start, module, seen):
        for nxt in graph[module] - {"emotion"}:  # the package's lazy __getattr__ is no import
            if nxt == start:
                return [module, nxt]
            if nxt not in seen:
                seen.add(nxt)
                if found := cycle_from(start, nxt, seen):
                    return [module, *found]
        return None

    assert [c for m in graph if (c := cycle_from(m, m, set()))] == []


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), images included
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def test_readme_is_a_front_door_and_its_links_resolve():
    """The README stays short and sends readers to docs/; no relative link in it or the manual is dead."""
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert "](docs/" in text
    broken = []
    for page in [readme, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in _LINK.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
            path = target.split("#", 1)[0]
            if target.startswith(("http://", "https://", "mailto:")) or not path:
                continue
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
