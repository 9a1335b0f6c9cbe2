"""End to end: `lungxray serve` in a subprocess, its page driven by headless Chromium through Playwright.

Layout is checked by measurement, not by eye: at 1280 and 420 px wide the page must not scroll sideways
(`scrollWidth` against the viewport, and the full-page screenshot's width against the viewport's)."""

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

from lungxray.inference.predictor import Predictor
from lungxray.serve.app import free_port

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is not installed (apt-get install chromium)"),
]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REFER = "Refer to a radiologist: the model is unsure"
BORDERLINE = "Borderline: accepted, but close to the referral threshold"
VERDICTS = {REFER, BORDERLINE, "Confident"}


def expected_verdict(predictor: Predictor, image: Path) -> str:
    """What the page must say for this image: the same rule as the page's (borderline from 80% of the threshold)."""
    pred = predictor.predict([image])
    reason = (getattr(pred, "refer_reason", None) or [""])[0]
    if reason.startswith("out of distribution"):
        return "Refer to a radiologist: this image is unlike the images the model was trained on"
    if pred.refer[0]:
        return REFER
    threshold = predictor.meta.get("refer_threshold")
    if threshold is not None and pred.uncertainty[0] >= 0.8 * threshold:
        return BORDERLINE
    return "Confident"


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
    verdict = page.locator("#verdict-text").inner_text()
    assert verdict == expected_verdict(predictor, image)
    if verdict == "Confident":  # put in context with the bundle's own measured figure
        expect(page.locator("#verdict-context")).to_contain_text("accepted predictions were")
        expect(page.locator("#verdict-context")).to_contain_text("held-out")
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


def _no_sideways_scroll(page: Page, width: int, shot: Path) -> None:
    page.set_viewport_size({"width": width, "height": 900})
    page.wait_for_timeout(200)
    scroll = page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= width, f"at {width} px the page is {scroll} px wide"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] == width, f"the {width} px screenshot is wider than the viewport"


def test_layout_fits_1280_and_420_px(page: Page, tmp_path: Path) -> None:
    image = tmp_path / "a_very_long_file_name_of_a_chest_radiograph_exported_from_the_pacs_0001.png"
    Image.fromarray(synthetic_xray(2, np.random.default_rng(3), 192)).save(image)
    others = []
    for i in range(2):
        other = tmp_path / f"b{i}.png"
        Image.fromarray(synthetic_xray(i, np.random.default_rng(i), 160)).save(other)
        others.append(other)
    page.set_input_files("#file-input", str(image))
    expect(page.locator("#result")).to_be_visible(timeout=30_000)
    page.set_input_files("#file-input", [str(image), *map(str, others)])  # the multi-file table too
    expect(page.locator("#batch-summary")).to_contain_text("3 of 3 scored", timeout=60_000)
    for width in (1280, 420):
        _no_sideways_scroll(page, width, tmp_path / f"page_{width}.png")


def test_layout_check_catches_overflow(page: Page, tmp_path: Path) -> None:
    """The overflow check can fail: a 900 px wide element on a 420 px page is caught."""
    page.evaluate("document.body.insertAdjacentHTML('beforeend', '<div style=\"width:900px;height:10px\"></div>')")
    with pytest.raises(AssertionError, match="at 420 px the page is"):
        _no_sideways_scroll(page, 420, tmp_path / "wide.png")


def test_several_files_give_a_table(page: Page, tmp_path: Path) -> None:
    files = []
    for i in range(3):
        f = tmp_path / f"film_{i}.png"
        Image.fromarray(synthetic_xray(i, np.random.default_rng(10 + i), 128)).save(f)
        files.append(str(f))
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.set_input_files("#file-input", [*files, str(bad)])
    expect(page.locator("#batch-summary")).to_contain_text("4 of 4 scored", timeout=60_000)
    rows = page.locator("#batch-rows tr")
    assert rows.count() == 4
    assert [rows.nth(i).locator("td").first.inner_text() for i in range(4)] == [
        "film_0.png", "film_1.png", "film_2.png", "notes.png"]
    tags = [rows.nth(i).locator(".tag").inner_text() for i in range(4)]
    assert tags[3] == "Unreadable" and "not an image" in rows.nth(3).locator("td").last.inner_text()
    assert all(t in ("Confident", "Borderline", "Refer: unsure", "Refer: unlike training") for t in tags[:3]), tags
    expect(page.locator("#batch-summary")).to_contain_text("1 unreadable")
    assert page.locator("#batch th").last.inner_text() == "Why referred / error"  # refer_reason shown there
    rows.nth(1).click()  # a row opens that image in full, Grad-CAM included
    expect(page.locator("#preview-name")).to_contain_text("film_1.png", timeout=30_000)
    expect(page.locator("#result")).to_be_visible(timeout=30_000)


def test_overlay_toggle_scale_and_dicom_preview(page: Page, tmp_path: Path) -> None:
    from filegen import dicom_bytes

    dcm = tmp_path / "chest.dcm"
    dcm.write_bytes(dicom_bytes(synthetic_xray(0, np.random.default_rng(5), 128).astype(np.uint16) * 16))
    page.set_input_files("#file-input", str(dcm))
    expect(page.locator("#result")).to_be_visible(timeout=30_000)
    # the browser cannot draw DICOM: the preview is the image as the model sees it, sent by the server
    page.wait_for_function("() => document.getElementById('preview-img').naturalWidth > 0", timeout=15_000)
    expect(page.locator("#preview-name")).to_contain_text("as the model sees it")
    expect(page.locator("#cam-scale")).to_be_visible()
    overlay = page.locator("#overlay").get_attribute("src")
    page.click("#show-image")
    assert page.locator("#overlay").get_attribute("src") != overlay
    assert page.locator("#show-image").get_attribute("aria-pressed") == "true"
    expect(page.locator("#cam-scale")).to_be_hidden()
    page.click("#show-overlay")
    assert page.locator("#overlay").get_attribute("src") == overlay


def test_page_never_calls_an_out_of_distribution_referral_confident(page: Page) -> None:
    """With the fields of the site-adaptation work (refer_reason), an OOD referral is said as such, with its reason."""
    body = {"label": "pneumonia", "probabilities": {"covid": 0.05, "normal": 0.1, "pneumonia": 0.85},
            "uncertainty": 0.2, "disagreement": 0.01, "refer": True, "refer_threshold": 0.41, "ood": 9.5,
            "ood_threshold": 3.0, "refer_reason": "out of distribution: near-constant image",
            "overlay_png_base64": None, "image_png_base64": None, "classes": ["covid", "normal", "pneumonia"],
            "model": {"name": "m", "members": 1, "arch": "a"}}
    page.evaluate("(r) => render(r)", body)
    assert page.locator("#verdict").get_attribute("class") == "ood"
    assert "unlike the images the model was trained on" in page.locator("#verdict-text").inner_text()
    expect(page.locator("#verdict-context")).to_contain_text("near-constant image")
    borderline = {**body, "refer": False, "refer_reason": "", "uncertainty": 0.389, "ood": 0.5}
    page.evaluate("(r) => render(r)", borderline)  # the case: 0.389 against 0.410 is not "Confident"
    assert page.locator("#verdict-text").inner_text() == BORDERLINE
