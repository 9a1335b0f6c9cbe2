"""The web service: FastAPI app with `POST /predict`, `GET /health` and one static page at `/`.

Why it is built this way:
- The model is loaded once (`Predictor.load`) and every upload goes through `Predictor.preprocess`, the bundle's
  own input contract, so the server sees exactly the pixels training saw (PNG, JPEG, BMP, TIFF, DICOM bytes ...).
- Decoding and inference run in a bounded thread pool, never on the event loop. Decoding runs in parallel; a
  model replica (forward pass and Grad-CAM, which toggles `requires_grad` on the weights) is checked out of a pool
  for the whole prediction, so concurrent requests never share a half-switched torch module. One replica (the
  default) is a lock; more replicas let a multi-core CPU run several small forward passes at once.
- Bad input is the client's fault and gets a 4xx with a one-line reason, never a 500: the body size is checked from
  Content-Length *and* counted while reading (chunked uploads cannot bypass it), unknown formats are refused by
  their magic bytes (415) before any decoder runs, and the decoder's own pixel limit maps to 413.
- No route serves files by a user-given path: the page is one package file read at start-up.
- Decoding is bounded in memory, not only in requests: every decode reserves its estimated working memory (from
  the image header, before any pixel is decoded) from one byte budget shared by the worker threads
  (`decode_budget_mb`); a bomb or an image over the per-image limit is a 413, and a budget that stays full past
  a few seconds a 503 (lungxray.imageio, docs/security.md). `HEAD` answers wherever `GET` does.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import io
import logging
import queue
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from starlette.datastructures import UploadFile

from lungxray import __version__
from lungxray.hostinfo import usable_cores
from lungxray.inference.bundle import Bundle
from lungxray.inference.engines import load_predictor
from lungxray.inference.predictor import Predictor
from lungxray.io.decode import DecodeBusy, ImageDecodeError, decode_limits, is_dicom_bytes, set_decode_limits

log = logging.getLogger(__name__)

__all__ = ["ServeSettings", "create_app", "free_port", "run_server", "serve_in_thread"]

MB = 1024 * 1024
MULTIPART_SLACK = 64 * 1024  # room for boundaries and part headers on top of the file itself
FORMATS = "PNG, JPEG, BMP, TIFF, GIF, WebP, JPEG 2000 or DICOM"
_MAGIC: tuple[bytes, ...] = (
    b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"GIF87a",
    b"GIF89a", b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51",
)
_PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
             "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class ServeSettings:
    """Limits of one server; the defaults suit one CPU machine serving a few users."""

    max_upload_bytes: int = 20 * MB
    threads: int = 4  # worker threads for decoding + inference
    replicas: int = 1  # model copies; each runs one request at a time
    max_pending: int = 64  # requests admitted at once (running or waiting for a thread); beyond that: 503
    decode_budget_mb: int = 512  # working memory of all decodes running at once (413 for one image over it)
    decode_wait_s: float = 10.0  # how long a decode waits for room in that budget before a 503

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "threads", "replicas", "max_pending", "decode_budget_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"serve: {name} must be positive, got {getattr(self, name)}")


class ModelInfo(BaseModel):
    name: str
    members: int
    arch: str


class Referral(BaseModel):
    """How often the model was right when it did not refer, measured on the bundle's own held-out images."""

    accuracy: float | None  # of the accepted (not referred) held-out images
    accepted: int
    images: int
    kind: str  # "out-of-bag" or "holdout": which held-out images


class Health(BaseModel):
    status: str
    model: ModelInfo
    classes: list[str]
    referral: Referral | None = None  # None for a bundle without metrics.json


class PredictResponse(BaseModel):
    label: str
    probabilities: dict[str, float]
    uncertainty: float
    disagreement: float
    refer: bool
    refer_threshold: float | None
    refer_reason: str = ""  # "" when accepted; "out of distribution: ..." or "uncertain (...)" when referred
    ood: float | None = None  # feature-space distance to the training images (None: the bundle has no reference)
    ood_threshold: float | None = None  # above it the image is referred as out of distribution
    overlay_png_base64: str | None
    classes: list[str]
    model: ModelInfo
    image_png_base64: str | None = None  # the image as the model saw it (the page's preview, DICOM included)


def looks_like_image(data: bytes) -> bool:
    """True when the bytes start like a raster format we decode (magic bytes, not the file name)."""
    if is_dicom_bytes(data) or data.startswith(_MAGIC):
        return True
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def decode_status(exc: ImageDecodeError) -> int:
    """HTTP status for a decoder error: 413 over a size limit or a bomb, 415 unknown format, 503 decoder busy,
    else 422 (corrupt, or pixel data that does not match its header)."""
    message = str(exc)
    if isinstance(exc, DecodeBusy) or "out of memory" in message:
        return 503
    if "more than the limit" in message or "decompression bomb" in message:
        return 413
    if "not a recognised image format" in message:
        return 415
    return 422


