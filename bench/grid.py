"""Training-speed grid: every model x {fp32 NCHW, bf16 NCHW, bf16 channels_last, + torch.compile}, as Markdown.

Each cell is one `lungxray bench train --json` in a fresh process (so compilation caches and thread pools never
leak between cells), timed through the real training step; with `--rounds N` the cells are run N times
interleaved and the median of their medians is reported (the best step is the best of all rounds). The
machine's peak (large matmul, fp32 and bf16) is measured once first; `--keras-python` also runs
bench/keras_seed.py (the seed's Keras stack) in that interpreter. The CPU is shared, so each cell reports the
median and the best step and the load average range it ran under.

    .venv/bin/python bench/grid.py --rounds 3 --out grid.md --keras-python /tmp/tfvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from lungxray.runtime import cpu_features
from lungxray.speed.bench import peak_flops

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> bench train flags
    "fp32": ["--precision", "fp32", "--no-channels-last", "--no-compile"],
    "fp32+CL": ["--precision", "fp32", "--channels-last", "--no-compile"],
    "bf16": ["--precision", "bf16", "--no-channels-last", "--no-compile"],
    "bf16+CL": ["--precision", "bf16", "--channels-last", "--no-compile"],
    "bf16+CL+compile": ["--precision", "bf16", "--channels-last", "--compile"],
    "auto": ["--no-compile"],  # what `lungxray train` runs here: the measured runtime choice (lungxray.autotune)
}


def run_cell(arch: str, variant: str, members: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "lungxray", "bench", "train", "--arch", arch, "--members", str(members),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, "--json", "--no-peak", *VARIANTS[variant]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout)


def keras_cell(python: str, args: argparse.Namespace) -> dict:
    cmd = [python, str(ROOT / "bench/keras_seed.py"), "--batch-size", str(args.batch_size), "--steps",
           str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["seed_cnn", "seed_cnn_bn", "compact_cnn", "resnet_small"])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--members", nargs="*", type=int, default=[1])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions; the median is reported")
    ap.add_argument("--keras-python", help="interpreter with TensorFlow (a throwaway venv) for the Keras row")
    ap.add_argument("--out", type=Path, help="also write the Markdown here")
    args = ap.parse_args()

    dev = torch.device(args.device)
    peaks = {"fp32": peak_flops(dev, torch.float32), "bf16": peak_flops(dev, torch.bfloat16)}
    lines = [
        f"Peak (best large matmul): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s "
        f"on {args.device}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
        f"{cpu_features()['cpu']}, {cpu_features()['isa']}.",
        "",
        "| model | K | variant | img/s (median) | img/s (best step) | GFLOP/s | % of peak | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    if args.keras_python:
        r = keras_cell(args.keras_python, args)
        row = (f"| seed CNN, Keras + ImageDataGenerator | 1 | fp32 | {r['images_per_second']:.1f} | "
               f"{r['images_per_second_best']:.1f} | | | {r['load_average']} |" if "error" not in r
               else f"| seed CNN, Keras | 1 | fp32 | error: {r['error']} | | | | |")
        lines.append(row)
        print(row, flush=True)
    cells = [(arch, k, v) for arch in args.models for k in args.members for v in args.variants]
    runs: dict[tuple, list[dict]] = {c: [] for c in cells}
    for _ in range(args.rounds):  # interleaved, so a burst of load hits every cell alike
        for cell in cells:
            arch, k, variant = cell
            runs[cell].append(run_cell(arch, variant, k, args))
    for (arch, k, variant), results in runs.items():
        good = [r for r in results if "error" not in r]
        if not good:
            row = f"| {arch} | {k} | {variant} | error: {results[0]['error']} | | | | |"
        else:
            rate = statistics.median(r["images_per_second"] for r in good)
            best = max(r["images_per_second_best"] for r in good)
            gflops = 3 * good[0]["forward_gflops_per_image"] * rate
            frac = gflops * 1e9 / peaks["bf16" if good[0]["dtype"] == "bf16" else "fp32"]
            loads = "-".join(f"{x:.1f}" for x in sorted({min(r["load_average"] for r in good),
                                                        max(r["load_average"] for r in good)}))
            name = variant if variant != "auto" else (f"auto: {good[0]['dtype']}"
                                                      f"{'+CL' if good[0]['channels_last'] else ''}")
            row = (f"| {arch} | {k} | {name} | {rate:.1f} | {best:.1f} | {gflops:.0f} | {100 * frac:.0f}% | "
                   f"{loads} |")
        lines.append(row)
        print(row, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
