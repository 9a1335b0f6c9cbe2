"""End to end: `lungxray serve` in a subprocess, its page driven by headless Chromium through Playwright."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import synthetic_xray
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright

from lungxray.predict import Predictor
from lungxray.serve import free_port

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is not installed (apt-get install chromium)"),
]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VERDICTS = {"Refer to a radiologist: the model is unsure", "Confident"}


@pytest.fixture(scope="module")
def server(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real command, on a free loopback port; yields its base URL once /health answers."""
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "server.log").open("w+")
    cmd = [sys.executable, "-m", "lungxray", "serve", str(trained_run), "--port", str(port), "--workers-threads", "2"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"lungxray serve exited with {proc.returncode}:\n{log.read()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("lungxray serve did not answer /health within 90 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture()
def page(server: str) -> Iterator[Page]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 860})
            pg = context.new_page()
            outside: list[str] = []
            pg.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:")) else outside.append(r.url))
            pg.goto(server)
            yield pg
            assert outside == [], f"the page tried to load external resources: {outside}"
        finally:
            browser.close()


def test_upload_shows_label_probabilities_and_overlay(page: Page, trained_run: Path, tmp_path: Path) -> None:
    image = tmp_path / "chest.png"
    Image.fromarray(synthetic_xray(0, np.random.default_rng(7), 192)).save(image)
    predictor = Predictor.load(trained_run)
    expected = predictor.predict([image])

    expect(page.locator("#model")).to_contain_text("smoke", timeout=15_000)
    page.set_input_files("#file-input", str(image))
    expect(page.locator("#result")).to_be_visible(timeout=30_000)
    assert page.locator("#label").inner_text().strip().lower() == expected.labels[0]
    assert page.locator("#verdict-text").inner_text() in VERDICTS
    assert page.locator("#verdict-text").inner_text() == (
        "Refer to a radiologist: the model is unsure" if expected.refer[0] else "Confident")
    assert page.locator("#probs .bar-row").count() == len(predictor.classes)
    page.wait_for_function("() => { const i = document.getElementById('overlay'); "
                           "return i.complete && i.naturalWidth > 0; }", timeout=15_000)
    size = predictor.meta["input"]["size"]
    assert page.evaluate("document.getElementById('overlay').naturalWidth") == size
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_bad_file_shows_a_readable_error(page: Page, tmp_path: Path) -> None:
    text = tmp_path / "report.png"
    text.write_text("this is a radiology report, not an image\n")
    page.set_input_files("#file-input", str(text))
    expect(page.locator("#error")).to_be_visible(timeout=30_000)
    expect(page.locator("#error")).to_contain_text("report.png: not an image")
    expect(page.locator("#result")).to_be_hidden()
    page.screenshot(path=str(tmp_path / "error.png"), full_page=True)
