"""ONNX export: the whole calibrated ensemble in one graph, parity with PyTorch, dynamic batch, the onnx engine."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lungxray.cli import main
from lungxray.inference.bundle import read_meta, update_meta
from lungxray.inference.onnx import ONNX_NAME, OnnxPredictor, ParityError, export_onnx, parity_check
from lungxray.inference.predictor import Predictor, expand_paths
from lungxray.inference.quantize import (
    INT8_MAX_PROB_DIFF,
    INT8_MIN_LABEL_AGREEMENT,
    AgreementError,
    export_int8,
    int8_images,
    quantization_info,
    quantize_int8,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def runs(trained_run: Path, trained_ensemble: Path) -> dict[str, Path]:
    return {"single": trained_run, "ensemble": trained_ensemble}


@pytest.fixture(scope="module")
def exported(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("onnx")
    return {name: export_onnx(run, out / f"{name}.onnx") for name, run in runs.items()}


def _test_images(predictor: Predictor, tiny_dataset: Path) -> np.ndarray:
    return np.stack([predictor.preprocess(p) for p in expand_paths([tiny_dataset / "test"])])


@pytest.mark.parametrize("name", ["single", "ensemble"])
def test_parity_and_dynamic_batch(name: str, runs: dict[str, Path], exported: dict[str, Path],
                                  tiny_dataset: Path) -> None:
    predictor = Predictor.load(runs[name])
    images = _test_images(predictor, tiny_dataset)
    ref = predictor.predict_images(images)
    session = ort.InferenceSession(str(exported[name]), providers=["CPUExecutionProvider"])
    k = predictor.bundle.members
    for n in (1, 7, len(images)):
        probs, member = session.run(["probs", "member_probs"], {"image": images[:n, None].astype(np.float32)})
        assert probs.shape == (n, 3) and member.shape == (n, k, 3)
        assert np.abs(probs - ref.probs[:n]).max() < TOL
        assert np.abs(member - ref.member_probs[:n]).max() < TOL


def test_graph_contract(runs: dict[str, Path], exported: dict[str, Path]) -> None:
    model = onnx.load(str(exported["ensemble"]))
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 64, 64]
    assert [o.name for o in model.graph.output] == ["probs", "member_probs", "member_features"]
    assert model.opset_import[0].version == 17
    # every member reads the same image: the packed stem is exported as one dense 1-channel conv, no Expand
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
    producer = {out: n.op_type for n in model.graph.node for out in n.output}
    assert producer[first_conv.input[0]] == "Mul"  # the normalisation's last step, not an Expand to K channels
    assert {a.name: a.i for a in first_conv.attribute}.get("group", 1) == 1
    props = {p.key: p.value for p in model.metadata_props}
    meta = read_meta(runs["ensemble"])
    assert props["lungxray.classes"] == '["covid", "normal", "pneumonia"]'
    assert float(props["lungxray.temperature"]) == meta["temperature"]


def test_parity_check_catches_a_different_model(runs: dict[str, Path], exported: dict[str, Path]) -> None:
    with pytest.raises(ParityError, match="parity check failed"):
        parity_check(Predictor.load(runs["single"]), exported["ensemble"])


@pytest.mark.parametrize("name", ["single", "ensemble"])
def test_onnx_engine_matches_torch_engine(name: str, runs: dict[str, Path], tiny_dataset: Path,
                                          tmp_path: Path) -> None:
    run = shutil.copytree(runs[name], tmp_path / "run")
    assert not (run / ONNX_NAME).exists()
    tables = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / f"{engine}.csv"
        assert main(["predict", str(run), str(tiny_dataset / "test"), "--engine", engine, "--csv", str(out)]) == 0
        with out.open() as f:
            tables[engine] = list(csv.DictReader(f))
    assert (run / ONNX_NAME).is_file()  # exported on first use
    torch_rows, onnx_rows = tables["torch"], tables["onnx"]
    assert len(torch_rows) == len(onnx_rows) == 18 and list(torch_rows[0]) == list(onnx_rows[0])
    for a, b in zip(torch_rows, onnx_rows, strict=True):
        assert a["path"] == b["path"] and a["label"] == b["label"] and a["refer"] == b["refer"]
        for col in a:
            if col.startswith("prob_") or col in ("uncertainty", "disagreement"):
                assert abs(float(a[col]) - float(b[col])) < TOL + 1e-4, col  # the CSV rounds to 4 decimals


def test_stale_onnx_is_exported_again(trained_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    run = shutil.copytree(trained_run, tmp_path / "run")
    first = OnnxPredictor.load(run)
    images = _test_images(first, tiny_dataset)
    before = first.predict_images(images).probs
    update_meta(run, temperature=read_meta(run)["temperature"] * 3)  # recalibrated bundle
    after = OnnxPredictor.load(run).predict_images(images)
    expected = Predictor.load(run).predict_images(images)
    assert np.abs(after.probs - expected.probs).max() < TOL
    assert np.abs(after.probs - before).max() > 1e-3


def test_export_cli_prints_parity(trained_ensemble: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "deploy" / "model.onnx"
    assert main(["export", str(trained_ensemble), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    diff = float(re.search(r"max \|probability difference\| (\S+)", printed).group(1))
    assert diff < TOL and out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temporary file left behind


def test_export_cli_refuses_a_folder_that_is_not_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "model.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lungxray export: error:") and "not a lungxray model folder" in err
    assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "model.onnx").exists()


# torch 2.13's own exporter code trips its pytree deprecation (copyreg -> LeafSpec); nothing of ours to change
@pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated:FutureWarning")
def test_dynamo_exporter_also_matches(trained_run: Path, tmp_path: Path) -> None:
    path = export_onnx(trained_run, tmp_path / "dynamo.onnx", dynamo=True)  # parity-checked inside
    predictor = Predictor.load(trained_run)
    images = np.random.default_rng(1).integers(0, 256, (5, 64, 64), dtype=np.uint8)
    assert parity_check(predictor, path, images) < TOL


@pytest.fixture(scope="module")
def int8_ensemble(trained_ensemble: Path, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    assert main(["export", str(trained_ensemble), "--out", str(out), "--quantize", "int8",
                 "--data", str(tiny_dataset)]) == 0
    return out


def test_int8_agrees_with_fp32_on_real_images(trained_ensemble: Path, tiny_dataset: Path,
                                              int8_ensemble: Path) -> None:
    info = quantization_info(int8_ensemble)
    assert info is not None and info["nodes"]  # the smoke model's 32- and 64-channel convs
    agree = info["agreement"]
    assert agree["images"] == 27  # the half of the 54 training images that calibration did not use; never test
    assert agree["max_prob_diff"] <= INT8_MAX_PROB_DIFF and agree["label_agreement"] >= INT8_MIN_LABEL_AGREEMENT
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(int8_ensemble)).graph.node}
    # the same limits hold on images the export never saw, through the engine on the test images
    fp32 = OnnxPredictor.load(shutil.copytree(trained_ensemble, int8_ensemble.parent / "run"))
    int8 = OnnxPredictor.load(trained_ensemble, onnx_path=int8_ensemble)
    images = _test_images(fp32, tiny_dataset)
    a, b = fp32.predict_images(images), int8.predict_images(images)
    assert np.abs(a.probs - b.probs).max() <= INT8_MAX_PROB_DIFF
    assert np.mean(a.probs.argmax(1) == b.probs.argmax(1)) >= INT8_MIN_LABEL_AGREEMENT


def test_int8_export_prints_agreement(trained_ensemble: Path, tiny_dataset: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "q.onnx"
    assert main(["export", str(trained_ensemble), "--out", str(out), "--quantize", "int8",
                 "--data", str(tiny_dataset)]) == 0
    printed = capsys.readouterr().out
    found = re.search(r"int8 vs fp32 on 27 images: max \|probability difference\| (\S+), same label on (\S+)%", printed)
    assert found and float(found.group(1)) <= INT8_MAX_PROB_DIFF and float(found.group(2)) >= 98
    # the int8 file is usable wherever a model is: `predict --onnx`, same CSV shape, labels as the torch engine's
    images = [str(p) for p in expand_paths([tiny_dataset / "test"])]
    csvs = {}
    for name, extra in (("torch", []), ("int8", ["--onnx", str(out)])):
        csvs[name] = tmp_path / f"{name}.csv"
        assert main(["predict", str(trained_ensemble), *images, "--csv", str(csvs[name]), *extra]) == 0
    torch_rows, int8_rows = (list(csv.DictReader(csvs[n].open())) for n in ("torch", "int8"))
    assert [r["path"] for r in int8_rows] == [r["path"] for r in torch_rows]
    same = np.mean([a["label"] == b["label"] for a, b in zip(torch_rows, int8_rows, strict=True)])
    assert same >= INT8_MIN_LABEL_AGREEMENT


def test_int8_beyond_the_limits_is_refused(trained_ensemble: Path, tiny_dataset: Path, exported: dict[str, Path],
                                           tmp_path: Path) -> None:
    calibration, check = int8_images(Predictor.load(trained_ensemble), tiny_dataset)
    with pytest.raises(AgreementError, match="disagrees with fp32"):
        quantize_int8(exported["ensemble"], tmp_path / "q.onnx", calibration, check, max_prob_diff=0.0)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_bench_times_an_int8_export(trained_ensemble: Path, int8_ensemble: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "predict", str(trained_ensemble), "--engine", "onnx", "--onnx", str(int8_ensemble),
                 "--runs", "3", "--batch-size", "4"]) == 0
    assert re.search(r"onnx int8 +batch 1: p50", capsys.readouterr().out)


def test_an_export_of_another_bundle_is_refused(trained_run: Path, int8_ensemble: Path) -> None:
    with pytest.raises(RuntimeError, match="export it again"):
        OnnxPredictor.load(trained_run, onnx_path=int8_ensemble)


def test_export_int8_returns_parity_and_agreement(trained_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    path, parity, agree = export_int8(trained_run, tmp_path / "single.int8.onnx", tiny_dataset)
    assert path.is_file() and parity < TOL
    assert agree.images == 27 and agree.label_agreement >= INT8_MIN_LABEL_AGREEMENT
