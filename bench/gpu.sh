#!/usr/bin/env bash
# One GPU session's checks and figures, in a few minutes: correctness first (bench/gpu_check.py), then the
# training and inference benchmarks with --device cuda, then cost against dataset size. Run from anywhere:
#
#     bash bench/gpu.sh            # writes JSON and Markdown under $OUT (default /tmp/lungxray-gpu)
#
# With LUNGXRAY_DATA set it also trains configs/reference.yaml on the GPU and runs a 1-process nccl torchrun.
#
# Uses .venv/bin/python when present, else python3 (the GPU machines' image has PyTorch; the package is run
# from src/, nothing is installed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
    && PY=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LUNGXRAY_CACHE=/tmp/lungxray-gpu-cache
OUT=${OUT:-/tmp/lungxray-gpu}
mkdir -p "$OUT"
status=0
step() { echo; echo "== $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step "correctness (CPU vs GPU)"
$PY bench/gpu_check.py 2>&1 | tee "$OUT/check.log" || status=1

step "training throughput: bench train --device cuda (bf16 autocast, channels_last, data on the GPU)"
for spec in "seed_cnn 32 1" "seed_cnn 128 1" "compact_cnn 32 1" "compact_cnn 128 1" "compact_cnn 128 8" \
            "resnet_small 128 1" "resnet_small 128 8"; do
    set -- $spec
    $PY -m lungxray bench train --arch "$1" --batch-size "$2" --members "$3" --device cuda --steps 30 \
        --warmup 5 --json > "$OUT/train_$1_b$2_k$3.json" || { status=1; continue; }
    $PY - "$OUT/train_$1_b$2_k$3.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['arch']:<13} K={r['members']:<2} batch {r['batch_size']:<4} {r['images_per_second']:8.0f} img/s "
      f"(best {r['images_per_second_best']:.0f})  {r['achieved_gflops'] / 1e3:6.1f} TFLOP/s = "
      f"{100 * r['fraction_of_peak']:.1f}% of the {r['peak_gflops'] / 1e3:.0f} TFLOP/s bf16 matmul peak, "
      f"{r['peak_memory_mb']:.0f} MB")
PYEOF
done
step "compiled (torch.compile) compact_cnn, batch 128"
$PY -m lungxray bench train --arch compact_cnn --batch-size 128 --device cuda --compile --steps 30 --warmup 5 \
    --no-peak || status=1

step "inference: bench predict --device cuda (PyTorch engine; batch-1 latency, batch-64 throughput)"
$PY -m lungxray bench predict --arch compact_cnn --device cuda --engine torch --runs 200 --json \
    > "$OUT/predict_compact_cnn.json" && $PY -c "
import json; r = json.load(open('$OUT/predict_compact_cnn.json')); e = r['engines']['torch']
print(f\"compact_cnn batch 1: p50 {e['latency_ms_p50']:.2f} ms p99 {e['latency_ms_p99']:.2f} ms; \"
      f\"batch 64: {e['images_per_second']:.0f} img/s\")" || status=1

step "cost against dataset size (synthetic when the dataset is absent), 2 epochs"
$PY bench/scale.py --device cuda --factors 1 4 16 --epochs 2 --out "$OUT/scale.md" || status=1

if [ -n "${LUNGXRAY_DATA:-}" ]; then
    step "the reference recipe on the real dataset, --device cuda (make run's job; wall time includes decoding)"
    t0=$(date +%s)
    $PY -m lungxray train --config configs/reference.yaml --data "$LUNGXRAY_DATA" --out "$OUT/reference_cuda" \
        --device cuda 2>&1 | grep -vE "^\s*(epoch|Epoch)" | tail -25 || status=1
    echo "reference on cuda: $(( $(date +%s) - t0 )) s wall"
    step "torchrun, 1 process, nccl backend (smoke config, real dataset)"
    $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m lungxray train --config configs/smoke.yaml \
        --data "$LUNGXRAY_DATA" --out "$OUT/smoke_nccl" --device cuda 2>&1 | tail -5 || status=1
fi

echo
[ $status -eq 0 ] && echo "gpu.sh: all checks passed" || echo "gpu.sh: some step FAILED (see above)"
exit $status
