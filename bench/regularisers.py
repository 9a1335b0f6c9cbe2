"""Cost of the optional regularisers per training step of the reference shape (32 images x 10 members, 256 px).

Prints milliseconds per call (median of `--repeats` timed calls after 2 warm-ups) for the geometric
augmentation alone, the same with random erasing (`augment.erase_prob`), and mixup (`train.mixup`), so each
can be compared with a whole step (about 0.9 s on the 2-core machine: 320 member-images at ~359/s).

    python bench/regularisers.py [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from lungxray.speed.bench import latencies
from lungxray.training.loop import mixup_batch
from lungxray.transforms.geometric import PRESETS, Augmenter


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return float(np.median(latencies(fn, repeats, warmup=2))) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--members", type=int, default=10)
    p.add_argument("--size", type=int, default=256)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    x = torch.randn(a.batch * a.members, 1, a.size, a.size)
    intense = PRESETS["intense"]
    plain = Augmenter(intense, seed=0)
    erasing = Augmenter(dataclasses.replace(intense, erase_prob=0.5), seed=0)
    xb = x.view(a.batch, a.members, a.size, a.size)
    y = torch.randint(0, 3, (a.batch, a.members))
    rng = np.random.default_rng(0)
    rows = {
        "intense geometric augmentation": median_ms(lambda: plain(x), a.repeats),
        "the same + random erasing (p 0.5)": median_ms(lambda: erasing(x), a.repeats),
        "mixup (alpha 0.2)": median_ms(lambda: mixup_batch(xb, y, 0.2, rng, a.batch, 0), a.repeats),
    }
    print(f"{a.batch} images x {a.members} members, {a.size} px, {a.threads} threads; ms per step (median)")
    for name, ms in rows.items():
        print(f"  {name:36s} {ms:7.1f}")


if __name__ == "__main__":
    main()
