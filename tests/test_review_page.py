"""The review page (/ui) in a real headless Chromium against the real action server."""

import csv
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TOKEN, encode, speech_like, wav_bytes

from emotion.rules import Turn, evaluate_rules, load_rules

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Waits take functions, not expressions: polling an expression evals it, which the page's CSP
# refuses.
# Chromium's own background traffic would be refused by a closed network; keep it quiet.
# Autoplay: the test starts playback with a key press, which headless Chromium does not
# count as the user's gesture.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic", "--autoplay-policy=no-user-gesture-required"]
ANGRY = "#d62728"  # the page's (and the plots') colour of angry


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(locked_server):
    """The angry-0.9 model, the default rule (angry_caller at 0.7, cooldown 10 turns), the
    API behind a token."""
    return locked_server


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory, request):
    """Where the screenshots go, kept after the run: $REVIEW_SCREENSHOTS, else a temporary folder."""
    folder = Path(os.environ.get("REVIEW_SCREENSHOTS") or tmp_path_factory.mktemp("review-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nreview page screenshots: {folder}")


@pytest.fixture(scope="module")
def stereo_call(tmp_path_factory) -> Path:
    """20 s, a different voice on each channel, 8 kHz: under locked_server's 1 MiB of uploads."""
    audio = np.stack([speech_like(20.0, 8000, seed=1), speech_like(20.0, 8000, seed=2)], axis=1)
    path = tmp_path_factory.mktemp("calls") / "call.wav"
    path.write_bytes(encode(audio, 8000, "WAV", "PCM_16"))
    return path


def _open(browser, server, width=1280):
    page = browser.new_page(viewport={"width": width, "height": 900}, accept_downloads=True)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/ui")
    page.fill("#token", TOKEN)
    page.dispatch_event("#token", "change")
    return page, errors


def _upload(page, path):
    with page.expect_response("**/v1/analyze") as answer:
        page.set_input_files("#file", str(path))
    page.wait_for_selector("#result:not([hidden])", timeout=30_000)
    return answer.value.json()


def _js(page, expression):
    return page.evaluate(expression)


def _as_the_action_decides(segments, rules):
    """Where the rules fire, each segment a turn, written out here as the analyze action runs:
    the history it keeps (20 turns, rounded as the slot keeps them), evaluate_rules on it."""
    history, fired = [], []
    for i, s in enumerate(segments):
        history.append(Turn(s["emotion"], s["confidence"]))
        decision = evaluate_rules(history, rules)
        if decision.fired:
            history[-1] = Turn(s["emotion"], s["confidence"], decision.rule)
            fired.append((i, decision.rule))
        history = [Turn.from_dict(t.as_dict()) for t in history[-20:]]
    return fired


def test_review_a_call_listen_seek_switch_and_export(browser, server, stereo_call, screenshots):
    page, errors = _open(browser, server)
    page.wait_for_function("() => document.getElementById('model').textContent.includes('angry90')")
    assert page.inner_text("#model").startswith("Model: ") and " on cpu (float32)" in page.inner_text("#model")
    assert page.is_visible("#model-warning") and "random-weight test checkpoint" in page.inner_text("#model-warning")

    body = _upload(page, stereo_call)
    assert page.inner_text("#label") == "angry" and page.inner_text("#confidence") == "confidence 0.90"
    assert page.locator("#scores tr").count() == 9 and page.locator("#timeline polyline.series").count() == 9
    # 3 s segments every 1.5 s over 20 s, the first and last values held out to the edges.
    assert len(body["segments"]) == 13
    assert len(page.get_attribute('#timeline polyline[data-label="angry"]', "points").split()) == 13 + 2
    assert page.locator("#timeline text.ytick").all_text_contents() == ["0", "0.25", "0.5", "0.75", "1"]
    assert page.locator("#timeline text.xtick").all_text_contents() == [f"0:{t:02d}" for t in range(0, 21, 2)]
    assert page.locator("#timeline text.axis-title").all_text_contents() == ["score", "time (m:ss)"]
    threshold = page.locator("#timeline line.threshold")
    assert threshold.count() == 1 and threshold.get_attribute("stroke") == ANGRY
    assert _labels(page, "threshold-label") == ["angry_caller 0.70"]
    assert _labels(page, "track-label") == ["angry_caller"]
    legend = page.locator("#legend li").all_inner_texts()
    assert legend[:9] == list(body["scores"]) and len(legend) == 11
    assert legend[9] == "angry_caller: angry ≥ 0.70; not again within 10 turns → hands the caller off."

    # The marks are the server's rule_hits, which are the analyze action's own decisions:
    # angry 0.9 on every segment fires at the first, then the cooldown holds 10 turns.
    fired = _as_the_action_decides(body["segments"], load_rules(None))
    assert fired == [(0, "angry_caller"), (11, "angry_caller")]
    assert [(h["segment"], h["rule"]) for h in body["rule_hits"]] == fired
    g = {k: float(v) for k, v in _js(page, "({...document.getElementById('timeline').dataset})").items() if k in ("x0", "x1", "duration")}
    marks = page.locator("#timeline rect.hit")
    assert marks.count() == 2
    for i, (segment, _rule) in enumerate(fired):
        mark, window = marks.nth(i), body["segments"][segment]
        assert int(mark.get_attribute("data-segment")) == segment and mark.get_attribute("fill") == ANGRY
        assert (float(mark.get_attribute("data-start")), float(mark.get_attribute("data-end"))) == (window["start_s"], window["end_s"])
        middle = float(mark.get_attribute("x")) + float(mark.get_attribute("width")) / 2
        assert window["start_s"] <= (middle - g["x0"]) / (g["x1"] - g["x0"]) * g["duration"] <= window["end_s"]
    assert page.locator("#hits button").all_inner_texts() == ["0:00.0–0:03.0 angry_caller (handoff)",
                                                             "0:16.5–0:19.5 angry_caller (handoff)"]

    def cursor():
        return float(_js(page, "document.getElementById('timeline').dataset.cursorX"))

    def position():
        return _js(page, "document.getElementById('player').currentTime")

    def x_of(t):
        return g["x0"] + (g["x1"] - g["x0"]) * t / g["duration"]

    # Playback moves the cursor; space on the timeline plays and pauses.
    page.focus("#timeline")
    page.keyboard.press(" ")
    page.wait_for_function("() => document.getElementById('player').currentTime > 0.6", timeout=10_000)
    page.keyboard.press(" ")
    assert _js(page, "document.getElementById('player').paused")
    page.wait_for_timeout(100)  # the pause's own timeupdate
    assert cursor() > g["x0"] + 1 and cursor() == pytest.approx(x_of(position()), abs=2.0)
    # A click seeks there; so do the keys, and the hit list.
    box = page.locator("#timeline").bounding_box()
    page.mouse.click(box["x"] + x_of(5.0), box["y"] + 60)
    page.wait_for_function("() => Math.abs(document.getElementById('player').currentTime - 5) < 0.1")
    assert cursor() == pytest.approx(x_of(5.0), abs=1.0)
    page.keyboard.press("ArrowRight")
    assert position() == pytest.approx(6.0, abs=0.05)
    page.keyboard.press("End")
    assert position() == pytest.approx(20.0, abs=0.05)
    assert page.get_attribute("#timeline", "aria-valuetext") == "0:20 of 0:20"
    page.click("#hits li:nth-child(2) button")
    assert position() == pytest.approx(16.5, abs=0.05) and cursor() == pytest.approx(x_of(16.5), abs=1.0)

    page.screenshot(path=str(screenshots / "review-1280.png"), full_page=True)
    page.set_viewport_size({"width": 400, "height": 900})
    page.wait_for_function("() => document.getElementById('timeline').getAttribute('width') < 400")
    assert _js(page, "document.documentElement.scrollWidth") <= 400  # nothing wider than the screen
    _assert_labels_fit(page)
    page.screenshot(path=str(screenshots / "review-400.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})

    # Another mode or channel asks again for the file in hand: no new upload.
    assert page.locator("#channel option").all_inner_texts() == ["mix of all", "0 (left)", "1 (right)"]
    # What the page sends, as its forms hold it (the request's body is a blob Playwright does not show).
    _js(page, """() => { const fetch = window.fetch; window.sent = [];
      window.fetch = (url, init) => { if (init && init.body instanceof FormData) window.sent.push(Object.fromEntries(
        [...init.body.entries()].map(([k, v]) => [k, typeof v === "string" ? v : `${v.name} ${v.size}`]))); return fetch(url, init); }; }""")
    with page.expect_response("**/v1/analyze") as answer:
        page.select_option("#granularity", "frame")
    frames = answer.value.json()
    page.wait_for_function("() => document.querySelector('#timeline polyline.series').getAttribute('points').split(' ').length > 100")
    assert frames["granularity"] == "frame" and len(frames["segments"]) == 999
    assert [(h["segment"], h["rule"]) for h in frames["rule_hits"]] == _as_the_action_decides(frames["segments"], load_rules(None))
    with page.expect_response("**/v1/analyze"):
        page.select_option("#channel", "1")
    page.wait_for_function("() => !document.getElementById('status').textContent")
    upload = f"call.wav {stereo_call.stat().st_size}"  # the file in memory, sent again
    assert _js(page, "window.sent") == [{"audio_file": upload, "granularity": "frame", "channel": "mix", "rule_hits": "true"},
                                        {"audio_file": upload, "granularity": "frame", "channel": "1", "rule_hits": "true"}]

    # The CSV is what is shown: each frame of channel 1, and where a rule fired.
    with page.expect_download() as download:
        page.click("#csv")
    assert download.value.suggested_filename == "call-frame-1.csv"
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert len(rows) == 999 and rows[0]["channel"] == "1" and float(rows[0]["angry"]) == pytest.approx(0.9)
    assert [i for i, row in enumerate(rows) if row["rule_fired"]] == [h["segment"] for h in frames["rule_hits"]]
    assert errors == []


def _labels(page, kind):
    """The texts of the timeline's labels of this class, as drawn (not their tooltips)."""
    return _js(page, f"[...document.querySelectorAll('#timeline text.{kind}')].map((t) => t.lastChild.textContent)")


def _assert_labels_fit(page):
    """Every label of the timeline inside the drawing, and no two threshold labels overlapping."""
    boxes = _js(page, """() => {
      const svg = document.getElementById('timeline'), width = Number(svg.getAttribute('width')), s = svg.getBoundingClientRect();
      return {width, labels: [...svg.querySelectorAll('text')].map((t) => {
        const b = t.getBoundingClientRect();  // as drawn, turned or not
        return {text: t.lastChild.textContent, cls: t.getAttribute('class'), x: b.left - s.left, y: b.top - s.top, w: b.width, h: b.height}; })};
    }""")
    for label in boxes["labels"]:
        assert label["x"] >= 0 and label["x"] + label["w"] <= boxes["width"] + 0.5, label
    tags = sorted((b for b in boxes["labels"] if b["cls"] == "threshold-label"), key=lambda b: b["y"])
    for above, below in zip(tags, tags[1:]):
        assert above["y"] + above["h"] <= below["y"] + 0.5, (above, below)
    return tags


# Close thresholds and a long name: the labels must neither overlap nor run off the edge.
RULES_TO_DRAW = """rules:
  - {name: angry_caller, emotions: [angry], min_confidence: 0.7, cooldown_turns: 10}
  - {name: angry_streak, emotions: [angry], min_confidence: 0.72, consecutive_turns: 3}
  - {name: a_rather_long_rule_name_about_refunds, emotions: [angry, disgusted], min_confidence: 0.71, text_contains: [refund]}
  - {name: sad_watch, emotions: [sad], min_confidence: 0.5, at_least: {turns: 2, of_last: 4}, action: alert}
  - {name: fear, emotions: [fearful], min_confidence: 0.98}
"""


def test_many_close_thresholds_at_400_px(browser, server, stereo_call, screenshots):
    """The page as a server with these rules serves it (the page's rules swapped in on the way)."""
    from emotion.rules import parse_rules, rule_as_dict

    rules = [rule_as_dict(r) for r in parse_rules(RULES_TO_DRAW)]

    def with_rules(route):
        response = route.fetch()
        html = re.sub(r'(<script id="rules" type="application/json">).*?(</script>)',
                      lambda m: m.group(1) + json.dumps(rules) + m.group(2), response.text(), flags=re.S)
        route.fulfill(response=response, body=html)

    page = browser.new_page(viewport={"width": 400, "height": 900})
    page.route("**/ui", with_rules)
    page.goto(server.url + "/ui")
    page.fill("#token", TOKEN)
    _upload(page, stereo_call)
    tags = _assert_labels_fit(page)
    # Each label keeps its threshold, however short the rule's name must get.
    assert sorted(re.search(r" (\d\.\d\d)\b", t["text"]).group(1) for t in tags) == ["0.50", "0.70", "0.71", "0.72", "0.98"]
    # In the emotions' colours; dashed where the threshold alone fires, dotted where more must hold.
    lines = _js(page, "[...document.querySelectorAll('#timeline line.threshold')].map((l) => [l.dataset.rule, l.getAttribute('stroke'), "
                      "l.getAttribute('stroke-dasharray').split(' ')[0]])")
    assert lines == [["angry_caller", ANGRY, "7"], ["angry_streak", ANGRY, "2.5"],
                     ["a_rather_long_rule_name_about_refunds", ANGRY, "1.5"],
                     ["a_rather_long_rule_name_about_refunds", "#8c564b", "1.5"], ["sad_watch", "#1f77b4", "2.5"],
                     ["fear", "#9467bd", "7"]]
    legend = page.locator("#legend li.rule").all_inner_texts()
    assert "The threshold alone does not fire it" in legend[1] and "3 turns in a row" in legend[1]
    assert "never meets it" in legend[2] and "“refund”" in legend[2]
    # A track row for each rule a recording can fire (not the one that needs a transcript).
    assert page.locator("#timeline text.track-label").count() == 4
    page.screenshot(path=str(screenshots / "review-400-many-rules.png"), full_page=True)


def test_a_calibration_file_draws_precision_against_recall(browser, server, tmp_path, screenshots):
    from emotion.rules import parse_rules
    from emotion.tools.calibrate import calibration_report

    rules = parse_rules("rules:\n  - name: angry_caller\n    emotions: [angry]\n    min_confidence: 0.7\n"
                        "  - name: sad_watch\n    emotions: [sad]\n    min_confidence: 0.5\n")
    turns = [("angry", "angry", 0.95)] * 4 + [("neutral", "angry", 0.8), ("angry", "angry", 0.75), ("sad", "sad", 0.6)]
    report = calibration_report(turns, rules, target_precision=0.9, min_positives=3)
    (tmp_path / "calibration.json").write_text(json.dumps(report))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url + "/ui/")  # with the slash too
    page.set_input_files("#calibration-file", str(tmp_path / "calibration.json"))
    page.wait_for_selector("#calibration figure")
    assert page.locator("#calibration figure").count() == 2
    assert page.locator("#calibration .pr-rule").count() == 2
    captions = page.locator("#calibration figcaption").all_inner_texts()
    assert captions[0] == ("angry: 5 labelled of 7 turns. angry_caller now 0.70. suggested 0.81: precision 1, recall 0.8, "
                           "571.4 per 1,000 turns.")
    assert captions[1].startswith("sad: 1 labelled of 7 turns. sad_watch now 0.50. not suggested: 0.00 is unreliable")
    suggested = page.locator("#calibration .pr-suggested")
    assert suggested.nth(0).get_attribute("fill") == ANGRY and suggested.nth(1).get_attribute("fill") == "#fff"
    page.locator("#calibration").screenshot(path=str(screenshots / "calibration.png"))


def test_an_hour_of_frames_is_drawn_at_the_plots_width(browser, server):
    """180,000 frames (an hour at 20 ms) and thousands of marks: averaged down to a point per
    pixel and joined into runs, so the drawing stays small whatever the call's length."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url + "/ui")
    drawn = _js(page, """() => {
      const labels = ["angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "unknown"];
      const segments = [], rule_hits = [];
      for (let i = 0; i < 180000; i++) {
        const a = 0.5 + 0.45 * Math.sin(i / 3000), scores = {};
        for (const label of labels) scores[label] = (1 - a) / 8;
        scores.angry = a;
        segments.push({start_s: i * 0.02, end_s: i * 0.02 + 0.02, emotion: "angry", confidence: a, scores});
        if (a >= 0.7 && i % 11 === 0) rule_hits.push({segment: i, start_s: i * 0.02, end_s: i * 0.02 + 0.02, rule: "angry_caller",
                                                      action: "handoff", reason: "angry_caller"});
      }
      state.file = new File([""], "hour.wav");
      show({emotion: "angry", confidence: 0.5, scores: segments[0].scores, duration_s: 3600, granularity: "frame", segments, rule_hits});
      const svg = document.getElementById("timeline");
      return {hits: rule_hits.length, marks: svg.querySelectorAll("rect.hit").length, width: Number(svg.dataset.x1) - Number(svg.dataset.x0),
              points: svg.querySelector('polyline[data-label="angry"]').getAttribute("points").split(" ").length,
              listed: document.querySelectorAll("#hits button").length, ticks: [...svg.querySelectorAll("text.xtick")].map((t) => t.textContent)};
    }""")
    assert drawn["hits"] > 4000 and drawn["marks"] <= 20  # the marks of each rise above 0.7 joined into one
    assert drawn["points"] <= drawn["width"] + 2 and drawn["listed"] == 100
    assert drawn["ticks"][:3] == ["0:00", "5:00", "10:00"] and drawn["ticks"][-1] == "1:00:00"


def test_a_text_file_shows_the_apis_error(browser, server, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a recording")
    page = browser.new_page()
    page.goto(server.url + "/ui")
    page.fill("#token", TOKEN)
    page.set_input_files("#file", str(notes))
    page.wait_for_function("() => document.getElementById('error').textContent.length > 0", timeout=30_000)
    assert page.inner_text("#error").startswith("notes.txt: could not decode audio")
    assert page.is_hidden("#result")


def test_the_token_is_sent_and_required(browser, server, tmp_path):
    call = tmp_path / "call.wav"
    call.write_bytes(wav_bytes(2.0))
    page = browser.new_page()
    page.goto(server.url + "/ui")
    # Without the token /ready says only whether it is ready, not which model.
    page.wait_for_function("() => document.getElementById('model').textContent.includes('type the API token')")
    assert page.is_hidden("#model-warning")
    sent = []
    page.on("request", lambda r: r.url.endswith("/v1/analyze") and sent.append(r.headers.get("authorization")))
    page.set_input_files("#file", str(call))  # no token typed
    page.wait_for_function("() => document.getElementById('error').textContent.length > 0", timeout=30_000)
    assert "bearer token is required" in page.inner_text("#error")
    page.fill("#token", TOKEN)
    page.set_input_files("#file", [])
    page.set_input_files("#file", str(call))
    page.wait_for_selector("#result:not([hidden])", timeout=30_000)
    assert sent == [None, f"Bearer {TOKEN}"]
