"""The web service, in-process (httpx over ASGI) and under a real uvicorn server on a loopback port."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from conftest import synthetic_xray
from fastapi import FastAPI
from filegen import dicom_bytes, png_claiming
from PIL import Image

from lungxray import cli
from lungxray.inference.engines import load_predictor
from lungxray.inference.predictor import Predictor
from lungxray.serve.app import ServeSettings, create_app, serve_in_thread

SCHEMA = {"label", "probabilities", "uncertainty", "disagreement", "refer", "refer_threshold", "overlay_png_base64",
          "classes", "model", "image_png_base64", "ood", "ood_threshold", "refer_reason"}


class Client:
    """A synchronous client that talks ASGI to the app directly (no sockets), like a test client."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.request(method, url, **kwargs)

        return anyio.run(go)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _dicom(pixels: np.ndarray) -> bytes:
    return dicom_bytes(pixels.astype(np.uint16) * 16)


def _xray(label: int = 0, seed: int = 1, size: int = 96) -> np.ndarray:
    return synthetic_xray(label, np.random.default_rng(seed), size)


@pytest.fixture(scope="module")
def predictor(trained_run: Path) -> Predictor:
    return Predictor.load(trained_run)


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> Client:
    return Client(create_app(predictor))


def test_health_page_and_openapi(client: Client, predictor: Predictor) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["classes"] == predictor.classes
    assert health["model"] == {"name": "smoke", "members": 1, "arch": predictor.meta["arch"]}
    refer = json.loads((Path(predictor.bundle.path) / "metrics.json").read_text())["validation"]["refer"]
    assert health["referral"]["accepted"] == refer["n_accepted"] and health["referral"]["images"] == refer["n"]
    assert health["referral"]["accuracy"] == refer["accuracy"]  # what the page's "Confident" is put against
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="file-input"', 'id="label"', 'id="overlay"', 'id="probs"', 'id="verdict"'):
        assert element in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing external: works offline
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/health"} <= set(paths)
    assert "file" in paths["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["required"]


@pytest.mark.parametrize("run", ["trained_run", "trained_ensemble"])
@pytest.mark.parametrize("kind", ["png", "jpeg", "dicom"])
def test_predict_matches_predictor(request: pytest.FixtureRequest, run: str, kind: str) -> None:
    run_dir: Path = request.getfixturevalue(run)
    pred = Predictor.load(run_dir)
    app = create_app(pred)
    data = {"png": _png, "jpeg": _jpeg, "dicom": _dicom}[kind](_xray(label=2))
    name = {"png": "x.png", "jpeg": "x.jpg", "dicom": "x.dcm"}[kind]
    res = Client(app).post("/predict", files={"file": (name, data, "application/octet-stream")})
    assert res.status_code == 200, res.text
    body = res.json()
    assert set(body) == SCHEMA
    expected = pred.predict([data])
    assert body["classes"] == pred.classes
    assert body["label"] == expected.labels[0]
    got = np.array([body["probabilities"][c] for c in pred.classes])
    np.testing.assert_allclose(got, expected.probs[0], rtol=1e-6, atol=1e-7)
    assert body["uncertainty"] == pytest.approx(float(expected.uncertainty[0]), abs=1e-6)
    assert body["disagreement"] == pytest.approx(float(expected.disagreement[0]), abs=1e-6)
    assert body["refer"] == bool(expected.refer[0])
    assert body["model"]["members"] == pred.bundle.members
    size = pred.meta["input"]["size"]
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"])))
    assert overlay.format == "PNG" and overlay.size == (size, size) and overlay.mode == "RGB"
    seen = Image.open(io.BytesIO(base64.b64decode(body["image_png_base64"])))  # the page's preview (DICOM too)
    assert seen.size == (size, size) and seen.mode == "L"


def test_onnx_engine_serves_the_same_answers(tmp_path: Path, trained_ensemble: Path) -> None:
    """`serve --engine onnx`: ONNX Runtime scores (one shared session), Grad-CAM from per-replica PyTorch copies."""
    run = shutil.copytree(trained_ensemble, tmp_path / "run")  # the export writes RUN/model.onnx
    onnx = load_predictor(run, engine="onnx")
    app = create_app(onnx, ServeSettings(replicas=2))
    replicas = list(app.state.engine.pool.queue)
    assert [type(r).__name__ for r in replicas] == ["OnnxPredictor"] * 2
    assert replicas[0].session is replicas[1].session and replicas[0].bundle.model is not replicas[1].bundle.model
    data = _png(_xray(label=1))
    res = Client(app).post("/predict", files={"file": ("x.png", data, "image/png")})
    assert res.status_code == 200, res.text
    expected = Predictor.load(run).predict([data])
    got = np.array([res.json()["probabilities"][c] for c in expected.classes])
    np.testing.assert_allclose(got, expected.probs[0], atol=1e-5)
    assert res.json()["label"] == expected.labels[0] and res.json()["overlay_png_base64"]


def test_overlay_can_be_skipped(client: Client) -> None:
    res = client.post("/predict", params={"overlay": "false"}, files={"file": ("x.png", _png(_xray()), "image/png")})
    assert res.status_code == 200 and res.json()["overlay_png_base64"] is None


def _bad_uploads() -> dict[str, tuple[dict[str, Any], int, str]]:
    """name -> (request kwargs, expected status, a word the message must contain)."""
    jpeg = _jpeg(_xray(size=128))
    big = b"\x89PNG\r\n\x1a\n" + bytes(30 * 1024 * 1024)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit must be counted while reading
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n\r\n"
        for _ in range(30):
            yield bytes(1024 * 1024)
        yield b"\r\n--b--\r\n"

    return {
        "empty": ({"files": {"file": ("x.png", b"", "image/png")}}, 422, "empty"),
        "text named png": ({"files": {"file": ("notes.png", b"patient notes\n" * 20, "image/png")}}, 415, "notes.png"),
        "truncated jpeg": ({"files": {"file": ("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}}, 422, "cut.jpg"),
        "corrupt png header": ({"files": {"file": ("h.png", b"\x89PNG\r\n\x1a\n" + bytes(40), "image/png")}}, 422,
                               "h.png"),
        "30 MB upload": ({"files": {"file": ("big.png", big, "image/png")}}, 413, "limit"),
        "30 MB chunked": ({"content": chunked(), "headers": {"content-type": "multipart/form-data; boundary=b"}},
                          413, "limit"),
        "20000x20000 png": ({"files": {"file": ("bomb.png", png_claiming(20000, 20000), "image/png")}}, 413,
                            "pixels"),
        "missing field": ({"files": {"image": ("x.png", _png(_xray()), "image/png")}}, 422, "'file'"),
        "no body": ({}, 422, "'file'"),
        "json body": ({"json": {"file": "x.png"}}, 422, "'file'"),
        "bad content-length": ({"content": b"x", "headers": {"content-length": "abc"}}, 400, "Content-Length"),
    }


@pytest.mark.parametrize("case", list(_bad_uploads()))
def test_bad_input_is_a_clear_4xx(client: Client, case: str) -> None:
    kwargs, status, word = _bad_uploads()[case]
    res = client.post("/predict", **kwargs)
    assert res.status_code == status, res.text
    detail = res.json()["detail"]
    assert isinstance(detail, str) and word in detail and "\n" not in detail


def test_file_over_a_small_limit_is_413(predictor: Predictor) -> None:
    """The body passes the Content-Length check (within the multipart slack) but the file itself is too big."""
    app = create_app(predictor, ServeSettings(max_upload_bytes=1000))
    res = Client(app).post("/predict", files={"file": ("x.png", _png(_xray(size=96)), "image/png")})
    assert res.status_code == 413 and "limit" in res.json()["detail"]
    ok = Client(app).post("/predict", files={"file": ("x.png", _png(np.zeros((8, 8), np.uint8)), "image/png")})
    assert ok.status_code == 200


def test_settings_are_validated() -> None:
    for bad in ({"threads": 0}, {"replicas": 0}, {"max_upload_bytes": -1}, {"max_pending": 0}):
        with pytest.raises(ValueError, match="positive"):
            ServeSettings(**bad)


@pytest.mark.parametrize("replicas", [1, 3])
def test_concurrent_requests_on_a_real_server(predictor: Predictor, replicas: int) -> None:
    """200 requests from 16 threads: all 200, each with the probabilities of its own image (no cross-talk)."""
    images = [_png(_xray(label=i % 3, seed=i)) for i in range(6)]
    expected = [predictor.predict([d]).probs[0] for d in images]
    app = create_app(predictor, ServeSettings(threads=4, replicas=replicas))
    local = threading.local()

    def one(i: int, base: str) -> tuple[int, int, list[float] | None]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=base, timeout=60)
        res = local.client.post("/predict", files={"file": (f"{i}.png", images[i % 6], "image/png")})
        probs = [res.json()["probabilities"][c] for c in predictor.classes] if res.status_code == 200 else None
        return i, res.status_code, probs

    start = time.monotonic()
    with serve_in_thread(app) as base, ThreadPoolExecutor(16) as pool:
        assert base.startswith("http://127.0.0.1:")
        results = list(pool.map(lambda i: one(i, base), range(200)))
    elapsed = time.monotonic() - start
    assert [status for _, status, _ in results] == [200] * 200
    for i, _, probs in results:
        np.testing.assert_allclose(probs, expected[i % 6], rtol=1e-6, atol=1e-7)
    assert elapsed < 60, f"200 requests took {elapsed:.1f} s"


def test_overload_is_503_not_a_pileup(predictor: Predictor) -> None:
    """With the model busy and one admission slot, further requests are turned away at once with Retry-After."""
    app = create_app(predictor, ServeSettings(threads=1, max_pending=1))
    png = _png(_xray())
    with serve_in_thread(app) as base, ThreadPoolExecutor(3) as pool:
        replica = app.state.engine.pool.get()  # the model is busy
        try:
            futures = [pool.submit(httpx.post, f"{base}/predict", files={"file": ("x.png", png)}, timeout=30)
                       for _ in range(3)]
            deadline = time.monotonic() + 20
            while sum(f.done() for f in futures) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            app.state.engine.pool.put(replica)
        statuses = sorted(f.result().status_code for f in futures)
        assert statuses == [200, 503, 503]
        busy = next(f.result() for f in futures if f.result().status_code == 503)
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]


def test_cli_serve_errors_are_one_line(tmp_path: Path, trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", str(tmp_path / "nothing")]) == 2
    assert "not a lungxray model folder" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert cli.main(["serve", str(trained_run), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot listen on 127.0.0.1:{port}" in err and len(err.splitlines()) == 1
    assert cli.main(["serve", str(trained_run), "--workers-threads", "0"]) == 2
    assert "positive" in capsys.readouterr().err
