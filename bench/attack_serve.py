"""Attack `lungxray serve` with the hostile-input corpus of issue 18 at full size, one by one and several at once.

Starts the real command on a free loopback port (bench/load_serve.py's `start_server`), warms it up, records the
idle server's resident memory, then posts every case (the 512 MB deflated DICOM bomb, the 18 MB DICOM with a 1 x 3
header, the 43-byte GIF canvas, the 194 KB 7071 x 7071 RGBA PNG, the JPEG claiming 7000 x 7000, a non-image, an
empty and a truncated file, and two legitimate large radiograph-sized images) one at a time, then all of them
`--copies` times from `--clients` threads at once. A sampler thread reads the server's VmRSS every 10 ms. Prints
each case's status and the server's idle and peak resident memory; exits non-zero on any 5xx, a 200 for a
non-image, an unhealthy server afterwards, or a peak more than `--max-extra-mb` above idle.

    python bench/attack_serve.py runs/reference
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the corpus lives with the tests that define its expected outcomes
sys.path.insert(0, str(ROOT / "bench"))
import hostile  # noqa: E402
from load_serve import start_server  # noqa: E402

from lungxray.serve.app import free_port  # noqa: E402

MB = 1024 * 1024


def legit(fmt: str, height: int = 4000, width: int = 3000) -> bytes:
    """A radiograph-sized noisy gradient (what a real large upload costs to decode)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    img = 90 + 60 * np.exp(-((xx - 0.4) ** 2 + (yy - 0.5) ** 2) / 0.08) + rng.normal(0, 6, (height, width))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG"
                                                                                     else {}))
    return buf.getvalue()


def cases() -> dict[str, tuple[bytes, str, bool]]:
    """{case: (bytes, file name, is an image the server should score)}."""
    out = {case: (data, name, False) for case, (data, name) in hostile.corpus(full=True).items()}
    png = hostile.good_png(512)
    out["not an image (text)"] = (b"GET / HTTP/1.1\r\n" * 64, "x.png", False)
    out["empty file"] = (b"", "empty.png", False)
    out["truncated PNG"] = (png[: len(png) // 2], "cut.png", False)
    out["legit 4000 x 3000 JPEG"] = (legit("JPEG"), "big.jpg", True)
    out["legit 4000 x 3000 PNG"] = (legit("PNG"), "big.png", True)
    return out


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return
            time.sleep(0.01)


def post(base: str, data: bytes, name: str, timeout: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        res = httpx.post(f"{base}/predict", params={"overlay": "false"}, files={"file": (name, data)}, timeout=timeout)
    except httpx.HTTPError as exc:
        return 0, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0
    detail = res.json().get("detail", "") if res.headers.get("content-type", "").startswith("application/json") else ""
    return res.status_code, str(detail) if res.status_code != 200 else res.json()["label"], time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--clients", type=int, default=8, help="threads posting at once in the burst")
    parser.add_argument("--copies", type=int, default=4, help="copies of every case in the burst")
    parser.add_argument("--server-threads", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--max-extra-mb", type=float, default=1024.0, help="allowed peak above the idle server")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="only the cases whose name contains TEXT (repeatable), e.g. --only legit")
    args = parser.parse_args()

    corpus = {k: v for k, v in cases().items() if not args.only or any(t in k for t in args.only)}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    failures: list[str] = []
    with tempfile.NamedTemporaryFile("w+", prefix="attack_serve_", suffix=".log", delete=False) as log:
        proc = start_server(args.run_dir, port, args.server_threads, 1, log)
        try:
            for _ in range(3):
                httpx.post(f"{base}/predict", files={"file": ("w.png", hostile.good_png(512))}, timeout=60)
            time.sleep(1.0)
            idle = rss_mb(proc.pid)
            sampler = Sampler(proc.pid)
            sampler.start()
            print(f"{'case':<48} {'bytes':>11} {'status':>6} {'s':>6}  answer")
            for case, (data, name, image) in corpus.items():
                status, answer, seconds = post(base, data, name, args.timeout)
                print(f"{case:<48} {len(data):>11} {status:>6} {seconds:>6.2f}  {answer[:110]}")
                if status >= 500 or status == 0 or (status == 200) != image:
                    failures.append(f"{case}: {status} {answer[:80]}")
            single_peak = sampler.peak
            burst = [(case, *v) for case, v in corpus.items() for _ in range(args.copies)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                results = list(pool.map(lambda c: (c[0], c[3], post(base, c[1], c[2], args.timeout)), burst))
            counts: dict[tuple[str, int], int] = {}
            for case, image, (status, answer, _) in results:
                counts[(case, status)] = counts.get((case, status), 0) + 1
                if status == 0 or status >= 500 or (status == 200) != image:
                    failures.append(f"burst {case}: {status} {answer[:80]}")
            print(f"\nburst: {len(burst)} requests from {args.clients} clients in {time.perf_counter() - t0:.1f} s")
            for (case, status), n in sorted(counts.items()):
                print(f"  {case:<48} {status:>4} x{n}")
            time.sleep(1.0)
            sampler.stop.set()
            health = httpx.get(f"{base}/health", timeout=10).status_code
            after = rss_mb(proc.pid)
            hwm = rss_mb(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except Exception:
                proc.kill()
    peak = sampler.peak
    print(f"\nserver resident memory: idle {idle:.0f} MB, peak one by one {single_peak:.0f} MB, peak overall "
          f"{peak:.0f} MB (+{peak - idle:.0f} MB; VmHWM {hwm:.0f} MB incl. warm-up), after {after:.0f} MB; "
          f"/health after: {health}")
    if health != 200:
        failures.append(f"/health after the attack: {health}")
    if peak - idle > args.max_extra_mb:
        failures.append(f"peak {peak - idle:.0f} MB above idle, more than {args.max_extra_mb:.0f} MB")
    for f in failures:
        print("FAIL", f)
    print("no 5xx, no 200 for a non-image, healthy afterwards" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
