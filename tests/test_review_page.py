"""The review page (/ui) in a real headless Chromium against the real action server."""

import shutil

import pytest
from conftest import TOKEN, wav_bytes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium's own background traffic would be refused by a closed network; keep it quiet.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(locked_server):
    """The angry-0.9 model, the default rule (angry_caller at 0.7), the API behind a token."""
    return locked_server


def test_upload_shows_the_label_scores_and_timeline(browser, server, tmp_path):
    call = tmp_path / "call.wav"
    call.write_bytes(wav_bytes(12.0))
    page = browser.new_page()
    page.goto(server.url + "/ui")
    page.fill("#token", TOKEN)
    page.set_input_files("#file", str(call))
    page.wait_for_selector("#result:not([hidden])", timeout=30_000)
    assert page.inner_text("#label") == "angry" and page.inner_text("#confidence") == "confidence 0.90"
    assert page.locator("#scores tr").count() == 9
    assert page.locator("#timeline polyline.series").count() == 9
    points = page.get_attribute('#timeline polyline[data-label="angry"]', "points").split()
    assert len(points) == 7  # 3 s segments every 1.5 s over 12 s
    threshold = page.locator("#timeline line.threshold")
    assert threshold.count() == 1 and "angry_caller 0.7" in page.text_content("#timeline")
    page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
    assert page.inner_text("#error") == ""


def test_a_text_file_shows_the_apis_error(browser, server, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a recording")
    page = browser.new_page()
    page.goto(server.url + "/ui")
    page.fill("#token", TOKEN)
    page.set_input_files("#file", str(notes))
    page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
    assert page.inner_text("#error").startswith("notes.txt: could not decode audio")
    assert page.is_hidden("#result")


def test_the_token_is_sent_and_required(browser, server, tmp_path):
    call = tmp_path / "call.wav"
    call.write_bytes(wav_bytes(2.0))
    page = browser.new_page()
    page.goto(server.url + "/ui")
    sent = []
    page.on("request", lambda r: r.url.endswith("/v1/analyze") and sent.append(r.headers.get("authorization")))
    page.set_input_files("#file", str(call))  # no token typed
    page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
    assert "bearer token is required" in page.inner_text("#error")
    page.fill("#token", TOKEN)
    page.set_input_files("#file", [])
    page.set_input_files("#file", str(call))
    page.wait_for_selector("#result:not([hidden])", timeout=30_000)
    assert sent == [None, f"Bearer {TOKEN}"]
