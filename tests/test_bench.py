"""`lungxray bench`: the training benchmark runs the real training step, the prediction benchmark both engines.

Sizes are tiny (64px, a few steps): these tests check what is measured and reported, not how fast it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lungxray.cli import main
from lungxray.models.kernels import conv3x3
from lungxray.speed import bench

TINY = ["--image-size", "64", "--batch-size", "4", "--steps", "3", "--warmup", "1"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_train_json_reports_the_issue_fields(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "bench", "train", "--arch", "compact_cnn", *TINY, "--json")
    assert code == 0
    r = json.loads(out)
    for key in ("images_per_second", "arch", "batch_size", "device", "dtype", "compiled"):
        assert key in r
    assert r["arch"] == "compact_cnn" and r["batch_size"] == 4 and r["device"] == "cpu"
    assert r["compiled"] is False and r["steps"] == 3
    assert r["dtype"] in ("bf16", "fp32")  # the default precision resolves per machine
    assert r["images_per_second"] > 0 and r["images_per_second_best"] >= r["images_per_second"]
    # FLOP accounting: training = 3x forward FLOPs per image; the fraction is against the same-dtype peak.
    assert r["achieved_gflops"] == pytest.approx(3 * r["forward_gflops_per_image"] * r["images_per_second"])
    assert r["peak_gflops"] > 0
    assert r["fraction_of_peak"] == pytest.approx(r["achieved_gflops"] / r["peak_gflops"])
    # those are direct-convolution FLOPs: the result says when Winograd passes (fewer multiplies) ran
    assert r["winograd"] == any("winograd" in p for p in conv3x3.chosen().values())
    line = bench.format_train({**r, "winograd": True}).splitlines()[2]
    assert line.endswith("(direct-convolution FLOPs; the Winograd passes that ran do fewer multiplies)")


def test_bench_train_counts_member_images_and_honours_flags() -> None:
    r = bench.bench_train("compact_cnn", batch_size=4, steps=2, warmup=1, members=3, image_size=64,
                          precision="fp32", channels_last=False, with_peak=False)
    assert r["members"] == 3 and r["dtype"] == "fp32" and r["channels_last"] is False
    assert r["images_per_second"] == pytest.approx(4 * 3 / r["step_seconds_median"])
    assert "peak_gflops" not in r and r["load_average"] is not None


def test_bench_train_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "bench", "train", "--arch", "seed_cnn", *TINY, "--no-peak")
    assert code == 0
    assert "seed_cnn x1  batch 4  64px  cpu" in out and "img/s median" in out and "load average" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "train", "--arch", "nope"], "unknown model 'nope'"),
        (["bench", "train", "--arch", "compact_cnn", "--steps", "0"], "steps >= 1"),
        (["bench", "predict", "/nonexistent/run"], "not a lungxray model folder"),
        (["bench", "predict", "--runs", "0"], "--runs and --batch-size must be at least 1"),
    ],
)
def test_bench_bad_input_is_one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_bench_predict_times_both_engines_on_a_trained_bundle(trained_run: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = shutil.copytree(trained_run, tmp_path / "run")  # the onnx engine exports model.onnx into the bundle
    code, out, _ = run_cli(capsys, "bench", "predict", str(run), "--runs", "5", "--batch-size", "8", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["arch"] == "compact_cnn" and r["image_size"] == 64 and r["run_dir"] == str(run)
    assert set(r["engines"]) == {"torch", "onnx"}
    for e in r["engines"].values():
        assert 0 < e["latency_ms_min"] <= e["latency_ms_p50"] <= e["latency_ms_p99"]
        assert e["images_per_second"] > 0 and e["batch"] == 8
    assert (run / "model.onnx").is_file()


def test_bench_predict_without_a_bundle_uses_an_untrained_one() -> None:
    r = bench.bench_predict(arch="compact_cnn", members=2, runs=3, batch_size=4, engines=("torch",))
    assert r["run_dir"] is None and r["members"] == 2 and r["image_size"] == 256
    assert list(r["engines"]) == ["torch"]
    assert "torch" in bench.format_predict(r)


def test_epoch_memory_does_not_grow_with_epochs() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 48, 48), dtype=np.uint8)
    labels = np.arange(30) % 3
    records = bench.bench_epochs(images, labels, "compact_cnn", epochs=4, batch_size=8,
                                 model_args={"width": 4})
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert all(r["seconds"] > 0 and r["images_per_second"] > 0 for r in records)
    # After the first epoch (allocator warm-up) resident memory stays flat: nothing accumulates per epoch.
    growth = records[-1]["rss_mb"] - records[1]["rss_mb"]
    assert growth < 32, [round(r["rss_mb"]) for r in records]


def test_peak_flops_is_a_plausible_rate() -> None:
    rate = bench.peak_flops("cpu", torch.float32, size=256, repeats=2)
    assert 1e8 < rate < 1e14
