"""The issue's yardstick: `lungxray bench train --arch seed_cnn` against the seed's Keras stack, back to back.

On a shared CPU the load changes from minute to minute, so the two are run alternately for several rounds and
each round's ratio is reported beside the median; TensorFlow lives in a throwaway interpreter (see
bench/keras_seed.py), never in the project's environment. Every row names the CPU and the ISA the kernels may
use (`runtime.cpu_features`: ONEDNN_MAX_CPU_ISA applied, which both oneDNN builds, PyTorch's and TensorFlow's,
honour), and the lungxray side runs what `lungxray train` would on this machine (the measured runtime choice)
unless --precision is given.

    .venv/bin/python bench/vs_keras.py --keras-python /tmp/tfvenv/bin/python --rounds 3
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python bench/vs_keras.py --keras-python /tmp/tfvenv/bin/python  # AVX2-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _json(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}...: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    out = proc.stdout.strip()
    return json.loads(out[out.index("{"):])  # Keras may print lines before its JSON


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keras-python", required=True, help="interpreter with TensorFlow/Keras installed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--arch", default="seed_cnn")
    ap.add_argument("--precision", choices=("bf16", "fp32"), help="lungxray side (default: the measured choice)")
    args = ap.parse_args()
    common = ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", "5"]
    keras_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    print("| round | Keras img/s (load) | lungxray img/s (load) | ratio | lungxray settings | CPU | ISA |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    extra = ["--precision", args.precision] if args.precision else []
    ratios = []
    for i in range(1, args.rounds + 1):
        k = _json([args.keras_python, str(ROOT / "bench/keras_seed.py"), *common], keras_env)
        m = _json([sys.executable, "-m", "lungxray", "bench", "train", "--arch", args.arch, "--json", "--no-peak",
                   *common, *extra])
        ratios.append(m["images_per_second"] / k["images_per_second"])
        settings = (f"{m['dtype']}, {'CL' if m['channels_last'] else 'NCHW'}, {m['threads']}t, fused={m.get('fused')}, "
                    f"micro-batch={m.get('micro_batch')}")
        print(f"| {i} | {k['images_per_second']:.1f} ({k['load_average']}) | {m['images_per_second']:.1f} "
              f"({m['load_average']}) | {ratios[-1]:.2f}x | {settings} | {m['cpu']} | {m['isa']} |", flush=True)
    print(f"\nmedian ratio {statistics.median(ratios):.2f}x ({m['dtype']}, channels_last={m['channels_last']}, "
          f"compiled={m['compiled']}, OpenMP wait: {m.get('omp_wait_policy')}, {k['framework']}; {m['cpu']}, "
          f"{m['isa']})")
    if m.get("runtime"):
        print(m["runtime"]["line"])


if __name__ == "__main__":
    main()
