"""Packed vs sequential ensemble training: wall time per epoch and member-images per second for K members.

    python bench/ensemble_packed_vs_sequential.py [--arch compact_cnn] [--members 1 5 10] [--steps 12] [--rounds 3]

Packed: one grouped network trains all K members in one pass (`bench_train(members=K)`). Sequential: K plain
networks one after another, so an epoch costs K times a single member's epoch (`bench_train(members=1)`).
Both go through the real training step (`train.train_one_epoch`); the epoch is the reference training pool
(251 images). Each round times K = 1 and then every packed K back to back, so a load change between
measurements hits both sides; the table gives the median over rounds. Prints Markdown; run on an otherwise idle
machine for absolute figures.
"""

from __future__ import annotations

import argparse
import os
import statistics

from lungxray.speed.bench import bench_train

POOL = 251  # training images in the reference dataset's train/ split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="compact_cnn")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rates: dict[int, list[float]] = {k: [] for k in {1, *args.members}}
    loads = []
    for _ in range(args.rounds):
        for k in sorted(rates):
            r = bench_train(args.arch, args.batch_size, args.steps, warmup=3, members=k, with_peak=False)
            rates[k].append(r["images_per_second"])
            loads.append(os.getloadavg()[0])
    rate = {k: statistics.median(v) for k, v in rates.items()}
    print(f"load average {min(loads):.1f}-{max(loads):.1f}; {args.arch}, batch {args.batch_size} per member, "
          f"256x256, median of {args.rounds} rounds")
    print("\n| K | packed s/epoch | packed member-img/s | sequential s/epoch | sequential img/s | packed speed-up |")
    print("|---|---|---|---|---|---|")
    for k in args.members:
        packed_epoch, seq_epoch = POOL * k / rate[k], POOL * k / rate[1]
        print(f"| {k} | {packed_epoch:.1f} | {rate[k]:.0f} | {seq_epoch:.1f} | {rate[1]:.0f} | "
              f"{seq_epoch / packed_epoch:.2f}x |")

if __name__ == "__main__":
    main()
