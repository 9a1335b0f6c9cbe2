"""Training-step throughput of every registered model: fp32 NCHW vs bf16 autocast + channels_last.

One step = forward + backward + AdamW step on a random batch. Reports member-images (B*K per step) per second of
wall time and per second of process CPU time (medians of --steps timed steps after --warmup), and the bf16 path's
forward+backward GFLOP/s per CPU-second (3x the forward FLOPs). On a shared machine the wall figure depends on the
neighbours; with --threads 1 the CPU-time figure does not (much), so compare variants with that.

    python bench/bench_models.py --models compact_cnn --members 1 5
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from lungxray.models.nets import build_model, count_flops, list_models


def step_times(
    name: str, members: int, bf16: bool, batch: int, size: int, warmup: int, steps: int
) -> tuple[float, float]:
    """Median (wall, CPU) seconds of one training step."""
    torch.manual_seed(0)
    model = build_model(name, members=members, image_size=size)
    x = torch.randn(batch, members, size, size)
    y = torch.randint(0, 3, (batch * members,))
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    walls, cpus = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        with ctx:
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, 3), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list_models())
    ap.add_argument("--members", nargs="*", type=int, default=[1])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0 = torch's default")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.size}px")
    print("| model | K | GFLOPs | wall img/s fp32 | wall img/s bf16+CL | CPU img/s fp32 | CPU img/s bf16+CL | "
          "bf16 speed-up | GFLOP/CPU-s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        flops = count_flops(build_model(name, image_size=args.size), args.size)
        for k in args.members:
            n = args.batch * k
            (w32, c32), (w16, c16) = (
                step_times(name, k, bf16, args.batch, args.size, args.warmup, args.steps) for bf16 in (False, True)
            )
            cells = [name, k, f"{flops / 1e9:.3f}", f"{n / w32:.1f}", f"{n / w16:.1f}", f"{n / c32:.1f}"]
            cells += [f"{n / c16:.1f}", f"{c32 / c16:.1f}x", f"{3 * flops * n / c16 / 1e9:.0f}"]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
