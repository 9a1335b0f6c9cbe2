"""Packed vs sequential ensemble training: wall time per epoch and member-images per second for K members.

    python bench/ensemble_packed_vs_sequential.py [--arch compact_cnn] [--members 1 5 10] [--steps 12]

Packed: one grouped network trains all K members in one pass (`bench_train(members=K)`). Sequential: K plain
networks one after another, so an epoch costs K times a single member's epoch (`bench_train(members=1)`).
Both go through the real training step (`train.train_one_epoch`); the epoch is the reference training pool
(251 images). Prints a Markdown table; run on an otherwise idle machine for absolute figures.
"""

from __future__ import annotations

import argparse
import os

from lungxray.bench import bench_train

POOL = 251  # training images in the reference dataset's train/ split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="compact_cnn")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    single = bench_train(args.arch, args.batch_size, args.steps, warmup=3, members=1, with_peak=False)
    rate_1 = single["images_per_second"]
    print(f"load average {os.getloadavg()[0]:.1f}; {args.arch}, batch {args.batch_size} per member, 256x256")
    print("\n| K | packed s/epoch | packed img/s | sequential s/epoch | sequential img/s | packed speed-up |")
    print("|---|---|---|---|---|---|")
    for k in args.members:
        packed = single if k == 1 else bench_train(
            args.arch, args.batch_size, args.steps, warmup=3, members=k, with_peak=False)
        rate_k = packed["images_per_second"]
        packed_epoch, seq_epoch = POOL * k / rate_k, POOL * k / rate_1
        print(f"| {k} | {packed_epoch:.1f} | {rate_k:.0f} | {seq_epoch:.1f} | {rate_1:.0f} | "
              f"{seq_epoch / packed_epoch:.2f}x |")


if __name__ == "__main__":
    main()
