"""The `lungxray` command: parses arguments and calls the pipeline functions (the same ones the Python API calls).

DESCRIPTION below is what `lungxray --help` says: what the tool does, not how this module is built.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lungxray.waitpolicy import choose_wait_policy

log = logging.getLogger("lungxray")
RUN_DIR_HELP = "a trained model: the run folder `lungxray train` wrote (model.safetensors, meta.json, ...)"


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model or ensemble, evaluate it once on test/, write a bundle")
    p.add_argument("--config", default="configs/reference.yaml", help="YAML run configuration")
    p.add_argument("--data", help="dataset folder (default: $LUNGXRAY_DATA, data/covid19-dataset, ...)")
    p.add_argument("--out", help="run folder to create (default runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    p.add_argument("--force", action="store_true", help="replace a finished bundle or interrupted run in --out")


def _cmd_train(args: argparse.Namespace) -> int:
    from lungxray.api import parse_overrides, train

    if args.resume:
        if args.overrides:
            raise ValueError("--set cannot be combined with --resume: a resumed run keeps its config.yaml")
        result = train(data=args.data, out=args.resume, device=args.device, resume=True)
    else:
        result = train(args.config, args.data, args.out, device=args.device, force=args.force,
                       **parse_overrides(args.overrides))
    from lungxray.training.distributed import context, shutdown

    if context().is_main:  # under torchrun every rank returns the metrics; one prints them
        print(summary(result.metrics, result.run_dir))
    # Leave the process group together (barrier, then destroy) while every rank is still fully alive: tearing
    # gloo down from atexit, after a peer may already have exited, occasionally aborted a rank (SIGABRT).
    shutdown()
    return 0


def summary(metrics: dict, run_dir: Path) -> str:
    """The lines `make run` prints: test metrics with intervals (and without the test images copied in the
    training split, side by side) and where the report is."""
    from lungxray.evaluation.formatting import ci
    from lungxray.evaluation.report import terminal_scores

    test = metrics.get("test")
    lines = []
    validation = metrics.get("validation")
    if validation:  # the figure the model was chosen and stopped on, before the test figure it was not
        kind = str(metrics.get("validation_kind") or "validation")
        lines.append(f"{kind} accuracy {ci(validation['intervals']['accuracy'])}  "
                     f"({validation['metrics']['n']} images, what early stopping and model choice look at)")
    if test:
        lines += terminal_scores(test, metrics.get("test_without_duplicates"))
    else:
        lines.append("no test/ split in the data: nothing scored on test")
    lines.append(f"report: {run_dir / 'report.md'}")
    return "\n".join(lines)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a trained model on a labelled folder")
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--data", required=True, help="labelled folder (its test/ split if present, else all)")
    p.add_argument("--out", help="write evaluation.md, evaluation.json and predictions.csv here (default: nothing "
                                 "is written)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--adapt", action="store_true", help="also score the model adapted to this folder, "
                   "cross-fitted (each image by a model adapted on the other folds, never on itself)")
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds for --adapt (default 5)")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from lungxray.api import evaluate

    print(evaluate(args.run_dir, args.data, args.out, device=args.device, adapt=args.adapt, folds=args.folds))
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict image files or folders (recursively)")
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("paths", nargs="+")
    p.add_argument("--csv", help="write the rows to this CSV (default: print CSV to stdout)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                   help="onnx: ONNX Runtime on RUN_DIR/model.onnx (exported on first use, parity-checked)")
    p.add_argument("--onnx", metavar="FILE", help="run this ONNX export of RUN_DIR (e.g. an int8 one) in ONNX Runtime")
    p.add_argument("--cam", metavar="DIR", help="also write a Grad-CAM overlay DIR/<image stem>_cam.png per image")


PREDICT_TAIL = ("uncertainty", "disagreement", "ood", "refer", "refer_reason", "error")  # after path, label, prob_*
DECIMALS = {"prob_": 4, "uncertainty": 4, "disagreement": 4, "ood": 3}  # what the numbers mean to, no more


def predict_columns(classes: Sequence[str], rows: Sequence[dict]) -> list[str]:
    """The CSV header, from one list whatever row comes first: path, label, prob_<class>..., uncertainty,
    disagreement, ood, refer, refer_reason, error (ood and refer_reason when the bundle gives them), then extras
    such as cam."""
    seen = {k for r in rows for k in r}
    cols = ["path", "label", *(f"prob_{c}" for c in classes)]
    cols += [c for c in PREDICT_TAIL if c in seen or c not in ("ood", "refer_reason")]
    return cols + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in cols]


def csv_value(key: str, value: object) -> object:
    """Floats rounded to what they mean (probabilities to 4 decimals), NaN as an empty cell."""
    if isinstance(value, float):
        if value != value:  # NaN: no out-of-distribution reference in this bundle
            return ""
        digits = next((d for prefix, d in DECIMALS.items() if key.startswith(prefix)), 6)
        return f"{value:.{digits}f}"
    return value


def extensionless_dicoms(given: Sequence[str], found: Sequence[Path]) -> list[Path]:
    """DICOM files without a file-name extension inside the given folders (PACS exports often have none): the
    folder search looks at extensions, so these are added here, by their DICM magic, and said."""
    from lungxray.io.decode import is_dicom_bytes

    have, out = {str(p) for p in found}, []
    for folder in (Path(g) for g in given):
        if not folder.is_dir():
            continue
        for f in sorted(folder.rglob("*")):
            if f.suffix or f.name.startswith(".") or str(f) in have or not f.is_file() or f.is_symlink():
                continue
            try:
                with f.open("rb") as fh:
                    head = fh.read(132)
            except OSError:
                continue
            if is_dicom_bytes(head):
                out.append(f)
    return out


def _cmd_predict(args: argparse.Namespace) -> int:
    import csv
    import io

    from lungxray.api import load
    from lungxray.inference.predictor import expand_paths
    from lungxray.io.files import write_text

    paths = expand_paths(args.paths)
    dicoms = extensionless_dicoms(args.paths, paths)
    if dicoms:
        log.info("including %d DICOM file(s) without a file-name extension (e.g. %s)", len(dicoms), dicoms[0])
        paths = [*paths, *dicoms]
    paths = list(dict.fromkeys(paths))  # a file given by name and found in a folder too: once
    if not paths:
        raise FileNotFoundError("no image files found in " + ", ".join(args.paths))
    model = load(args.run_dir, args.device, engine=args.engine, onnx=args.onnx)
    pred = model.predict(paths, on_error="skip")
    rows = pred.to_rows(order=[str(p) for p in paths])
    if args.cam:
        from lungxray.evaluation.gradcam import write_cams

        cams = write_cams(model.predictor, [Path(r["path"]) for r in rows if not r["error"]], args.cam)
        for row in rows:
            row["cam"] = str(cams.get(row["path"], ""))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=predict_columns(model.classes, rows), restval="")
    writer.writeheader()
    writer.writerows({k: csv_value(k, v) for k, v in r.items()} for r in rows)
    failed = sum(1 for r in rows if r.get("error"))
    referred = sum(1 for r in rows if r.get("refer") is True)
    if args.csv:
        write_text(Path(args.csv), buf.getvalue())
    else:
        sys.stdout.write(buf.getvalue())
    where = args.csv or "standard output"
    print(f"wrote {len(rows)} row{'' if len(rows) == 1 else 's'} to {where}: {len(rows) - failed} predicted "
          f"({referred} referred to a radiologist), {failed} unreadable"
          + (f"; Grad-CAM overlays in {args.cam}" if args.cam else ""),
          file=sys.stdout if args.csv else sys.stderr)
    if failed:
        log.warning("%d of %d files could not be read (see the error column)", failed, len(rows))
    site = site_verdict(model, pred)
    if site:
        print(f"site: {site}", file=sys.stdout if args.csv else sys.stderr)
    return 1 if failed == len(rows) else 0


def site_verdict(model: Any, pred: Any) -> str | None:
    """The folder-level shift verdict for a batch of predictions (None for a few images or an old bundle)."""
    import numpy as np

    from lungxray.sites.shift import MIN_IMAGES, folder_shift

    if len(pred) < MIN_IMAGES or not np.isfinite(pred.ood).any():
        return None
    result = folder_shift(model.predictor, pred.ood)
    return result.verdict if result else None


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (whole ensemble, calibrated) and check its parity")
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--out", required=True, help="ONNX file to write, e.g. model.onnx")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--quantize", choices=("int8",),
                   help="opt-in int8 model: faster on CPU, approximate (agreement with fp32 checked and printed)")
    p.add_argument("--data", help="with --quantize: dataset folder whose train/ images calibrate it and whose test/ "
                                  "images check it (default: the bundle's training data)")


def _run_data(args: argparse.Namespace) -> Path:
    """`--data`, else the folder the run in `args.run_dir` was trained on (recorded in its meta.json)."""
    from lungxray.training.pipeline import bundle_data

    return bundle_data(args.run_dir, args.data)


def _cmd_export(args: argparse.Namespace) -> int:
    from lungxray.inference.onnx import PARITY_TOLERANCE, export_checked

    if args.quantize:
        from lungxray.inference.quantize import export_int8

        out, parity, agree = export_int8(args.run_dir, args.out, _run_data(args), args.opset)
        print(f"wrote {out} (int8); fp32 export vs PyTorch: max |probability difference| {parity:.2e}; int8 vs fp32 "
              f"on {agree.images} images: max |probability difference| {agree.max_prob_diff:.3g}, same label on "
              f"{100 * agree.label_agreement:.1f}%")
        return 0
    out, diff = export_checked(args.run_dir, args.out, args.opset)
    print(f"wrote {out}; ONNX Runtime vs PyTorch: max |probability difference| {diff:.2e} "
          f"(tolerance {PARITY_TOLERANCE:g})")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a trained model over HTTP (web page at /, API at /predict)")
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    p.add_argument("--workers-threads", type=int, default=4, metavar="N",
                   help="threads that decode and run inference")
    p.add_argument("--replicas", type=int, default=1,
                   help="model copies that run requests in parallel (PyTorch threads are split among them)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload")
    p.add_argument("--decode-budget-mb", type=int, default=512, metavar="MB",
                   help="working memory of all image decodes at once (docs/security.md)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", choices=["torch", "onnx"], default="torch",
                   help="what computes the scores: PyTorch, or ONNX Runtime on RUN_DIR/model.onnx")
    p.add_argument("--onnx", metavar="FILE", help="serve this export of RUN_DIR instead (e.g. an int8 one)")


def _cmd_serve(args: argparse.Namespace) -> int:
    from lungxray.serve.app import run_server

    run_server(args.run_dir, args.host, args.port, args.workers_threads, args.max_upload_mb, args.device,
               args.replicas, args.engine, args.onnx, decode_budget_mb=args.decode_budget_mb)
    return 0


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run a list of experiments with cross-validation and paired statistics")
    p.add_argument("study", help="study YAML, e.g. configs/study.yaml")
    p.add_argument("--data", help="dataset folder (default as for train)")
    p.add_argument("--out", default="runs/study", help="study folder (re-running resumes it)")
    p.add_argument("--quick", action="store_true", help="tiny settings (for tests): same code, meaningless numbers")
    p.add_argument("--jobs", type=int, default=1, help="experiments trained in parallel processes")


def _cmd_study(args: argparse.Namespace) -> int:
    from lungxray.study.experiments import run_study
    from lungxray.training.pipeline import find_data

    report = run_study(args.study, find_data(args.data), args.out, quick=args.quick, jobs=args.jobs)
    print(f"study report: {report}")
    return 0


def _add_robustness(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("robustness", help="shift benchmark: scores under graded acquisition shifts, saliency check")
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--data", help="labelled folder (default: the one the run was trained on)")
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="test/ (report) or the run's validation images (to compare variants on)")
    p.add_argument("--quick", action="store_true", help="six shifts at three severities (for tests)")
    p.add_argument("--shift", dest="shifts", action="append", metavar="NAME", help="only these shifts (repeatable)")
    p.add_argument("--levels", type=int, nargs="+", metavar="L", help="only these severities 1-5 (e.g. 1 3 5)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (gamma and zoom views)")
    p.add_argument("--adapt", action="store_true", help="also score every cell adapted to its shifted images, "
                   "cross-fitted (each image by a model adapted on the other folds of the cell)")
    p.add_argument("--folds", type=int, default=2, help="cross-fitting folds for --adapt (default 2)")
    p.add_argument("--no-saliency", dest="saliency", action="store_false", help="skip the Grad-CAM check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write robustness.md, robustness.json and robustness.png here (default: nothing "
                                 "is written)")
    p.add_argument("--into-report", action="store_true",
                   help="also put the section into RUN_DIR/report.md (files in --out or RUN_DIR/robustness)")
    p.add_argument("--device", default="cpu")


def _cmd_robustness(args: argparse.Namespace) -> int:
    from lungxray.evaluation.report import shift_table
    from lungxray.evaluation.robustness import run_benchmark, write_benchmark

    if args.into_report and args.quick:  # before the work, not after it
        raise ValueError("--into-report with --quick: quick mode's numbers are meaningless and never go into a report")
    result = run_benchmark(args.run_dir, _run_data(args), quick=args.quick, split=args.split, tta=args.tta,
                           saliency=args.saliency, seed=args.seed, shifts=args.shifts, device=args.device,
                           levels=args.levels, adapt=args.adapt, folds=args.folds)
    out_dir = write_benchmark(result, args.run_dir, args.out, into_report=args.into_report)
    s, clean = result["summary"], result["clean"]
    print("\n".join(shift_table(result)))
    print(f"clean macro F1 {clean['macro_f1']:.3f} (accuracy {clean['accuracy']:.3f}); mean under shift: "
          f"macro F1 {s['mean_macro_f1']:.3f}, accuracy {s['mean_accuracy']:.3f}; held-out shifts: macro F1 "
          f"{s['held_out_macro_f1'] if s['held_out_macro_f1'] is not None else float('nan'):.3f}")
    if args.adapt:
        print(f"adapted to each cell, cross-fitted ({args.folds} folds): clean macro F1 "
              f"{s['adapted_clean_macro_f1']:.3f}; mean under shift {s['adapted_mean_macro_f1']:.3f} "
              f"(frozen {s['mean_macro_f1']:.3f})")
    sal = result["saliency"]
    if sal and sal["central_mass"] is not None:
        print(f"saliency: {sal['central_mass']:.2f} of Grad-CAM mass central (uniform {sal['uniform_central']:.2f}),"
              f" {sal['corner_mass']:.2f} in corners (uniform {sal['uniform_corner']:.2f})")
    if out_dir is None:
        print("nothing written (read-only; pass --out DIR to save robustness.md/.json/.png, --into-report to add "
              "the section to the run's report.md)")
    else:
        print(f"wrote robustness.md, robustness.json and robustness.png to {out_dir}"
              + (f"; section updated in {Path(args.run_dir) / 'report.md'}" if args.into_report else ""))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time training steps or predictions on images already in memory")
    kinds = p.add_subparsers(dest="bench_command", required=True)
    t = kinds.add_parser("train", help="training images per second (augment, forward, backward, optimizer)")
    t.add_argument("--arch", default="seed_cnn", help="registered model name")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--steps", type=int, default=30, help="timed steps (after the warm-up)")
    t.add_argument("--warmup", type=int, default=5, help="untimed steps first (kernel set-up, compilation)")
    t.add_argument("--members", type=int, default=1, help="packed ensemble members")
    t.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    t.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), help="default: train.precision")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: train.channels_last")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: train.compile")
    t.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    t.add_argument("--image-size", type=int, default=256)
    t.add_argument("--no-peak", dest="peak", action="store_false", help="skip the peak matmul FLOP/s measurement")
    t.add_argument("--no-autotune", dest="autotune", action="store_false",
                   help="unset options take TrainConfig's defaults, not this machine's measured choice")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    r = kinds.add_parser("predict", help="inference latency (batch 1) and throughput, PyTorch and ONNX Runtime")
    r.add_argument("run_dir", nargs="?", help=RUN_DIR_HELP + " (default: an untrained one of --arch)")
    r.add_argument("--arch", default="compact_cnn", help="architecture when no RUN_DIR is given")
    r.add_argument("--members", type=int, default=1, help="members when no RUN_DIR is given")
    r.add_argument("--device", default="cpu")
    r.add_argument("--runs", type=int, default=100, help="batch-1 predictions timed")
    r.add_argument("--batch-size", type=int, default=64, help="batch for the throughput figure")
    r.add_argument("--engine", dest="engines", action="append", choices=("torch", "onnx"),
                   help="engine to time (repeatable; default both)")
    r.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0 = each engine's default: all cores for torch, 1 for onnx)")
    r.add_argument("--onnx", metavar="FILE", help="onnx engine: time this export of RUN_DIR (e.g. an int8 one) "
                                                 "instead of RUN_DIR/model.onnx")
    r.add_argument("--json", action="store_true", help="print one JSON object")


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from lungxray.speed import bench

    if args.bench_command == "train":
        from lungxray.speed.autotune import bench_train_tuned

        measure = bench_train_tuned if args.autotune else bench.bench_train
        result = measure(
            args.arch, args.batch_size, args.steps, args.warmup, args.members, args.device, args.precision,
            args.channels_last, args.compile, args.threads, args.image_size, with_peak=args.peak,
        )
        print(json.dumps(result, indent=2) if args.json else bench.format_train(result))
        return 0
    if args.runs < 1 or args.batch_size < 1:
        raise ValueError("--runs and --batch-size must be at least 1")
    result = bench.bench_predict(args.run_dir, args.arch, args.members, args.device, args.runs, args.batch_size,
                                 tuple(args.engines or ("torch", "onnx")), args.threads, args.onnx)
    print(json.dumps(result, indent=2) if args.json else bench.format_predict(result))
    return 0


COMMANDS = {
    "train": (_add_train, _cmd_train),
    "evaluate": (_add_evaluate, _cmd_evaluate),
    "predict": (_add_predict, _cmd_predict),
    "export": (_add_export, _cmd_export),
    "serve": (_add_serve, _cmd_serve),
    "study": (_add_study, _cmd_study),
}
COMMANDS["robustness"] = (_add_robustness, _cmd_robustness)
COMMANDS["bench"] = (_add_bench, _cmd_bench)


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="shortcut audit of a labelled folder: can borders, thumbnails, histograms or "
                                     "file facts alone tell the classes apart?")
    p.add_argument("--data", required=True, help="folder of class sub-folders (train/ and test/ audited together)")
    p.add_argument("--out", help="write audit.md, audit.json and figures/ here (default: nothing is written)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object (logs go to stderr)")


def _cmd_audit(args: argparse.Namespace) -> int:
    import json

    from lungxray.api import audit

    result = audit(args.data, args.out, seed=args.seed, folds=args.folds)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


COMMANDS["audit"] = (_add_audit, _cmd_audit)


DESCRIPTION = """\
Classify chest X-rays (COVID-19 / normal / viral pneumonia) with a small CNN ensemble trained from scratch:
train and evaluate it honestly (every test figure with a 95% interval), predict image files or folders with an
uncertainty and a referral flag, explain with Grad-CAM, serve a web page, export to ONNX.
Research tool, not a medical device."""
EPILOG = """\
first steps:
  lungxray predict runs/reference chest.png            one image: label, probabilities, uncertainty, refer
  lungxray serve runs/reference                        the web page on http://127.0.0.1:8000
  lungxray train --config configs/smoke.yaml --out runs/mine   a few seconds, to check an installation
