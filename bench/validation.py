"""The per-epoch validation of the reference shape: each member on its own out-of-bag images, packed side by side
(`loop.evaluate_members`, since session 13), against every member on the union of them (what it did before).

compact_cnn, 10 members, 256 px, synthetic images in the training pool's class counts (111/70/70), the reference's
bootstrap plan, the training batch (32); interleaved rounds in one process, seconds per validation. Prints the
CPU and its ISA.

    .venv/bin/python bench/validation.py --rounds 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lungxray.models.nets import build_model
from lungxray.runtime import cpu_features
from lungxray.training.loop import evaluate_members, predict_members
from lungxray.training.plan import plan_members


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--members", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("compact_cnn", members=args.members, image_size=256)
    labels = torch.tensor(np.repeat([0, 1, 2], [111, 70, 70]))
    images = torch.randint(0, 256, (len(labels), 256, 256), dtype=torch.uint8)
    plan = plan_members(labels.numpy(), args.members, bootstrap=True, seed=0)
    union = torch.as_tensor(plan.val_mask).any(0).nonzero().squeeze(1)
    feats = cpu_features()
    print(f"{feats['cpu']}, {feats['isa']}, {torch.get_num_threads()} threads; out-of-bag images per member "
          f"{plan.val_mask.sum(1).tolist()}, union {len(union)}")
    evaluate_members(model, images, labels, plan, torch.float32, 32)  # measures the 3x3 plans once
    for r in range(args.rounds):
        t0 = time.perf_counter()
        evaluate_members(model, images, labels, plan, torch.float32, 32)
        own = time.perf_counter() - t0
        t0 = time.perf_counter()
        predict_members(model, images[union], torch.float32, 32)
        every = time.perf_counter() - t0
        print(f"round {r + 1}: own columns {own:.2f} s, every member on the union {every:.2f} s ({every / own:.2f}x)")


if __name__ == "__main__":
    main()
