"""The study: a list of named experiments, each estimated honestly and compared with paired statistics.

Single-model rows are estimated by stratified k-fold cross-validation inside the training split (every row sees
the same folds, so differences are paired); ensemble rows may use their out-of-bag estimate instead. Every row is
also trained once on the whole training split and scored once on test, with a 95% interval, and compared with
the baseline row by McNemar's test on the same test images. Finished runs are never redone, so an interrupted study
resumes where it stopped.
"""

from __future__ import annotations

import csv
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungxray.config import ConfigError, check_run_name, load_config, safe_yaml
from lungxray.evaluation import metrics
from lungxray.hostinfo import usable_cores
from lungxray.io.files import write_json

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    name: str
    config: str
    overrides: dict[str, Any]
    description: str = ""
    cv: bool = True  # False: ensemble rows estimated out-of-bag / on the holdout


@dataclass
class Study:
    name: str
    experiments: list[Experiment]
    baseline: str
    folds: int = 5
    repeats: int = 1
    quick_overrides: dict[str, Any] = field(default_factory=dict)


def load_study(path: str | Path, quick: bool = False) -> Study:
    """Parse a study YAML; `after: row` inherits that row's overrides (the seed's cumulative steps)."""
    path = Path(path)
    raw = safe_yaml(path.read_text(), str(path))
    base_dir = path.parent
    defaults = raw.get("defaults", {}) or {}
    rows: dict[str, Experiment] = {}
    for item in raw["experiments"]:
        unknown = set(item) - {"name", "config", "set", "after", "description", "cv"}
        if unknown:
            raise ConfigError(f"{path}: experiment {item.get('name')}: unknown key {sorted(unknown)[0]}")
        parent = rows[item["after"]] if item.get("after") else None
        overrides = {**defaults, **(parent.overrides if parent else {}), **(item.get("set") or {})}
        if parent and not item.get("config"):
            config_path = parent.config
        else:
            config_path = str(base_dir / (item.get("config") or raw.get("base", "seed.yaml")))
        members = overrides.get("ensemble.members", 1)
        check_run_name(str(item.get("name")), f"{path}: experiment name")
        exp = Experiment(item["name"], config_path, overrides, item.get("description", ""),
                         bool(item.get("cv", members == 1)))
        if exp.name in rows:
            raise ConfigError(f"{path}: experiment name {exp.name} is used twice")
        load_config(config_path, overrides)  # validate every row before anything runs
        rows[exp.name] = exp
    quick_over = raw.get("quick", {}) or {}
    if quick:
        for exp in rows.values():
            exp.overrides = {**exp.overrides, **quick_over}
    return Study(raw.get("name", path.stem), list(rows.values()), raw.get("baseline", next(iter(rows))),
                 int(quick_over.get("_folds", raw.get("folds", 5))) if quick else int(raw.get("folds", 5)),
                 int(raw.get("repeats", 1)), quick_over)


def _tasks(study: Study, out: Path) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    for exp in study.experiments:
        overrides = {k: v for k, v in exp.overrides.items() if not k.startswith("_")}
        tasks.append({"run_dir": str(out / exp.name / "final"), "config": exp.config, "overrides": overrides,
                      "fold": None})
        if exp.cv:
            for r in range(study.repeats):
                for k in range(study.folds):
                    over = {**overrides, "seed": overrides.get("seed", 0) + r}
                    tasks.append({"run_dir": str(out / exp.name / f"r{r}f{k}"), "config": exp.config,
                                  "overrides": over, "fold": (k, study.folds)})
    return tasks


def _run_task(task: dict[str, Any], data: str, threads: int) -> str:
    """One training run in a worker process; skipped when its bundle is already complete (resume)."""
    run_dir = Path(task["run_dir"])
    if (run_dir / "metrics.json").is_file():
        return "cached"
    from lungxray.training.pipeline import train_run

    overrides = {**task["overrides"], "train.threads": threads}
    train_run(task["config"], data, run_dir, overrides=overrides, fold=task["fold"], resume=True)
    return "trained"