`lungxray COMMAND --help` describes each command."""


def build_parser() -> argparse.ArgumentParser:
    from lungxray import __version__

    parser = argparse.ArgumentParser(prog="lungxray", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lungxray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def _add_shift(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shift", help="is this folder from another site? a two-sample test against the training "
                                     "images' feature statistics")
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--data", required=True, help="folder of images (searched recursively; labels ignored)")
    p.add_argument("--alpha", type=float, default=0.01, help="significance level of the verdict")
    p.add_argument("--json", action="store_true", help="print one JSON object (shifted, p_value, score, ...)")


def _cmd_shift(args: argparse.Namespace) -> int:
    import json

    from lungxray.api import load

    result = load(args.run_dir).shift(args.data, alpha=args.alpha)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.verdict)
    return 0


def _add_adapt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapt", help="adapt a model to a new site from its unlabelled images (BatchNorm "
                                     "statistics, relative to the training images, with the site's class mix)")
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--data", required=True, help="folder of the site's images (searched recursively; labels ignored)")
    p.add_argument("--out", required=True, help="folder for the adapted bundle")
    p.add_argument("--force", action="store_true", help="replace a bundle already at --out")
    p.add_argument("--prior-strength", type=float, default=None, metavar="N",
                   help="weight of the training statistics, in images (default 16)")
    p.add_argument("--class-mix", choices=("estimate", "train"), default="estimate",
                   help="align to the training images with the site's estimated class mix (default) or the "
                        "training mix (plain AdaBN)")


def _cmd_adapt(args: argparse.Namespace) -> int:
    from lungxray.sites.adapt import PRIOR_STRENGTH, AdaptSettings, adapt_bundle

    strength = PRIOR_STRENGTH if args.prior_strength is None else args.prior_strength
    out, report = adapt_bundle(args.run_dir, args.data, args.out,
                               AdaptSettings(prior_strength=strength, class_mix=args.class_mix), args.force)
    mix = ", ".join(f"{c} {v:.0%}" for c, v in zip(_classes(out), report.class_mix, strict=True))
    print(f"adapted on {report.images} images of {args.data} (class mix {mix}); "
          f"{report.changed_labels:.0%} of their labels changed")
    for name, why in report.excluded:
        print(f"  left out {name}: {why}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(f"wrote the adapted bundle to {out}")
    return 0


def _classes(run_dir: Path) -> list[str]:
    from lungxray.inference.bundle import read_meta

    return list(read_meta(run_dir)["classes"])


COMMANDS["shift"] = (_add_shift, _cmd_shift)
COMMANDS["adapt"] = (_add_adapt, _cmd_adapt)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    # before anything imports torch (the commands import it lazily): spin on a free CPU, sleep on a shared one
    log.debug("%s", choose_wait_policy(args.command))  # train logs the setting with its device and threads
    from safetensors import SafetensorError

    from lungxray.config import ConfigError
    from lungxray.inference.bundle import BundleError
    from lungxray.io.decode import ImageDecodeError
    from lungxray.runtime import reuse_freed_memory

    if args.command != "serve":  # a training setting: a server would keep every burst's peak memory for good
        reuse_freed_memory()

    try:
        return COMMANDS[args.command][1](args)
    except (ConfigError, BundleError, ImageDecodeError, OSError, ValueError, RuntimeError, MemoryError,
            SafetensorError) as exc:
        if args.verbose:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line, even for multi-line messages
        print(f"lungxray {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lungxray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
