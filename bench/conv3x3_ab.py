"""Layer-level A/B of the fp32 3x3 convolution passes: this project's kernels (`models.kernels.conv3x3`: direct
loops, Winograd F(2x2, 3x3) and F(4x4, 3x3)) against oneDNN.

For the layers of seed_cnn (micro-batches of 8) and of the reference's compact_cnn (10 packed members, batch 32),
each pass (forward, input gradient, weight gradient) is timed both ways, interleaved, median of --rounds, on the
same random data, after one untimed call each. Prints a Markdown table with GFLOP/s per pass, the CPU and its ISA;
this is the measurement `plan_for` makes once per shape at training time (there: best of 3).

    .venv/bin/python bench/conv3x3_ab.py --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lungxray.models.kernels import conv3x3 as c3
from lungxray.runtime import cpu_features, reuse_freed_memory

# (batch, in channels, out channels per group, input size, groups, padding): seed_cnn's conv 2 and 3 on slices of 8
# images, compact_cnn's four 3x3 layers with 10 members
LAYERS = [(8, 32, 64, 127, 1, 0), (8, 64, 128, 62, 1, 0), (32, 16, 32, 64, 10, 1), (32, 32, 64, 32, 10, 1),
          (32, 64, 128, 16, 10, 1), (32, 128, 128, 16, 10, 1)]


def _flops(n: int, ci: int, co: int, size: int, groups: int, pad: int) -> float:
    out = size + 2 * pad - 2
    return 2.0 * n * out * out * groups * co * ci * 9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the `lungxray` command does
    if not c3.conv3x3_available():
        raise SystemExit("the conv3x3 kernel is unavailable here (needs gcc, x86-64 with AVX2 and FMA)")
    feats = cpu_features()
    print(f"{feats['cpu']}, {feats['isa']}, {torch.get_num_threads()} threads, median of {args.rounds} rounds\n")
    impls = ("onednn", "direct", "winograd", "winograd4")
    print("| layer | pass | oneDNN ms (GFLOP/s) | direct ms (GFLOP/s) | Winograd F(2x2) ms (GFLOP/s*) | "
          "Winograd F(4x4) ms (GFLOP/s*) | best against oneDNN |")
    print("|---|---|---|---|---|---|---|")
    for n, ci, co, size, groups, pad in LAYERS:
        weight = 0.1 * torch.randn(groups * co, ci, 3, 3, generator=torch.Generator().manual_seed(1))
        fns = c3.candidates((n, groups * ci, size, size), weight, pad, groups)
        flops = _flops(n, ci, co, size, groups, pad)
        for fn in fns.values():
            fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.rounds):
            for key, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        layer = f"{n}x{groups * ci}->{groups * co} {size}px p{pad}" + (f" g{groups}" if groups > 1 else "")
        for stage in ("forward", "input_grad", "weight_grad"):
            med = {i: statistics.median(times[f"{stage}/{i}"]) for i in impls if f"{stage}/{i}" in times}
            cells = [f"{1e3 * med[i]:.1f} ({flops / med[i] / 1e9:.0f})" if i in med else "-" for i in impls]
            best = min((i for i in med if i != "onednn"), key=med.__getitem__)
            print(f"| {layer} | {stage.replace('_', ' ')} | {' | '.join(cells)} | "
                  f"{best} {med['onednn'] / med[best]:.2f}x |", flush=True)
    print("\n*: direct-convolution FLOPs over the time (F(2x2, 3x3) does 2.25x fewer multiplies, F(4x4, 3x3) 4x)")


if __name__ == "__main__":
    main()