def run_tasks(tasks: list[dict[str, Any]], data: str, jobs: int) -> None:
    cores = usable_cores()
    threads = max(1, cores // max(jobs, 1))
    started = time.perf_counter()
    if jobs <= 1:
        for i, task in enumerate(tasks, 1):
            status = _run_task(task, data, threads)
            log.info("[%d/%d] %s %s (%.0f s)", i, len(tasks), status, task["run_dir"], time.perf_counter() - started)
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_run_task, t, data, threads) for t in tasks]
        for i, (task, fut) in enumerate(zip(tasks, futures, strict=True), 1):
            status = fut.result()
            log.info("[%d/%d] %s %s (%.0f s)", i, len(tasks), status, task["run_dir"], time.perf_counter() - started)


def _read(run_dir: Path) -> dict[str, Any]:
    import json

    return json.loads((run_dir / "metrics.json").read_text())


def _test_correct(run_dir: Path) -> dict[str, bool]:
    with (run_dir / "predictions_test.csv").open() as f:
        return {r["path"]: r["true"] == r["label"] for r in csv.DictReader(f)}


def summarise(study: Study, out: Path) -> list[dict[str, Any]]:
    """One row per experiment: CV (or OOB) estimate, test score with interval, paired tests vs the baseline."""
    rows: list[dict[str, Any]] = []
    fold_scores: dict[str, dict[str, np.ndarray]] = {}
    for exp in study.experiments:
        final = _read(out / exp.name / "final")
        row: dict[str, Any] = {"name": exp.name, "description": exp.description}
        if exp.cv:
            folds = sorted(p for p in (out / exp.name).iterdir() if p.name != "final")
            accs = np.array([_read(p)["test"]["metrics"]["accuracy"] for p in folds])
            f1s = np.array([_read(p)["test"]["metrics"]["macro_f1"] for p in folds])
            fold_scores[exp.name] = {"accuracy": accs, "macro_f1": f1s}
            row["estimate"] = f"{len(folds)}-fold CV"
            for key, vals in (("accuracy", accs), ("macro_f1", f1s)):
                iv = metrics.mean_interval(vals)
                row |= {f"cv_{key}": iv.value, f"cv_{key}_low": iv.low, f"cv_{key}_high": iv.high}
        else:
            val = final["validation"]
            row["estimate"] = final.get("validation_kind", "holdout")
            for key in ("accuracy", "macro_f1"):
                iv = val["intervals"][key]
                row |= {f"cv_{key}": iv["value"], f"cv_{key}_low": iv["low"], f"cv_{key}_high": iv["high"]}
        test = final["test"]
        for key in ("accuracy", "macro_f1"):
            iv = test["intervals"][key]
            row |= {f"test_{key}": iv["value"], f"test_{key}_low": iv["low"], f"test_{key}_high": iv["high"]}
        row["test_recall_covid"] = test["metrics"]["per_class"].get("covid", {}).get("recall")
        row["train_seconds"] = final["timing"]["train_seconds"]
        rows.append(row)
    base = study.baseline
    base_correct = _test_correct(out / base / "final")
    for row in rows:
        correct = _test_correct(out / row["name"] / "final")
        paths = sorted(base_correct)
        mc = metrics.mcnemar_test(np.array([base_correct[p] for p in paths]), np.array([correct[p] for p in paths]))
        row["mcnemar_p"] = mc["p_value"]
        if row["name"] in fold_scores and base in fold_scores and row["name"] != base:
            a, b = fold_scores[base]["accuracy"], fold_scores[row["name"]]["accuracy"]
            if len(a) == len(b):
                diff = metrics.paired_difference(a, b)
                row |= {"cv_diff": diff["mean"], "cv_diff_low": diff["low"], "cv_diff_high": diff["high"],
                        "cv_diff_p": diff["p_value"]}
        row["significant"] = bool(
            (row.get("cv_diff_p") is not None and row["cv_diff_p"] < 0.05) or row["mcnemar_p"] < 0.05
        ) if row["name"] != base else False
    return rows


def run_study(path: str | Path, data: str | Path, out: str | Path, quick: bool = False, jobs: int = 1) -> Path:
    """Run (or resume) every experiment, then write results.csv, STUDY.md and the figure."""
    from lungxray.study.report import write_study_report

    started = time.perf_counter()
    study = load_study(path, quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = _tasks(study, out)
    log.info("study %s: %d experiments, %d training runs", study.name, len(study.experiments), len(tasks))
    run_tasks(tasks, str(data), jobs)
    rows = summarise(study, out)
    wall = time.perf_counter() - started
    write_json(out / "results.json", {"study": study.name, "rows": rows, "wall_seconds": wall, "quick": quick})
    return write_study_report(out, study, rows, wall, quick)
