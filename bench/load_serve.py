"""Load test of `lungxray serve`: N requests from C concurrent clients over loopback; throughput and latency.

Starts the real command in a subprocess on a free 127.0.0.1 port (so clients and server do not share a GIL), waits
for /health, sends a few warm-up requests, then `--requests` POST /predict calls from `--clients` threads, each
with its own keep-alive connection. Bounded: every request has a timeout and the whole run a deadline; requests
not sent by then count as errors. Prints requests/s, p50/p90/p99/max latency and the error count.

    python bench/load_serve.py runs/smoke --clients 16 --requests 200
    python bench/load_serve.py runs/reference --image some_xray.png --no-overlay
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from lungxray.serve.app import free_port


def synthetic_png(size: int = 1024, seed: int = 0) -> bytes:
    """A grey chest-like gradient with noise, PNG-encoded: decoding cost like a real radiograph of that size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 90 + 60 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.55) ** 2) / 0.08) + rng.normal(0, 8, (size, size))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def start_server(run_dir: str, port: int, threads: int, replicas: int, log: io.TextIOBase,
                 wait: float = 120.0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lungxray", "serve", run_dir, "--port", str(port), "--workers-threads", str(threads),
           "--replicas", str(replicas)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lungxray serve exited with {proc.returncode} (log: {log.name})")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"lungxray serve did not answer /health within {wait:.0f} s (log: {log.name})")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_load(base: str, payload: bytes, name: str, clients: int, requests: int, overlay: bool,
             timeout: float, deadline_s: float) -> dict:
    local = threading.local()
    stop_at = time.monotonic() + deadline_s
    params = {"overlay": str(overlay).lower()}

    def one(_: int) -> tuple[float, str]:
        if time.monotonic() > stop_at:
            return float("nan"), "deadline"
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=base, timeout=timeout)
        t0 = time.perf_counter()
        try:
            res = local.client.post("/predict", params=params, files={"file": (name, payload)})
            status = "ok" if res.status_code == 200 else f"http {res.status_code}"
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        return time.perf_counter() - t0, status

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    ok = [lat * 1000 for lat, status in results if status == "ok"]
    errors: dict[str, int] = {}
    for _, status in results:
        if status != "ok":
            errors[status] = errors.get(status, 0) + 1
    return {
        "requests": requests, "clients": clients, "ok": len(ok), "errors": sum(errors.values()),
        "error_kinds": errors, "wall_s": wall, "throughput_rps": len(ok) / wall if wall else 0.0,
        "p50_ms": percentile(ok, 50), "p90_ms": percentile(ok, 90), "p99_ms": percentile(ok, 99),
        "max_ms": max(ok) if ok else float("nan"), "mean_ms": statistics.fmean(ok) if ok else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--image", help="image file to send (default: a synthetic 1024x1024 PNG)")
    parser.add_argument("--no-overlay", action="store_true", help="skip Grad-CAM (measures prediction alone)")
    parser.add_argument("--server-threads", type=int, default=4, help="the server's --workers-threads")
    parser.add_argument("--replicas", type=int, default=1, help="the server's --replicas")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds for the whole run")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 100_000):
        parser.error("--clients must lie in [1, 256] and --requests in [1, 100000]")

    payload = Path(args.image).read_bytes() if args.image else synthetic_png()
    name = Path(args.image).name if args.image else "synthetic.png"
    port = free_port()
    with tempfile.NamedTemporaryFile("w+", prefix="load_serve_", suffix=".log", delete=False) as log:
        proc = start_server(args.run_dir, port, args.server_threads, args.replicas, log)
        base = f"http://127.0.0.1:{port}"
        try:
            health = httpx.get(f"{base}/health", timeout=5).json()
            for _ in range(3):  # warm-up: lazy imports, allocator, first Grad-CAM
                httpx.post(f"{base}/predict", files={"file": (name, payload)}, timeout=args.timeout).raise_for_status()
            result = run_load(base, payload, name, args.clients, args.requests, not args.no_overlay,
                              args.timeout, args.deadline)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    result.update(model=health["model"], overlay=not args.no_overlay, payload_bytes=len(payload),
                  server_threads=args.server_threads, replicas=args.replicas, cpus=os.cpu_count())
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if result["errors"] == 0 else 1
    m = result["model"]
    print(f"model {m['name']} ({m['arch']}, {m['members']} member(s)); payload {len(payload) / 1024:.0f} KB; "
          f"Grad-CAM {'on' if result['overlay'] else 'off'}; server threads {args.server_threads}, "
          f"replicas {args.replicas}; "
          f"{result['cpus']} CPUs")
    print(f"{result['ok']}/{result['requests']} OK from {result['clients']} clients in {result['wall_s']:.2f} s: "
          f"{result['throughput_rps']:.1f} req/s")
    print(f"latency ms: p50 {result['p50_ms']:.0f}  p90 {result['p90_ms']:.0f}  p99 {result['p99_ms']:.0f}  "
          f"max {result['max_ms']:.0f}")
    print(f"errors: {result['errors']}" + (f" {result['error_kinds']}" if result["errors"] else ""))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
