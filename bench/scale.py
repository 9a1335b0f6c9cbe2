"""Cost against dataset size: epoch time and memory for the training set replicated 1x, 4x, 16x (Markdown).

Each size runs in a fresh process (so its peak memory is its own) through `bench.bench_epochs`, i.e. real
`fit()` epochs with augmentation and validation. Resident memory is read after every epoch: it should grow with
the dataset (its uint8 bytes) and not with the number of epochs. Uses the real training split when found
(`--data`, $LUNGXRAY_DATA, ../shared/data/covid19-dataset), else synthetic images of the same size.

    .venv/bin/python bench/scale.py --factors 1 4 16 --epochs 3 --out docs/bench_scale.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def training_images(data: str | None, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, description) of the training split, or synthetic stand-ins when no dataset is found."""
    from lungxray.io.dataset import load_dataset
    from lungxray.training.pipeline import find_data

    try:
        ds = load_dataset(find_data(data), size=size)
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (251, size, size), dtype=np.uint8), np.arange(251) % 3, "synthetic 251"
    train = np.flatnonzero(np.isin(ds.splits, ["train", "all"]))
    return ds.images[train], ds.labels[train], f"{ds.root} train/ ({len(train)} images)"


def one(args: argparse.Namespace) -> None:
    """Child process: one replication factor, JSON on stdout."""
    from lungxray.speed.bench import bench_epochs

    images, labels, source = training_images(args.data, args.size)
    images, labels = np.tile(images, (args.one, 1, 1)), np.tile(labels, args.one)
    records = bench_epochs(images, labels, args.arch, args.epochs, args.batch_size, args.device)
    print(json.dumps({"factor": args.one, "images": len(images), "source": source, "epochs": records,
                      "load_average": round(os.getloadavg()[0], 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--factors", nargs="*", type=int, default=[1, 4, 16])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--arch", default="compact_cnn")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args)
        return
    lines = [
        f"{args.arch}, batch {args.batch_size}, {args.size}px, {args.epochs} epochs, {args.device}",
        "",
        "| replication | images | epoch time (s, median of epochs 2+) | train img/s | RSS after epoch 1 -> last (MB) "
        "| peak RSS (MB) | load |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for factor in args.factors:
        cmd = [sys.executable, __file__, "--one", str(factor), "--epochs", str(args.epochs), "--arch", args.arch,
               "--batch-size", str(args.batch_size), "--size", str(args.size), "--device", args.device]
        if args.data:
            cmd += ["--data", args.data]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            row = f"| {factor}x | error: {(proc.stderr.strip().splitlines() or ['failed'])[-1]} | | | | | |"
        else:
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            ep = r["epochs"]
            timed = ep[1:] or ep  # the first epoch also pays one-off kernel set-up
            row = (f"| {factor}x | {r['images']} | {np.median([e['seconds'] for e in timed]):.1f} | "
                   f"{np.median([e['images_per_second'] for e in timed]):.0f} | "
                   f"{ep[0]['rss_mb']:.0f} -> {ep[-1]['rss_mb']:.0f} | {ep[-1]['peak_rss_mb']:.0f} | "
                   f"{r['load_average']} |")
        lines.append(row)
        print(row, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