def _client_name(filename: str | None) -> str:
    """The upload's base name, printable and short, for error messages (never used as a path)."""
    name = re.sub(r"[^\w.\- ]", "_", Path(filename or "upload").name)[:100]
    return name or "upload"


def _referral(run_dir: Path) -> Referral | None:
    """The validation referral figures of RUN/metrics.json (what "Confident" rests on), None when absent."""
    import json

    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        refer = metrics["validation"]["refer"]
        return Referral(accuracy=refer.get("accuracy"), accepted=int(refer["n_accepted"]), images=int(refer["n"]),
                        kind=str(metrics.get("validation_kind") or "holdout"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Engine:
    """The loaded model and a pool of its replicas; a request holds one replica for its whole prediction."""

    def __init__(self, predictor: Predictor, replicas: int = 1) -> None:
        self.predictor = predictor
        self.pool: queue.Queue[Predictor] = queue.Queue()
        for i in range(replicas):  # own PyTorch model each (Grad-CAM hooks); an ONNX session is shared (thread-safe)
            self.pool.put(predictor if i == 0 else dataclasses.replace(
                predictor, bundle=Bundle(copy.deepcopy(predictor.bundle.model), predictor.meta, predictor.bundle.path)))
        meta = predictor.meta
        self.model = ModelInfo(name=str(meta.get("name", Path(predictor.bundle.path).name)),
                               members=int(meta["members"]), arch=str(meta["arch"]))
        threshold = meta.get("refer_threshold")
        self.refer_threshold = None if threshold is None else float(threshold)
        self.referral = _referral(Path(predictor.bundle.path))

    @contextlib.contextmanager
    def replica(self) -> Iterator[Predictor]:
        predictor = self.pool.get()
        try:
            yield predictor
        finally:
            self.pool.put(predictor)

    def predict(self, data: bytes, filename: str, overlay: bool) -> PredictResponse:
        """Decode (in parallel with other requests), then predict and explain with one replica."""
        if not looks_like_image(data):
            raise HTTPException(415, f"{filename}: not an image this service reads (send {FORMATS})")
        try:
            image, reason = self.predictor.load_input(data, name=filename)
        except ImageDecodeError as exc:
            status = decode_status(exc)
            raise HTTPException(status, str(exc), {"Retry-After": "2"} if status == 503 else None) from exc
        batch = image[None]  # (1, S, S)
        cam = None
        with self.replica() as predictor:
            pred = predictor.predict_images(batch, [reason])
            if overlay:
                from lungxray.evaluation.gradcam import gradcam  # lazy: loaded with the first map asked for

                cam = gradcam(predictor, batch)[0]
        png = None
        if cam is not None:
            from lungxray.evaluation.gradcam import overlay_png

            png = base64.b64encode(overlay_png(image, cam)).decode("ascii")
        return PredictResponse(
            label=pred.labels[0],
            probabilities={c: float(p) for c, p in zip(pred.classes, pred.probs[0], strict=True)},
            uncertainty=float(pred.uncertainty[0]),
            disagreement=float(pred.disagreement[0]),
            refer=bool(pred.refer[0]),
            refer_threshold=self.refer_threshold,
            refer_reason=pred.refer_reason[0],
            ood=float(pred.ood[0]) if np.isfinite(pred.ood[0]) else None,
            ood_threshold=(self.predictor.meta.get("ood") or {}).get("threshold"),
            overlay_png_base64=png,
            classes=list(pred.classes),
            model=self.model,
            image_png_base64=_png_base64(image),
        )

    def warm_up(self) -> None:
        """One forward and Grad-CAM pass per replica so the first users do not pay for lazy initialisation."""
        from lungxray.evaluation.gradcam import gradcam

        size = int(self.predictor.meta["input"]["size"])
        batch = np.full((1, size, size), 128, np.uint8)
        replicas = [self.pool.get() for _ in range(self.pool.qsize())]
        for predictor in replicas:
            predictor.predict_images(batch)
            gradcam(predictor, batch)
            self.pool.put(predictor)


async def read_upload(request: Request, limit: int) -> tuple[bytes, str]:
    """The multipart field `file` as bytes, refusing bodies over `limit` before and while reading them."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, f"invalid Content-Length header {declared[:40]!r}")
        if int(declared) > limit + MULTIPART_SLACK:
            raise HTTPException(413, f"upload of {int(declared) / MB:.1f} MB is over the limit of {limit / MB:g} MB")
    received = 0
    receive = request.receive

    async def counting_receive() -> Any:
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > limit + MULTIPART_SLACK:
            raise HTTPException(413, f"upload is over the limit of {limit / MB:g} MB")
        return message

    form = await Request(request.scope, counting_receive).form(max_files=1, max_fields=16)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "no file uploaded: send the image as the multipart form field 'file'")
        data = await upload.read(limit + 1)
        name = _client_name(upload.filename)
    finally:
        await form.close()
    if len(data) > limit:
        raise HTTPException(413, f"{name}: file is over the limit of {limit / MB:g} MB")
    if not data:
        raise HTTPException(422, f"{name}: file is empty (0 bytes)")
    return data, name


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary", "description": f"one image: {FORMATS}"}},
        }}},
    }
}


def _page() -> str:
    return (resources.files("lungxray.serve") / "static" / "index.html").read_text(encoding="utf-8")


def create_app(predictor: Predictor, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app for one loaded model. Uploads are parsed by hand so the size limit applies while reading."""
    settings = settings or ServeSettings()
    set_decode_limits(dataclasses.replace(decode_limits(), budget_bytes=settings.decode_budget_mb * MB,
                                          max_decode_bytes=min(decode_limits().max_decode_bytes,
                                                               settings.decode_budget_mb * MB),
                                          wait_s=settings.decode_wait_s))
    engine = _Engine(predictor, settings.replicas)
    limiter = anyio.CapacityLimiter(settings.threads)
    page = _page()
    pending = 0
    app = FastAPI(title="lungxray", version=__version__,
                  description="Chest X-ray classification with uncertainty and Grad-CAM. Research use only.")

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_CSP, "X-Content-Type-Options": "nosniff"})

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Health:
        return Health(status="ok", model=engine.model, classes=predictor.classes, referral=engine.referral)

    @app.post("/predict", openapi_extra=_PREDICT_BODY, responses={
        413: {"description": "upload or image too large"}, 415: {"description": "not a supported image"},
        422: {"description": "empty, corrupt or missing file"}, 503: {"description": "too many requests queued"}})
    async def predict(request: Request, overlay: bool = Query(True, description="compute the Grad-CAM overlay")
                      ) -> PredictResponse:
        """Classify one uploaded image; returns probabilities, uncertainty, referral and a Grad-CAM overlay."""
        nonlocal pending
        data, name = await read_upload(request, settings.max_upload_bytes)
        if pending >= settings.max_pending:
            raise HTTPException(503, "server busy: too many requests queued, retry shortly", {"Retry-After": "1"})
        pending += 1
        try:
            start = time.perf_counter()
            result = await anyio.to_thread.run_sync(engine.predict, data, name, overlay, limiter=limiter)
            log.debug("%s: %s in %.0f ms", name, result.label, (time.perf_counter() - start) * 1000)
            return result
        finally:
            pending -= 1

    app.state.engine = engine
    return app


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and benchmarks that start a server in a subprocess)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=256)
    except OSError as exc:
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[str]:
    """Run `app` under a real uvicorn server on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    sock = _listen(host, 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def _describe(predictor: Predictor) -> str:
    meta = predictor.meta
    return f"{meta.get('name', '?')}: {meta['arch']} x{meta['members']}, classes {', '.join(predictor.classes)}"


def run_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, threads: int = 4,
               max_upload_mb: float = 20.0, device: str = "cpu", replicas: int = 1, engine: str = "torch",
               onnx_path: str | Path | None = None, decode_budget_mb: int = 512) -> None:
    """Load the bundle once, warm it up, and serve until interrupted (the `lungxray serve` command).

    With several CPU replicas, PyTorch's intra-op threads are divided among them: replicas that each spin up
    every core fight over them (measured in bench/load_serve.py). `engine="onnx"` scores with ONNX Runtime
    (RUN/model.onnx, or `onnx_path`, e.g. an int8 export of this bundle); Grad-CAM maps still come from the
    PyTorch model.
    """
    import torch
    import uvicorn

    settings = ServeSettings(max_upload_bytes=int(max_upload_mb * MB), threads=threads, replicas=replicas,
                             decode_budget_mb=decode_budget_mb)
    predictor = load_predictor(run_dir, device, engine, onnx_path)
    if replicas > 1 and predictor.device.type == "cpu":
        cores = usable_cores()
        torch.set_num_threads(max(1, cores // replicas))
        log.info("%d model replicas, %d PyTorch thread(s) each", replicas, torch.get_num_threads())
    app = create_app(predictor, settings)
    app.state.engine.warm_up()
    sock = _listen(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: the service has no authentication, anyone who can reach it can use it", host)
    bound = sock.getsockname()[1]
    log.info("serving %s (%s) on http://%s:%d (docs at /docs)", _describe(predictor), run_dir, host, bound)
    uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
