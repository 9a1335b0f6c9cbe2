"""STUDY.md, results.csv and figures for a finished study."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lungxray.evaluation.report import save_figure, subplots, write_rows_csv
from lungxray.inference.bundle import git_commit
from lungxray.io.files import write_text


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _ci(row: dict[str, Any], key: str) -> str:
    return f"{_pct(row.get(key))} ({_pct(row.get(key + '_low'))}–{_pct(row.get(key + '_high'))})"


def plot_means(rows: list[dict[str, Any]], path: Path) -> Path:
    """Estimated accuracy (CV/OOB) and test accuracy per row, each with its 95% interval."""
    fig, ax = subplots(figsize=(8, 0.38 * len(rows) + 1.2))
    ys = range(len(rows))[::-1]
    for offset, prefix, color, label in ((0.15, "cv_accuracy", "tab:blue", "CV / out-of-bag"),
                                         (-0.15, "test_accuracy", "tab:orange", "test")):
        x = [r[prefix] for r in rows]
        lo = [r[prefix] - r[prefix + "_low"] for r in rows]
        hi = [r[prefix + "_high"] - r[prefix] for r in rows]
        ax.errorbar(x, [y + offset for y in ys], xerr=[lo, hi], fmt="o", color=color, capsize=3, label=label)
    ax.set_yticks(list(ys), [r["name"] for r in rows])
    ax.set(xlabel="accuracy (95% CI)", xlim=(0.3, 1.02))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left")
    return save_figure(fig, path)


def plot_curves(out: Path, rows: list[dict[str, Any]], path: Path) -> Path:
    """Validation loss per epoch of each row's final run, one small panel per row."""
    cols = 4
    n = len(rows)
    fig, axes = subplots((n + cols - 1) // cols, cols, figsize=(13, 2.3 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, row in zip(axes.flat, rows, strict=False):
        history = json.loads((out / row["name"] / "final" / "history.json").read_text())
        members: dict[int, list[dict[str, Any]]] = {}
        for h in history:
            members.setdefault(int(h.get("member", 0)), []).append(h)
        for run in members.values():
            ax.plot([h["epoch"] for h in run], [h["train_loss"] for h in run], color="tab:blue", lw=1)
            ax.plot([h["epoch"] for h in run], [h["val_loss"] for h in run], color="tab:orange", lw=1)
        ax.set_title(row["name"], fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("train (blue) and validation (orange) loss per epoch, final runs", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def write_study_report(out: Path, study: Any, rows: list[dict[str, Any]], wall: float, quick: bool) -> Path:
    write_rows_csv(out / "results.csv", rows)
    plot_means(rows, out / "means.png")
    plot_curves(out, rows, out / "curves.png")
    command = "lungxray " + " ".join(sys.argv[1:]) if sys.argv and "lungxray" in sys.argv[0] else "(Python API)"
    lines = [
        f"# Study: {study.name}{' (quick mode: tiny settings, numbers mean nothing)' if quick else ''}", "",
        f"Command: `{command}`  ",
        f"Commit: {git_commit() or 'unknown'}  ",
        f"Wall time: {wall / 60:.1f} min. Estimates: {study.folds}-fold stratified cross-validation inside the "
        "training split (mean and 95% t-interval over folds) for single models; out-of-bag (bootstrap) or holdout "
        "validation for ensembles. Test: each row's final model scored once on the test split, 95% Wilson interval "
        "for accuracy, percentile bootstrap for macro F1. Paired comparisons against the baseline row "
        f"`{study.baseline}`: paired t-test on per-fold accuracy differences, and McNemar's test on the test "
        "predictions. * marks p < 0.05 on either.", "",
        "| row | estimate | accuracy est. (95% CI) | macro F1 est. | test accuracy (95% CI) | test macro F1 | "
        "COVID recall | Δ vs baseline (CV, 95% CI) | p (paired) | p (McNemar) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = (f"{100 * r['cv_diff']:+.1f} ({100 * r['cv_diff_low']:+.1f}…{100 * r['cv_diff_high']:+.1f})"
                if r.get("cv_diff") is not None else "")
        p_pair = f"{r['cv_diff_p']:.3f}" if r.get("cv_diff_p") is not None else ""
        lines.append(
            f"| {r['name']}{' *' if r['significant'] else ''} | {r['estimate']} | {_ci(r, 'cv_accuracy')} | "
            f"{_ci(r, 'cv_macro_f1')} | {_ci(r, 'test_accuracy')} | {_ci(r, 'test_macro_f1')} | "
            f"{_pct(r['test_recall_covid'])} | {diff} | {p_pair} | {r['mcnemar_p']:.3f} | {r['train_seconds']:.0f} |"
        )
    lines += ["", "Rows:", ""]
    lines += [f"- `{e.name}`: {e.description or ''} overrides `{e.overrides}`" for e in study.experiments]
    lines += ["", "![means](means.png)", "", "![learning curves](curves.png)", ""]
    return write_text(out / "STUDY.md", "\n".join(lines))
