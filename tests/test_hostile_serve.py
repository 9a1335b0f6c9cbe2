"""Issue 18, the service: every hostile upload of the corpus gets a 4xx with a one-line reason (never a 5xx, never
a 200 for a non-image), a full decode budget is a 503 with Retry-After, HEAD works where GET does, and `serve`
does not inherit the training memory setting."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import hostile
import pytest
from fastapi.testclient import TestClient

from lungxray import cli
from lungxray.inference.predictor import Predictor
from lungxray.io import decode as imageio
from lungxray.serve.app import ServeSettings, create_app
from lungxray.speed.bench import _scratch_bundle

EXPECTED = {
    "deflated DICOM bomb": 413,
    "DICOM Rows=1 Columns=3, much more pixel data": 422,
    "GIF with a 7000 x 7000 canvas": 413,
    "RGBA PNG 7071 x 7071": 413,
    "JPEG claiming 7000 x 7000": 413,
    "JPEG DICOM frame larger than its header": 422,
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _scratch_bundle(tmp_path_factory.mktemp("hostile_serve") / "b", "compact_cnn", 1, 32)


@pytest.fixture
def restore_limits() -> Iterator[None]:
    previous = imageio.decode_limits()
    yield
    imageio.set_decode_limits(previous)


def test_every_case_of_the_corpus_is_a_4xx_with_one_line(bundle: Path, restore_limits: None) -> None:
    client = TestClient(create_app(Predictor.load(bundle)))
    for case, (data, name) in hostile.corpus().items():
        res = client.post("/predict", files={"file": (name, data, "application/octet-stream")})
        assert res.status_code == EXPECTED[case], (case, res.status_code, res.text)
        detail = res.json()["detail"]
        assert detail.startswith(f"{name}: ") and "\n" not in detail, detail
    res = client.post("/predict", files={"file": ("x.png", b"this is not an image at all", "image/png")})
    assert res.status_code == 415
    good = client.post("/predict", files={"file": ("ok.png", hostile.good_png(64), "image/png")})
    assert good.status_code == 200, good.text
    assert client.get("/health").status_code == 200
    assert imageio._BUDGET.used == 0  # every reservation given back, refused or not


def test_head_works_where_get_does(bundle: Path, restore_limits: None) -> None:
    client = TestClient(create_app(Predictor.load(bundle)))
    for path in ("/", "/health"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]


def test_a_full_decode_budget_is_a_503_with_retry_after(bundle: Path, restore_limits: None) -> None:
    app = create_app(Predictor.load(bundle), ServeSettings(decode_budget_mb=8, decode_wait_s=0.2))
    client = TestClient(app)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with imageio._BUDGET.reserve(8 * 1024 * 1024, "other"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        held.wait(5)
        res = client.post("/predict", files={"file": ("late.png", hostile.good_png(64), "image/png")})
        assert res.status_code == 503 and res.headers["retry-after"] and "busy" in res.json()["detail"]
    finally:
        release.set()
        thread.join()
    assert client.post("/predict", files={"file": ("late.png", hostile.good_png(64), "image/png")}).status_code == 200


def test_serve_does_not_inherit_the_training_memory_setting(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lungxray import runtime
    from lungxray.serve import app as serve

    calls: list[str] = []
    monkeypatch.setattr(runtime, "reuse_freed_memory", lambda *a, **k: calls.append("reuse") or True)
    monkeypatch.setattr(serve, "run_server", lambda *a, **k: calls.append("serve"))
    assert cli.main(["serve", str(bundle)]) == 0
    assert calls == ["serve"]
