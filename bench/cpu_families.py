"""Training speed on this CPU as it is and restricted to AVX2 (an AVX2-only CPU approximated), as Markdown rows.

Why: the defaults must be fast on every CPU the project lands on, not only on the one it was tuned on. Each cell
is one `lungxray bench train --json` in a fresh process; the AVX2 cells run with ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN's
convolutions: its verbose mode, ONEDNN_VERBOSE=1, then names avx2 primitives), ATEN_CPU_CAPABILITY=avx2
(PyTorch's own vectorised operators) and MKL_ENABLE_INSTRUCTIONS=AVX2 (the dense layers' and the peak's GEMM).
Not restricted: the fused C kernels of seed_cnn (built with -march=native) and the core's clock and caches, so
this approximates, not reproduces, an AVX2-only CPU. `auto` cells run what `lungxray train` would choose here
(lungxray.autotune: measured on first use, cached); every row names the CPU, the ISA and the load average.

    .venv/bin/python bench/cpu_families.py --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
CELLS = [  # (label, arch, members, extra flags)
    ("auto", "seed_cnn", 1, []),
    ("fp32, as before (micro-batch 8)", "seed_cnn", 1, ["--precision", "fp32", "--no-autotune"]),
    ("auto", "compact_cnn", 1, []),
    ("auto", "compact_cnn", 10, []),
]


def cell(arch: str, members: int, flags: list[str], env: dict[str, str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "lungxray", "bench", "train", "--arch", arch, "--members", str(members),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--json", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", choices=("native", "avx2"), help="one of the two environments")
    args = ap.parse_args()
    envs = {"native": {}, "avx2": AVX2}
    if args.only:
        envs = {args.only: envs[args.only]}
    print("| CPU | ISA | model | K | cell | settings | member-img/s (best step) | GFLOP/s | peak GFLOP/s | "
          "of peak | load |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for _ in range(args.rounds):  # environments interleaved cell by cell: a burst of load hits both alike
        for label, arch, members, flags in CELLS:
            for env in envs.values():
                r = cell(arch, members, flags, env, args)
                if "error" in r:
                    print(f"| | | {arch} | {members} | {label} | error: {r['error']} | | | | | |", flush=True)
                    continue
                settings = (f"{r['dtype']}, {'CL' if r['channels_last'] else 'NCHW'}, {r['threads']}t"
                            + ("" if r.get("fused") is None else f", fused={r['fused']}, mb={r['micro_batch']}"))
                print(f"| {r['cpu']} | {r['isa']} | {arch} | {members} | {label} | {settings} | "
                      f"{r['images_per_second']:.1f} ({r['images_per_second_best']:.1f}) | {r['achieved_gflops']:.0f}"
                      f" | {r['peak_gflops']:.0f} | {100 * r['fraction_of_peak']:.0f}% | {r['load_average']} |",
                      flush=True)
                if r.get("runtime"):
                    print(f"<!-- {r['runtime']['line']} -->", flush=True)


if __name__ == "__main__":
    main()
