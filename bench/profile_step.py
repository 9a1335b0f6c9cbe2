"""Where a training step's time goes: torch.profiler around `bench.bench_train` (the real training step).

Prints the share of self time per kind of work (convolution, max-pool, augmentation, optimizer, dtype casts)
and the operators with the most self time, grouped by input shape.

Read the per-operator figures as relative, not as the real step's: on the VMs here the first touch of a fresh page
costs ~6 us, and a profiled run probably touches pages the steady step reuses (not verified: a seed_cnn
dense-weight cast read 55 ms per call here against 2.5-3 ms timed in place; docs/performance.md, "session 14").
The rate printed is the step's under the profiler, slower than `lungxray bench train`'s.

    .venv/bin/python bench/profile_step.py --arch seed_cnn --steps 4
"""

from __future__ import annotations

import argparse

from torch.profiler import ProfilerActivity, profile

from lungxray.runtime import reuse_freed_memory
from lungxray.speed.bench import bench_train

KINDS = {  # label -> substrings of operator names
    "convolution": ("convolution",),
    "max-pool (+ its gradient's zero fill)": ("max_pool", "fill_"),
    "ReLU": ("threshold_backward", "relu", "clamp_min"),
    "augmentation (grid_sample)": ("grid_sampler",),
    "optimizer": ("adam", "sgd"),
    "dtype casts": ("copy_", "_to_copy"),
    "dense layers": ("aten::mm", "aten::addmm", "bmm"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="seed_cnn")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--members", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rows", type=int, default=20)
    args = ap.parse_args()
    reuse_freed_memory()  # as the `lungxray` command does
    for _ in range(2):  # warm: the kernels' plans, and a heap that has reached its steady state (no page faults)
        bench_train(args.arch, args.batch_size, steps=2, warmup=1, members=args.members, with_peak=False)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        r = bench_train(args.arch, args.batch_size, steps=args.steps, warmup=0, members=args.members,
                        with_peak=False)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{r['arch']} batch {r['batch_size']} {r['dtype']}: {r['images_per_second']:.1f} img/s under the "
          f"profiler (load {r['load_average']}); share of self time:")
    for label, keys in KINDS.items():
        t = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys))
        print(f"  {label:<40} {100 * t / max(total, 1):5.1f}%")
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=45, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
