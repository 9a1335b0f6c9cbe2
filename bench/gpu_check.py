"""GPU correctness checks for bench/gpu.sh: everything runs with --device cuda unchanged and agrees with the CPU.

1. Augmentation: the same seed draws the same parameters on both devices and resamples to the same pixels.
2. Training: `train_run(..., device="cuda")` on a tiny synthetic dataset (packed 2-member bootstrap ensemble,
   bf16 autocast, images resident on the GPU) gives finite losses and a bundle.
3. The bundle loads on the CPU and on the GPU and both predict the same probabilities (fp32 inference).
4. One bf16 training step of every registered model runs on the GPU with finite loss.

Prints one PASS/FAIL line per check and exits non-zero if any failed.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def check_augment() -> str:
    from lungxray.transforms.geometric import Augmenter, resolve_params

    x = torch.rand(16, 1, 128, 128)
    cpu = Augmenter(resolve_params("intense", horizontal_flip=True), seed=3, device="cpu")(x)
    gpu = Augmenter(resolve_params("intense", horizontal_flip=True), seed=3, device="cuda")(x.cuda())
    diff = float((cpu - gpu.cpu()).abs().max())
    assert diff < 1e-3, f"CPU and GPU augmentation differ by {diff}"
    return f"max |cpu - gpu| {diff:.1e}"


def check_train_and_predict(tmp: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_dataset

    from lungxray.inference.predictor import Predictor
    from lungxray.training.pipeline import train_run

    data = write_dataset(tmp / "tiny", {"train": 18, "test": 6})
    overrides = {"data.image_size": 64, "train.epochs": 3, "train.batch_size": 16, "train.lr": 0.003,
                 "ensemble.members": 2, "ensemble.bootstrap": True}
    result = train_run(ROOT / "configs/smoke.yaml", data, tmp / "run", overrides=overrides, device="cuda")
    losses = [h["train_loss"] for h in result.history]
    assert np.isfinite(losses).all(), f"non-finite training loss {losses}"
    assert result.metrics["timing"]["device"].startswith("cuda"), result.metrics["timing"]
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64), dtype=np.uint8)
    on_cpu = Predictor.load(result.run_dir, "cpu").predict_images(images).probs
    on_gpu = Predictor.load(result.run_dir, "cuda").predict_images(images).probs
    diff = float(np.abs(on_cpu - on_gpu).max())
    assert diff < 1e-3, f"CPU and GPU predictions differ by {diff}"
    return (f"losses {[round(v, 3) for v in losses]}, test accuracy "
            f"{result.test_accuracy:.2f}, max |cpu - gpu| probability {diff:.1e}")


def check_every_model_steps() -> str:
    from lungxray.models.nets import list_models
    from lungxray.speed.bench import bench_train

    rates = []
    for name in list_models():
        r = bench_train(name, batch_size=8, steps=2, warmup=1, members=2, device="cuda", image_size=128,
                        with_peak=False)
        assert r["dtype"] in ("bf16", "fp16") and r["images_per_second"] > 0, r
        rates.append(f"{name} {r['images_per_second']:.0f}")
    return "img/s at 128px, K=2, batch 8: " + ", ".join(rates)


def main() -> int:
    if not torch.cuda.is_available():
        print("FAIL cuda: PyTorch sees no CUDA GPU")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        checks: list[tuple[str, Callable[[], str]]] = [
            ("augment cpu == cuda", check_augment),
            ("train --device cuda, predict on cpu and cuda", lambda: check_train_and_predict(Path(tmp))),
            ("every model trains on cuda", check_every_model_steps),
        ]
        for name, fn in checks:
            try:
                print(f"PASS {name}: {fn()}", flush=True)
            except Exception as exc:  # report every check, then fail
                failed += 1
                print(f"FAIL {name}: {exc}", flush=True)
                traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
