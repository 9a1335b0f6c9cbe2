"""Round-robin A/B of seed_cnn's fused kernels (lungxray/models/kernels/fused_stem.py) against the eager modules.

    .venv/bin/python bench/fused_stem_ab.py [--steps 12] [--warmup 3] [--block-rounds 20] \
        [--variants fused:8 stem:8 eager:8]

On a shared CPU only comparisons made side by side mean anything, so every variant runs one step in turn, in one
process, for many rounds, and the medians are compared. Two parts:

1. The first block alone, forward + backward, batch 32, 1x256x256 channels_last input, bf16 autocast (what the
   training step runs): eager `ConvBlock` against `fused_stem`; then the max-pool + ReLU of blocks 2 and 3 alone
   (their bf16 channels_last conv outputs, one micro-batch of 8): eager against `fused_pool_relu`.
2. The real training step, `train.train_one_epoch` on one batch at a time (gather, `seed` augmentation, forward
   under autocast, backward, fused AdamW), seed_cnn at batch 32, 256x256, one model per variant built from the
   same seed. A variant is `KIND:M[:mmap]`, M the micro-batch of the conv blocks (0: whole batch) and KIND
   `fused` (both kernels: first block, pool + ReLU of blocks 2-3), `stem` (the first block's kernel only) or
   `eager`. Like the `lungxray` command, the script keeps freed memory in glibc's heap
   (`runtime.reuse_freed_memory`); `:mmap` restores glibc's default thresholds around that variant's steps, so
   `fused:8 fused:8:mmap` measures what that setting is worth.

Prints median step times, images/s and the ratios against the last variant, with the load average.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what the lungxray command uses (docs/performance.md)

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lungxray.config import TrainConfig
from lungxray.models.kernels.fused_stem import fused_pool_relu, fused_stem, kernel_info
from lungxray.models.nets import ConvBlock, build_model
from lungxray.runtime import resolve_precision, reuse_freed_memory, set_threads
from lungxray.speed.bench import _synthetic_images
from lungxray.training.loop import EpochInputs, TrainState, make_optimizer, train_one_epoch
from lungxray.training.plan import MemberPlan
from lungxray.transforms.geometric import Augmenter, resolve_params

HEAP_LIMIT = 1 << 30  # what the lungxray command sets
GLIBC_DEFAULT_THRESHOLD = 128 * 1024


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def _round_robin(fns: dict[str, Any], rounds: int, title: str, reset: Any = None) -> None:
    """Warm up, then time each function in turn for `rounds` rounds; print medians, bests and eager / fused."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(3):
        for fn in fns.values():
            fn()
    loads = [_load()]
    for _ in range(rounds):
        for name, fn in fns.items():
            if reset is not None:
                reset()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    loads.append(_load())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{title}, {rounds} rounds (load {loads[0]} -> {loads[1]}):")
    for k, v in med.items():
        print(f"  {k:<6} median {1e3 * v:7.2f} ms   best {1e3 * min(times[k]):7.2f} ms")
    print(f"  eager / fused = {med['eager'] / med['fused']:.2f}x")


def bench_block(rounds: int, batch: int, size: int, members: int) -> None:
    torch.manual_seed(0)
    block = ConvBlock(1, 32, 3, members, batch_norm=False, pool=(2, 2, 0)).to(memory_format=torch.channels_last)
    conv = block.conv
    x = torch.randn(batch, members, size, size).contiguous(memory_format=torch.channels_last)
    out_size = (size - 2) // 2
    g = torch.randn(batch, members * 32, out_size, out_size).to(torch.bfloat16)
    g = g.contiguous(memory_format=torch.channels_last)

    def eager() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(x)
        y.backward(g)

    def fused() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fused_stem(x, conv.weight, conv.bias, conv.groups)
        y.backward(g)

    def reset() -> None:
        conv.weight.grad = conv.bias.grad = None

    _round_robin({"fused": fused, "eager": eager}, rounds,
                 f"first block alone, forward + backward, batch {batch}, {members}x{size}x{size} channels_last, "
                 "bf16 autocast", reset)


