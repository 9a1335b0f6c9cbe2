"""Inference speed of a bundle: PyTorch vs ONNX Runtime, batch-1 latency (p50/p99) and batch-64 throughput.

Both engines are timed on the same path a user calls, `predictor.predict_images(uint8 images)` (normalisation,
all members, ensembling, calibration, uncertainty), on random pixels (speed does not depend on the content).
Latency does not depend on the weights either, so `--arch` benchmarks an untrained bundle without training one.

    python bench/bench_predict.py runs/reference
    python bench/bench_predict.py --arch compact_cnn --size 256 --members 1 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lungxray.inference.bundle import save_bundle
from lungxray.inference.engines import load_predictor
from lungxray.inference.onnx import ONNX_NAME, OnnxPredictor
from lungxray.inference.predictor import Predictor
from lungxray.models.nets import build_model
from lungxray.runtime import INPUT_MEAN, INPUT_STD


def random_bundle(folder: Path, arch: str, size: int, members: int) -> Path:
    """An untrained bundle with the reference input contract (for timing only)."""
    torch.manual_seed(0)
    model = build_model(arch, members=members, image_size=size).eval()
    meta = {"name": f"bench-{arch}", "classes": ["covid", "normal", "pneumonia"], "arch": arch,
            "arch_args": {"image_size": size}, "members": members, "temperature": 1.0, "refer_threshold": 0.5,
            "input": {"size": size, "channels": 1, "mean": INPUT_MEAN, "std": INPUT_STD}}
    return save_bundle(folder, model, meta)


def time_engine(predictor: Predictor, size: int, single: int, batches: int, batch: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, size, size), dtype=np.uint8)
    many = rng.integers(0, 256, (batch, size, size), dtype=np.uint8)
    for _ in range(5):  # warm-up: allocator, oneDNN primitive caches, ORT arenas
        predictor.predict_images(one)
    predictor.predict_images(many)
    lat = []
    for _ in range(single):
        t0 = time.perf_counter()
        predictor.predict_images(one)
        lat.append(time.perf_counter() - t0)
    walls = []
    for _ in range(batches):
        t0 = time.perf_counter()
        predictor.predict_images(many)
        walls.append(time.perf_counter() - t0)
    lat_ms = sorted(1000 * x for x in lat)
    return {"p50_ms": statistics.median(lat_ms), "p99_ms": lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))],
            "throughput": batch / statistics.median(walls)}


def bench(run_dir: Path, engines: list[str], single: int, batches: int, batch: int, threads: int = 0) -> None:
    for engine in engines:
        predictor = load_predictor(run_dir, "cpu", engine)
        if isinstance(predictor, OnnxPredictor) and threads:  # the torch thread count, for like-for-like figures
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            predictor.session = ort.InferenceSession(str(run_dir / ONNX_NAME), opts,
                                                     providers=["CPUExecutionProvider"])
        size = int(predictor.meta["input"]["size"])
        r = time_engine(predictor, size, single, batches, batch)
        print(f"{predictor.meta.get('arch')} K={predictor.bundle.members} {size}px {engine:5s}  batch-1 latency "
              f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms   batch-{batch} {r['throughput']:7.1f} img/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", help="a trained bundle (or use --arch)")
    ap.add_argument("--arch", help="benchmark an untrained bundle of this architecture instead")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--members", type=int, nargs="+", default=[1])
    ap.add_argument("--engines", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    ap.add_argument("--single", type=int, default=200, help="timed batch-1 calls")
    ap.add_argument("--batches", type=int, default=5, help="timed batch calls")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads of both engines (0: defaults)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.run_dir:
        bench(Path(args.run_dir), args.engines, args.single, args.batches, args.batch, args.threads)
        return
    if not args.arch:
        ap.error("give a run folder or --arch")
    for k in args.members:
        with tempfile.TemporaryDirectory() as tmp:
            bench(random_bundle(Path(tmp), args.arch, args.size, k), args.engines, args.single, args.batches,
                  args.batch, args.threads)


if __name__ == "__main__":
    main()
