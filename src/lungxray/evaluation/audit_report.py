"""The shortcut audit's outputs: terminal summary, `audit.md` with figures, `audit.json` (lungxray.audit).

Kept apart from the probes so that auditing needs neither matplotlib nor torch (lungxray.report imports the run
configuration, which imports torch): they load only when a report is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lungxray.evaluation.audit import BINS, BORDER, GRID, MARGIN, AuditResult, audit_folder, image_features
from lungxray.evaluation.formatting import pct
from lungxray.io.dataset import Dataset
from lungxray.io.files import write_json, write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["audit_to", "write_report"]


def _figures(result: AuditResult, ds: Dataset, folder: Path) -> list[tuple[str, str]]:
    """Mean image per class (kept border outlined), grey histograms per class, probe accuracies with intervals."""
    from matplotlib.patches import Rectangle

    from lungxray.evaluation.report import save_figure, subplots  # imported here: report pulls in torch via the config

    written: list[tuple[str, str]] = []

    def save(name: str, caption: str, fig: Figure) -> None:
        save_figure(fig, folder / name)
        written.append((name, caption))

    k, size = len(ds.classes), ds.images.shape[1]
    fig, axes = subplots(1, k, figsize=(2.6 * k, 2.9), squeeze=False)
    band = size * max(1, round(BORDER * GRID)) / GRID
    for ax, (c, name) in zip(axes[0], enumerate(ds.classes), strict=True):
        ax.imshow(ds.images[ds.labels == c].mean(axis=0), cmap="gray", vmin=0, vmax=255)
        ax.add_patch(Rectangle((band, band), size - 2 * band, size - 2 * band, fill=False, ec="red", lw=1))
        ax.set_title(f"{name} (n={int(np.sum(ds.labels == c))})", fontsize=9)
        ax.axis("off")
    save("mean_images.png", "Mean decoded image per class; border_only sees only what lies outside the red box.",
         fig)
    fig, ax = subplots(figsize=(5.5, 3.2))
    hist = image_features(ds.images)["histogram"]
    centres = (np.arange(BINS) + 0.5) * 256 / BINS
    for c, name in enumerate(ds.classes):
        ax.plot(centres, hist[ds.labels == c].mean(axis=0), label=name)
    ax.set(xlabel="grey level", ylabel="fraction of pixels", title="mean grey-level histogram per class")
    ax.legend(fontsize=8)
    save("histograms.png", "Mean grey-level histogram per class (what the histogram probe sees).", fig)
    fig, ax = subplots(figsize=(5.5, 0.5 + 0.55 * len(result.probes)))
    for i, p in enumerate(result.probes):
        ax.errorbar(p.accuracy, i, xerr=[[p.accuracy - p.low], [p.high - p.accuracy]], fmt="o",
                    color="tab:red" if p.signal else "tab:blue", capsize=3)
        ax.plot([p.chance, p.chance], [i - 0.35, i + 0.35], color="k", lw=1.5)
        ax.plot([p.chance + MARGIN] * 2, [i - 0.35, i + 0.35], color="k", lw=0.8, ls=":")
    ax.set(yticks=range(len(result.probes)), yticklabels=[p.name for p in result.probes], xlim=(0, 1),
           xlabel="cross-validated accuracy (95% Wilson interval)", title="probes against chance (black bar)")
    ax.invert_yaxis()
    save("probes.png", f"Probe accuracies with 95% intervals; black bar chance, dotted chance + {MARGIN:.2f}; "
         "red = signal.", fig)
    return written


def _report_lines(result: AuditResult, figures: Sequence[tuple[str, str]]) -> list[str]:
    lines = ["# Shortcut audit", "", f"Data: `{result.data}`: {sum(result.counts.values())} images ("
             + ", ".join(f"{c} {n}" for c, n in result.counts.items()) + f"). {result.folds}-fold stratified "
             f"cross-validation over all images (duplicates kept in one fold), seed {result.seed}, "
             f"{result.seconds:.1f} s.", "", f"**Verdict:** {result.verdict}", "",
             "| probe | what it sees | accuracy (95% Wilson CI) | chance | signal | recall per class | model alone | "
             "inner choice per fold |", "|---|---|---|---|---|---|---|---|"]
    for p in result.probes:
        lines.append(f"| {p.name} | {p.what} | {pct(p.accuracy)} ({pct(p.low)}–{pct(p.high)}) | "
                     f"{pct(p.chance)} | {'**yes**' if p.signal else 'no'} | {_mix(p.recall, pct)} | "
                     f"{pct(p.model_accuracy)} | {', '.join(p.chosen)} |")
    lines += ["", f"Chance is the majority-class rate; a probe shows signal when its interval's lower bound exceeds "
              f"chance + {MARGIN:.2f}. \"majority\" in the last column means the inner cross-validation preferred "
              "predicting the largest class to the probe's model (no usable signal in that fold); \"model alone\" "
              "is the probe's model forced in every fold (below chance on labels that carry no signal).", ""]
    lines += [f"![{name}](figures/{name})\n\n{caption}\n" for name, caption in figures]
    lines += ["## Per-class statistics", "", "| class | n | width (min/median/max) | height | kB (median) | "
              "grey mean | grey std | formats | modes |", "|---|---|---|---|---|---|---|---|---|"]
    for c, s in result.class_stats.items():
        w, h = s["width"], s["height"]
        lines.append(f"| {c} | {s['count']} | {w['min']:.0f}/{w['median']:.0f}/{w['max']:.0f} | {h['min']:.0f}/"
                     f"{h['median']:.0f}/{h['max']:.0f} | {s['kilobytes']['median']:.0f} | {s['grey_mean']:.1f} | "
                     f"{s['grey_std']:.1f} | {_mix(s['formats'])} | {_mix(s['modes'])} |")
    d = result.duplicates
    lines += ["", "## Duplicates", "", f"{d['pairs_total']} pair(s), {d['across_classes']} with different labels: "
              + (", ".join(f"{k} {v}" for k, v in d["counts"].items() if v) or "none") + ".", ""]
    if d["pairs"]:
        lines += ["| a | b | kind | distance | labels |", "|---|---|---|---|---|"]
        lines += [f"| {p['a']} | {p['b']} | {p['kind']} | {p['distance']} | {p['label_a']} / {p['label_b']} |"
                  for p in d["pairs"][:100]]
        lines.append("" if d["pairs_total"] <= 100 else f"\n({d['pairs_total'] - 100} more in audit.json)\n")
    if result.skipped:
        lines += ["## Files left out", ""] + [f"- {s['path']}: {s['reason']}" for s in result.skipped] + [""]
    return lines


def _mix(tally: dict[str, Any], show: Callable[[Any], str] = str) -> str:
    return ", ".join(f"{k} {show(v)}" for k, v in tally.items())


def write_report(result: AuditResult, ds: Dataset, out: Path,
                 figures: Callable[[AuditResult, Dataset, Path], list[tuple[str, str]]] = _figures) -> Path:
    """``out/audit.md`` with figures in ``out/figures/`` and ``out/audit.json`` (the ``--json`` object); every
    file is written atomically."""
    made = figures(result, ds, out / "figures")
    path = out / "audit.md"
    result.report = str(path)
    write_json(out / "audit.json", result.to_dict())
    write_text(path, "\n".join(_report_lines(result, made)) + "\n")
    return path


def audit_to(data: str | os.PathLike[str], out: str | os.PathLike[str], seed: int = 0, folds: int = 5) -> AuditResult:
    """The audit of ``data`` with ``audit.md``, ``audit.json`` and ``figures/`` written to ``out``."""
    result, ds = audit_folder(data, seed, folds)
    result.report = str(write_report(result, ds, Path(out)))
    return result