def bench_pool(rounds: int, batch: int, size: int, members: int) -> None:
    """max-pool 2x2 + ReLU of blocks 2 and 3 (forward + backward) on their conv outputs' shapes."""
    torch.manual_seed(0)
    shapes, s = [], (size - 2) // 2
    for c in (64, 128):
        shapes.append((batch, members * c, s - 2, s - 2))
        s = (s - 2) // 2
    xs = [torch.randn(sh).to(torch.bfloat16).contiguous(memory_format=torch.channels_last) for sh in shapes]
    gs = [torch.randn(b, c, h // 2, w // 2).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
          for b, c, h, w in shapes]

    def run(fn: Any) -> None:
        for x, g in zip(xs, gs, strict=True):
            x = x.detach().requires_grad_()
            fn(x).backward(g)

    fns = {"fused": lambda: run(fused_pool_relu), "eager": lambda: run(lambda t: F.relu(F.max_pool2d(t, 2)))}
    _round_robin(fns, rounds, f"max-pool + ReLU of blocks 2-3 alone, forward + backward, "
                 f"{' and '.join(str(sh) for sh in shapes)} bf16 channels_last")


class _Variant:
    def __init__(self, spec: str, batch: int, size: int, cfg: TrainConfig, images: torch.Tensor) -> None:
        kind, _, rest = spec.partition(":")
        micro, _, heap = rest.partition(":")
        if heap not in ("", "mmap"):
            raise SystemExit(f"variant {spec!r}: the only suffix is ':mmap'")
        self.mmap_default = heap == "mmap"
        if kind not in ("fused", "stem", "eager"):
            raise SystemExit(f"variant {spec!r}: expected fused:M, stem:M or eager:M")
        self.name, self.batch = spec, batch
        torch.manual_seed(0)
        self.model: Any = build_model("seed_cnn", image_size=size).to(memory_format=torch.channels_last)
        self.model.fused = kind in ("fused", "stem")
        self.model.fused_pool = kind == "fused"
        self.model.micro_batch = int(micro or 0)
        self.cfg = cfg
        self.optimizer = make_optimizer(self.model, cfg)
        self.augmenter = Augmenter(resolve_params("seed"), seed=1, device=torch.device("cpu"))
        self.state = TrainState(batch_size=batch, member_stopped=[False])
        self.rng = np.random.default_rng(0)
        self.images = images
        self.labels = torch.arange(len(images)) % 3
        self.start = 0
        self.times: list[float] = []

    def step(self, amp_dtype: torch.dtype, record: bool) -> None:
        n = len(self.images)
        order = (np.arange(self.batch) + self.start) % n
        self.start += self.batch
        plan = MemberPlan(order[None], np.ones((1, n), dtype=bool), bootstrap=False)
        reuse_freed_memory(GLIBC_DEFAULT_THRESHOLD if self.mmap_default else HEAP_LIMIT)
        t0 = time.perf_counter()
        train_one_epoch(self.model, EpochInputs(self.images, self.labels, plan, self.augmenter, amp_dtype=amp_dtype),
                        self.optimizer, self.state, self.cfg, self.rng)
        if record:
            self.times.append(time.perf_counter() - t0)


def bench_step(variants: list[str], steps: int, warmup: int, batch: int, size: int) -> None:
    cfg = TrainConfig(batch_size=batch)
    amp_dtype = resolve_precision(torch.device("cpu"), cfg.precision)
    images = _synthetic_images(256, size, torch.device("cpu"))
    runs = [_Variant(v, batch, size, cfg, images) for v in variants]
    loads = [_load()]
    for i in range(warmup + steps):
        for r in runs:
            r.step(amp_dtype, record=i >= warmup)
    loads.append(_load())
    print(f"\ntraining step (train_one_epoch, one batch per call), seed_cnn batch {batch}, {size}x{size}, "
          f"{'bf16' if amp_dtype == torch.bfloat16 else 'fp32'} autocast, channels_last={cfg.channels_last}, "
          f"{steps} steps each after {warmup} warm-up, alternating (load {loads[0]} -> {loads[1]}):")
    med = {r.name: statistics.median(r.times) for r in runs}
    base = runs[-1].name
    for r in runs:
        m = med[r.name]
        print(f"  {r.name:<9} median {1e3 * m:7.1f} ms  {batch / m:6.1f} img/s   best {1e3 * min(r.times):7.1f} ms"
              f"   {med[base] / m:.2f}x vs {base}")


def check_same_loss(size: int = 64) -> None:
    """Sanity: the fused and eager models give the same forward on one batch (fp32, no dropout)."""
    torch.manual_seed(0)
    a = build_model("seed_cnn", image_size=size, width=8).train()
    b = build_model("seed_cnn", image_size=size, width=8).train()
    b.load_state_dict(a.state_dict())
    a.fused, b.fused = True, False
    a.dropout.p = b.dropout.p = 0.0
    x = torch.randn(4, 1, size, size)
    diff = (F.softmax(a(x), -1) - F.softmax(b(x), -1)).abs().max().item()
    print(f"fused vs eager forward on a {size}x{size} batch: max |softmax difference| {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--block-rounds", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--members", type=int, default=1, help="packed members for the block-alone part")
    ap.add_argument("--variants", nargs="+", default=["fused:8", "stem:8", "eager:8"],
                    help="fused:M / stem:M / eager:M (M = micro-batch, 0 = whole batch); "
                         "ratios against the last")
    ap.add_argument("--skip-block", action="store_true")
    ap.add_argument("--skip-step", action="store_true")
    args = ap.parse_args()
    set_threads(0)
    info = kernel_info()
    if not info["available"]:
        raise SystemExit(f"fused kernel unavailable: {info['reason']}")
    print(f"kernel {info['path']} (compiled in this run: {info['compile_s']}); {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    check_same_loss()
    if not args.skip_block:
        bench_block(args.block_rounds, args.batch_size, args.image_size, args.members)
        bench_pool(args.block_rounds, 8, args.image_size, args.members)
    if not args.skip_step:
        bench_step(args.variants, args.steps, args.warmup, args.batch_size, args.image_size)


if __name__ == "__main__":
    main()
