"""The `lungxray` command: a thin layer that parses arguments and calls the pipeline functions."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("lungxray")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model or ensemble, evaluate it once on test/, write a bundle")
    p.add_argument("--config", default="configs/reference.yaml", help="YAML run configuration")
    p.add_argument("--data", help="dataset folder (default: $LUNGXRAY_DATA, data/covid19-dataset, ...)")
    p.add_argument("--out", help="run folder to create (default runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")


def _cmd_train(args: argparse.Namespace) -> int:
    from lungxray.config import load_config
    from lungxray.pipeline import find_data, train_run

    if args.resume:
        run_dir = Path(args.resume)
        config: str | Path = run_dir / "config.yaml"
        if not Path(config).is_file():
            raise FileNotFoundError(f"{run_dir}: nothing to resume (no config.yaml)")
        overrides: list[str] = []
    else:
        config, overrides = args.config, args.overrides
        run_dir = Path(args.out) if args.out else Path("runs") / load_config(config, overrides).name
    data = find_data(args.data)
    result = train_run(config, data, run_dir, overrides, device=args.device, resume=bool(args.resume))
    print(summary(result.metrics, result.run_dir))
    return 0


def summary(metrics: dict, run_dir: Path) -> str:
    """The lines `make run` prints: test metrics with intervals and where the report is."""
    from lungxray.report import _iv

    test = metrics.get("test")
    lines = []
    if test:
        iv = test["intervals"]
        m = test["metrics"]
        correct = sum(m["confusion"][i][i] for i in range(len(m["confusion"])))
        lines.append(f"test accuracy {_iv(iv['accuracy'])}  ({correct}/{m['n']} correct)")
        lines.append(f"test macro F1 {_iv(iv['macro_f1'])}   macro ROC AUC {_iv(iv.get('macro_roc_auc'))}")
        lines += [f"  recall {c}: {_iv(iv[f'recall_{c}'])}" for c in m["per_class"]]
    else:
        lines.append("no test/ split in the data: nothing scored on test")
    lines.append(f"report: {run_dir / 'report.md'}")
    return "\n".join(lines)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a trained model on a labelled folder")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="labelled folder (its test/ split if present, else all)")
    p.add_argument("--out", help="output folder (default RUN_DIR/evaluation)")
    p.add_argument("--device", default="cpu")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from lungxray.pipeline import evaluate_run
    from lungxray.report import _iv

    result = evaluate_run(args.run_dir, args.data, args.out, device=args.device)
    iv = result["overall"]["intervals"]
    print(f"{result['images']} images: accuracy {_iv(iv['accuracy'])}, macro F1 {_iv(iv['macro_f1'])}")
    for source, scores in result["sources"].items():
        print(f"  {source}: accuracy {_iv(scores['intervals']['accuracy'])}")
    print(f"report: {Path(args.out or Path(args.run_dir) / 'evaluation') / 'evaluation.md'}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict image files or folders (recursively)")
    p.add_argument("run_dir")
    p.add_argument("paths", nargs="+")
    p.add_argument("--csv", help="write the rows to this CSV (default: print CSV to stdout)")
    p.add_argument("--device", default="cpu")


def _cmd_predict(args: argparse.Namespace) -> int:
    from lungxray.predict import Predictor, expand_paths, predict_files
    from lungxray.report import write_rows_csv

    predictor = Predictor.load(args.run_dir, args.device)
    paths = expand_paths(args.paths)
    if not paths:
        raise FileNotFoundError("no image files found in " + ", ".join(args.paths))
    rows = predict_files(predictor, paths)
    if args.csv:
        write_rows_csv(Path(args.csv), rows)
    else:
        import csv

        cols = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(sys.stdout, fieldnames=cols, restval="")
        writer.writeheader()
        writer.writerows(rows)
    failed = sum(1 for r in rows if r.get("error"))
    if failed:
        log.warning("%d of %d files could not be read (see the error column)", failed, len(rows))
    return 1 if failed == len(rows) else 0


COMMANDS = {
    "train": (_add_train, _cmd_train),
    "evaluate": (_add_evaluate, _cmd_evaluate),
    "predict": (_add_predict, _cmd_predict),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungxray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    from lungxray.bundle import BundleError
    from lungxray.config import ConfigError
    from lungxray.imageio import ImageDecodeError

    try:
        return COMMANDS[args.command][1](args)
    except (ConfigError, BundleError, ImageDecodeError, FileNotFoundError, ValueError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"lungxray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lungxray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
