"""Markdown reports with matplotlib figures: what a reader needs to trust (or distrust) a run.

Every test number is shown with its 95% interval (Wilson for proportions, percentile bootstrap for F1, AUC and
macro averages), and again without the test images that have a copy in the training split; the report also lists
the duplicates found between splits, the files that could not be read, the configuration and the timings. Every
figure carries its panels' titles and axis labels in its PNG metadata (`figure_labels`), so a test can check
that none is missing.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from lungxray.config import RunConfig
from lungxray.evaluation.formatting import ci, pct
from lungxray.io.files import atomic_write, write_text


def write_rows_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """CSV with the union of the rows' keys as columns, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def subplots(*args: Any, figsize: tuple[float, float] | None = None, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure without pyplot: no global backend switch, so a notebook keeps its inline plots."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


FIGURE_LABELS_KEY = "lungxray:axes"  # PNG text chunk: JSON list of each panel's title, axis labels and kind


def figure_labels(fig: Figure) -> list[dict[str, Any]]:
    """Title, axis labels and kind of each panel that shows something (blank cells of a grid are left out)."""
    panels = []
    for ax in fig.axes:
        shows = bool(ax.lines or ax.images or ax.patches or ax.collections)
        if not shows:
            continue
        panels.append({"title": ax.get_title() or ax.get_title("left"), "xlabel": ax.get_xlabel(),
                       "ylabel": ax.get_ylabel(), "image": bool(ax.images) and not ax.lines, "twin": ax.get_label()
                       == "twin"})
    return panels


def save_figure(fig: Figure, path: Path) -> Path:
    meta = {FIGURE_LABELS_KEY: json.dumps(figure_labels(fig))}
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata=meta))
    return path


def plot_history(history: list[dict[str, Any]], path: Path) -> Path:
    """Loss and accuracy per epoch (train vs validation), with learning rate and batch size.

    Sequentially trained members each have their own curves (records carry a "member" key).
    """
    runs: dict[int, list[dict[str, Any]]] = {}
    for h in history:
        runs.setdefault(int(h.get("member", 0)), []).append(h)
    batches = {h["batch_size"] for h in history}
    fig, axes = subplots(1, 3, figsize=(14, 3.4))
    fig.subplots_adjust(wspace=0.4)  # room for the log-scale tick labels beside each y-axis label
    twin = axes[2].twinx() if len(batches) > 1 else None  # a constant batch size is said in the title instead
    for k, run in runs.items():
        epochs = [h["epoch"] for h in run]
        first = k == min(runs)
        for ax, key in ((axes[0], "loss"), (axes[1], "accuracy")):
            ax.plot(epochs, [h[f"train_{key}"] for h in run], color="tab:blue", alpha=0.8,
                    label="train" if first else None)
            ax.plot(epochs, [h[f"val_{key}"] for h in run], color="tab:orange", alpha=0.8,
                    label="validation" if first else None)
        axes[2].plot(epochs, [h["lr"] for h in run], color="tab:green")
        if twin is not None:
            twin.plot(epochs, [h["batch_size"] for h in run], color="tab:red")
    for ax, title, ylabel in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "accuracy", "accuracy")):
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.legend()
    if twin is not None:
        twin.set_label("twin")
        twin.set_ylabel("batch size (red)", color="tab:red")
        axes[2].set(title="learning rate (green) and batch size (red)")
    else:
        axes[2].set(title=f"learning rate (batch size {next(iter(batches), '?')} throughout)")
    axes[2].set(xlabel="epoch", ylabel="learning rate (log scale)", yscale="log")
    return save_figure(fig, path)


def plot_confusion(confusion: list[list[int]], classes: Sequence[str], path: Path, title: str) -> Path:
    cm = np.asarray(confusion)
    fig, ax = subplots(figsize=(3.8, 3.4))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            color = "white" if cm[i, j] > cm.max() / 2 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color)
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    return save_figure(fig, path)


def plot_reliability(reliability: dict[str, list[float]], path: Path, title: str) -> Path:
    fig, ax = subplots(figsize=(3.8, 3.4))
    counts = np.asarray(reliability["counts"])
    used = counts > 0
    centres = np.asarray(reliability["centers" if "centers" in reliability else "centres"])[used]
    accuracy = np.asarray(reliability["accuracy"])[used]
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.bar(centres, accuracy, width=1 / len(counts), alpha=0.7, edgecolor="k", label="accuracy per bin")
    for x, y, n in zip(centres, accuracy, counts[used], strict=True):  # how many images each bar rests on
        ax.text(x, min(y, 0.93) + 0.02, str(int(n)), ha="center", va="bottom", fontsize=6)
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.05),
           title=f"{title}; numbers: images per bin")
    ax.legend(fontsize=6, loc="upper left")
    return save_figure(fig, path)


def plot_cam_gallery(overlays: Sequence[np.ndarray], titles: Sequence[str], path: Path, cols: int = 6) -> Path:
    """A grid of Grad-CAM overlays (uint8 RGB) with their labels, for spotting shortcut learning at a glance."""
    rows = max(1, -(-len(overlays) // cols))
    fig, axes = subplots(rows, cols, figsize=(2.3 * cols, 2.9 * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.55, wspace=0.08)  # room for three-line titles: no overlap with the row above
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, title in zip(axes.ravel(), overlays, titles, strict=False):
        ax.imshow(image)
        ax.set_title(title, fontsize=6.5, color="red" if "WRONG" in title else "black")
    return save_figure(fig, path)


def saliency_section(saliency: dict[str, Any]) -> list[str]:
    """Where the test-set Grad-CAM mass lies: near the uniform baseline or below it hints at shortcut learning."""
    lines = ["## Saliency (Grad-CAM, test split)", "",
             f"Central mass: {pct(saliency.get('central_mass_mean'))} of the saliency lies inside the image minus "
             f"a {100 * saliency['margin']:.0f}% band on every edge (uniform maps give "
             f"{pct(saliency['uniform_baseline'])}; far below that, the model reads borders, corners or burned-in "
             f"text rather than the lungs). Correct {pct(saliency.get('correct'))}, wrong "
             f"{pct(saliency.get('wrong'))}; per true class: "
             + ", ".join(f"{c} {pct(v)}" for c, v in saliency.get("per_true_class", {}).items()) + ".", ""]
    if saliency.get("gallery"):
        lines += ["Overlays for the predicted class (all misclassified test images, then correct ones; "
                  "c = central mass):", "", f"![Grad-CAM gallery](figures/{saliency['gallery']})", ""]
    return lines


INTERVALS_NOTE = ("95% intervals: Wilson score for proportions (accuracy, precision, recall), percentile bootstrap "
                  "over images (2,000 resamples) for F1, macro averages and ROC AUC.")


def absent_note(m: dict[str, Any]) -> list[str]:
    """The sentence saying which classes had no image and were left out of the macro averages (or nothing)."""
    absent = m.get("absent_classes") or []
    if not absent:
        return []
    return [f"No image of {', '.join(absent)}: left out of every macro average; its recall is n/a.", ""]


def without_copies_note(without: dict[str, Any] | None) -> str | None:
    """'without the 8 test images (6 exact, 2 near) that have a copy in the training split', or None."""
    if not without or not without.get("excluded"):
        return None
    per = ", ".join(f"{c} {n}" for c, n in without.get("excluded_per_class", {}).items() if n)
    return (f"without the {without['excluded']} test images ({without['exact']} exact, {without['near']} near copies; "
            f"{per}) that have a copy in the training split")


def _correct(m: dict[str, Any]) -> int:
    return sum(m["confusion"][i][i] for i in range(len(m["confusion"])))


def terminal_scores(scores: dict[str, Any], without: dict[str, Any] | None = None, what: str = "test") -> list[str]:
    """The terminal lines for one scored set: accuracy, macro F1 and AUC, recall per class with counts; beside
    each, the same figure without the images copied in the training split (when there are any); absent classes
    are said, and 'n/a' stands where a figure has no data."""
    m, iv = scores["metrics"], scores["intervals"]
    other = without.get("scores") if without else None
    om, oiv = (other["metrics"], other["intervals"]) if other else ({}, {})

    def beside(text: str, alt: str) -> str:
        return f"{text:<46} | {alt}" if other else text

    lines = []
    if other:
        lines.append(f"(right of |: {without_copies_note(without)}, {om['n']} images left)")
    elif without and without.get("excluded"):
        lines.append(f"note: {without_copies_note(without)}: every {what} image has one, nothing left to score")
    lines.append(beside(f"{what} accuracy {ci(iv['accuracy'])} ({_correct(m)}/{m['n']} correct)",
                        f"{ci(oiv.get('accuracy'))} ({_correct(om)}/{om['n']} correct)" if other else ""))
    lines.append(beside(f"{what} macro F1 {ci(iv['macro_f1'])}", ci(oiv.get("macro_f1"))))
    lines.append(beside(f"{what} macro ROC AUC {ci(iv.get('macro_roc_auc'))}", ci(oiv.get("macro_roc_auc"))))
    for i, c in enumerate(m["per_class"]):
        n_c = m["per_class"][c]["support"]
        here = f"  recall {c}: {ci(iv.get(f'recall_{c}'))} ({m['confusion'][i][i]}/{n_c})" if n_c else \
            f"  recall {c}: n/a (no {c} image)"
        alt = ""
        if other:
            on = om["per_class"][c]["support"]
            alt = f"{ci(oiv.get(f'recall_{c}'))} ({om['confusion'][i][i]}/{on})" if on else "n/a"
        lines.append(beside(here, alt))
    if m.get("absent_classes"):
        lines.append(f"  no image of {', '.join(m['absent_classes'])}: left out of the macro averages")
    return lines


def evaluation_lines(result: dict[str, Any], out_dir: Path | None) -> list[str]:
    """What `lungxray evaluate` prints: the scores (and without copies of train/ images, side by side), each
    source's, the files left out by name, and where the output went (or that nothing was written)."""
    lines = [f"{result['images']} images of {result['data']}"]
    lines += terminal_scores(result["overall"], result.get("without_duplicates"), what="overall")
    for source, scores in result["sources"].items():
        m, iv = scores["metrics"], scores["intervals"]
        absent = f"; no image of {', '.join(m['absent_classes'])} (left out of macro F1)" if m.get("absent_classes") \
            else ""
        lines.append(f"  source {source} ({m['n']} images): accuracy {ci(iv['accuracy'])}, macro F1 "
                     f"{ci(iv['macro_f1'])}{absent}")
    ref = result["overall"].get("refer") or {}
    lines.append(f"referred {pct(ref.get('referral_rate'))}; accuracy on the accepted {pct(ref.get('accuracy'))}; "
                 f"mean uncertainty correct {_num3(result['overall'].get('mean_uncertainty_correct'))}, wrong "
                 f"{_num3(result['overall'].get('mean_uncertainty_wrong'))}")
    lines += site_lines(result)
    skipped = result.get("skipped") or []
    if skipped:
        lines.append(f"left out {len(skipped)} file(s) or folder(s):")
        lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:20]]
        lines += [f"  ... and {len(skipped) - 20} more (listed in the report)"] if len(skipped) > 20 else []
    lines.append(f"wrote evaluation.md, evaluation.json and predictions.csv to {out_dir}" if out_dir else
                 "nothing written (read-only; pass --out DIR to save evaluation.md, evaluation.json, predictions.csv)")
    return lines


def site_lines(result: dict[str, Any]) -> list[str]:
    """The site verdict, what referral caught, and with --adapt the cross-fitted adapted scores beside frozen."""
    lines = []
    referral = result["overall"].get("referral") or {}
    if referral.get("errors"):
        lines.append(f"errors referred: {referral['errors_referred']} of {referral['errors']} "
                     f"({referral['out_of_distribution']} images referred as out of distribution, "
                     f"{referral['uncertain']} as uncertain)")
    if result.get("shift"):
        lines.append(f"site: {result['shift']['verdict']}")
    adapted = result.get("adapted")
    if adapted:
        fm, fi = result["overall"]["metrics"], result["overall"]["intervals"]
        am, ai = adapted["overall"]["metrics"], adapted["overall"]["intervals"]
        by = f", by patient ({adapted['grouped_by_patient']} images grouped)" if adapted["grouped_by_patient"] else ""
        lines.append(f"adapted to this folder, cross-fitted ({adapted['folds']} folds{by}; each image scored by a "
                     f"model adapted on the other folds):")
        lines.append(f"  accuracy frozen {ci(fi['accuracy'])} -> adapted {ci(ai['accuracy'])}")
        lines.append(f"  macro F1 frozen {ci(fi['macro_f1'])} -> adapted {ci(ai['macro_f1'])}")
        for c, figures in am["per_class"].items():
            if figures.get("recall") is not None:
                lines.append(f"  recall {c}: {pct(fm['per_class'][c].get('recall'))} -> {pct(figures['recall'])}")
        lines += [f"  warning: {w}" for w in adapted["warnings"]]
    return lines


def _num3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def metrics_section(scores: dict[str, Any], classes: Sequence[str], title: str,
                    without: dict[str, Any] | None = None) -> list[str]:
    """Markdown for one scored split: headline metrics with intervals, per-class table, confusion.

    `without` (score_without_copies's dict) adds a column: the same figures without the images copied in training.
    """
    m, iv = scores["metrics"], scores["intervals"]
    other = without.get("scores") if without else None
    note = without_copies_note(without)
    lines = [f"## {title}", "", f"{m['n']} images. {INTERVALS_NOTE}", "", *absent_note(m)]
    if note and other:
        lines += [f"Second column: {note} ({other['metrics']['n']} images left).", "",
                  "| metric | value (95% CI) | without copies in training |", "|---|---|---|"]
    else:
        lines += ["| metric | value (95% CI) |", "|---|---|"]
    for key in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_roc_auc"):
        extra = f" {ci(other['intervals'].get(key))} |" if other else ""
        lines.append(f"| {key.replace('_', ' ')} | {ci(iv.get(key))} |{extra}")
    if other:
        lines += [f"| recall {c} | {ci(iv.get(f'recall_{c}'))} | {ci(other['intervals'].get(f'recall_{c}'))} |"
                  for c in classes]
    lines += ["", "| class | precision | recall (sensitivity) | F1 | specificity | ROC AUC | support |",
              "|---|---|---|---|---|---|---|"]
    for c in classes:
        pc = m["per_class"][c]
        auc = "n/a" if pc.get("roc_auc") is None else f"{pc['roc_auc']:.3f}"
        lines.append(f"| {c} | {ci(iv.get(f'precision_{c}'))} | {ci(iv.get(f'recall_{c}'))} | "
                     f"{ci(iv.get(f'f1_{c}'))} | {pct(pc['specificity'])} | {auc} | {pc['support']} |")
    cm = m["confusion"]
    lines += ["", "Confusion matrix (rows true, columns predicted):", "",
              "| | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    lines += [f"| **{c}** | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(classes, cm, strict=True)]
    ref = scores.get("refer") or {}
    lines += ["", f"Calibration: ECE {scores['ece_uncalibrated']:.3f} before temperature scaling, "
              f"{scores['ece_calibrated']:.3f} after.",
              f"Referral: {pct(ref.get('referral_rate'))} of images referred; accuracy on the accepted "
              f"{pct(ref.get('accuracy'))} (all images: {pct(m['accuracy'])}).",
              f"Mean uncertainty: correct {_num(scores.get('mean_uncertainty_correct'))}, "
              f"wrong {_num(scores.get('mean_uncertainty_wrong'))}.", ""]
    return lines


def _num(x: float | None) -> str:
    return "n/a (no such image)" if x is None else f"{x:.3f}"


def duplicates_text(dup: dict[str, int]) -> str:
    """'6 exact and 2 near pairs across splits; 1 exact within train' from summarize_duplicates's counts."""
    if not dup or not any(dup.values()):
        return "none"
    parts = []
    for where, label in (("across", "across splits (train and test)"), ("within_train", "within train"),
                         ("within_test", "within test")):
        e, n = dup.get(f"exact_{where}", 0), dup.get(f"near_{where}", 0)
        if e or n:
            parts.append(f"{e} exact and {n} near-copy pairs {label}")
    parts += [f"{v} {k.replace('_', ' ')}" for k, v in dup.items() if v and not k.endswith(
        ("_across", "_within_train", "_within_test"))]
    return "; ".join(parts)


def data_section(data: dict[str, Any]) -> list[str]:
    counts = ", ".join(f"{c} {n}" for c, n in data["counts"].items()) if isinstance(data["counts"], dict) \
        else str(data["counts"])
    kind, n_val = data.get("validation_kind"), data.get("validation_images")
    if kind == "out-of-bag":
        val = f"validation: out-of-bag, each of {n_val} training images scored by the members that never saw it"
    else:
        val = f"validation holdout {data['holdout']}"
    lines = ["## Data", "", f"Images per class: {counts}. Training pool {data['pool']} images ({val}), "
             f"test {data['test']}.", ""]
    dup = data.get("duplicates", {})
    lines += ["### Duplicates", "", f"Found: {duplicates_text(dup)}.", ""]
    pairs = data.get("duplicate_pairs", [])
    if pairs:
        lines += ["| kind | distance | image a | image b |", "|---|---|---|---|"]
        lines += [f"| {p['kind']} | {p['distance']} | {p['a']} | {p['b']} |" for p in pairs[:50]]
        lines += [f"\n({len(pairs) - 50} more pairs in metrics.json)" if len(pairs) > 50 else "", ""]
    skipped = data.get("skipped", [])
    lines += ["### Unreadable or skipped files", ""]
    lines += [f"- `{s['path']}`: {s['reason']}" for s in skipped] or ["None."]
    return [*lines, ""]


def write_report(run_dir: Path, cfg: RunConfig, meta: dict[str, Any], results: dict[str, Any],
                 history: list[dict[str, Any]]) -> Path:
    """report.md and its figures in the run folder."""
    classes = meta["classes"]
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    lines = [f"# Run report: {cfg.name}", "",
             f"Architecture `{meta['arch']}` {meta['arch_args']}, {meta['members']} member(s)"
             f"{' (bootstrap)' if meta.get('bootstrap') else ''}; temperature {meta['temperature']:.3f}; "
             f"git commit {meta.get('git_commit') or 'unknown'}.", ""]
    if history:
        plot_history(history, fig_dir / "learning_curves.png")
        lines += ["![learning curves](figures/learning_curves.png)", ""]
    test = results.get("test")
    if test:
        lines += metrics_section(test, classes, "Test split (scored once)", results.get("test_without_duplicates"))
        plot_confusion(test["metrics"]["confusion"], classes, fig_dir / "confusion_test.png", "test")
        plot_reliability(test["reliability"], fig_dir / "reliability_test.png", "test (calibrated)")
        lines += ["![confusion](figures/confusion_test.png) ![reliability](figures/reliability_test.png)", ""]
    if results.get("saliency"):
        lines += saliency_section(results["saliency"])
    lines += metrics_section(results["validation"], classes,
                             f"Validation ({results.get('validation_kind', 'holdout')})")
    lines += data_section(results["data"])
    t = results["timing"]
    lines += ["## Timing", "", f"{t['epochs']} epochs, training {t['train_seconds']:.0f} s "
              f"({t['train_images_per_second']:.0f} member-images/s on {t['device']}, {t['precision']}, "
              f"{t['threads']} threads); whole run {t['total_seconds']:.0f} s.", "",
              "## Configuration", "", "```yaml", cfg.to_yaml().rstrip(), "```", ""]
    return write_text(run_dir / "report.md", "\n".join(lines))


def write_evaluation_report(out_dir: Path, meta: dict[str, Any], result: dict[str, Any]) -> Path:
    """evaluation.md for `lungxray evaluate`: overall and per-source metrics on an external folder."""
    classes = meta["classes"]
    lines = [f"# Evaluation of `{meta.get('name', 'model')}` on `{result['data']}`", ""]
    lines += metrics_section(result["overall"], classes, "All images", result.get("without_duplicates"))
    plot_confusion(result["overall"]["metrics"]["confusion"], classes, out_dir / "confusion.png", "all images")
    lines += ["![confusion](confusion.png)", ""]
    for source, scores in result["sources"].items():
        lines += metrics_section(scores, classes, f"Source `{source}`")
    lines += ["## Skipped files", ""]
    lines += [f"- `{s['path']}`: {s['reason']}" for s in result["skipped"]] or ["None."]
    return write_text(out_dir / "evaluation.md", "\n".join([*lines, ""]))


def shift_table(result: dict[str, Any]) -> list[str]:
    """Markdown table of the shift benchmark: macro F1 (accuracy) per shift and severity, then the means."""
    cells = result["cells"]
    levels = max((c["level"] for c in cells), default=0)
    lines = ["| shift | simulated by augmentation | " + " | ".join(f"sev {i}" for i in range(1, levels + 1))
             + " | mean |", "|---|---|" + "---|" * (levels + 1)]
    for name, info in result["summary"]["per_shift"].items():
        by_level = {c["level"]: c for c in cells if c["shift"] == name}
        row = [f"{100 * by_level[i]['macro_f1']:.0f} ({100 * by_level[i]['accuracy']:.0f})"
               + (f" → {100 * by_level[i]['adapted']['macro_f1']:.0f}" if "adapted" in by_level[i] else "")
               if i in by_level else "–" for i in range(1, levels + 1)]
        lines.append(f"| {name} | {info['simulated_by'] or 'no (held out)'} | " + " | ".join(row)
                     + f" | **{100 * info['macro_f1']:.1f}** |")
    return lines


def shift_section(result: dict[str, Any], figure: str | None = None) -> list[str]:
    """The shift benchmark for a report: what was done, the headline means, the table, saliency, the figure."""
    s, clean = result["summary"], result["clean"]
    lines = ["## Robustness to source shift", "",
             f"{result['images']} {result['split']} images of `{result['data']}`, each shifted before the model's own "
             f"preprocessing{' (with test-time augmentation)' if result.get('tta') else ''}"
             f"{'; quick mode' if result.get('quick') else ''}. Cells: macro F1 % (accuracy %).", "",
             f"- clean: macro F1 {pct(clean['macro_f1'])}, accuracy {pct(clean['accuracy'])}",
             f"- **mean under shift: macro F1 {pct(s['mean_macro_f1'])}**, accuracy {pct(s['mean_accuracy'])} "
             f"(relative to clean: {pct(s['relative_macro_f1'])})",
             f"- held-out shifts only ({', '.join(s['held_out_shifts']) or 'none'}): macro F1 "
             f"{pct(s['held_out_macro_f1'])}; worst shift: {s['worst_shift']}", ""]
    lines += [*shift_table(result), ""]
    sal = result.get("saliency")
    if sal:
        lines += [f"Saliency (Grad-CAM on the clean images): {pct(sal['central_mass'])} of the mass in the central "
                  f"region (uniform map {pct(sal['uniform_central'])}), {pct(sal['corner_mass'])} in the corners "
                  f"(uniform {pct(sal['uniform_corner'])}); per class: "
                  + ", ".join(f"{c} {pct(v)}" for c, v in sal["per_class_central"].items()) + ".", ""]
    if figure:
        lines += [f"![shift benchmark]({figure})", ""]
    return lines


def plot_shifts(result: dict[str, Any], path: Path) -> Path:
    """Macro F1 against severity, one line per shift (dashed: held out from training augmentation)."""
    fig, ax = subplots(figsize=(7.5, 4.2))
    cmap = matplotlib.colormaps["tab20"]
    for i, (name, info) in enumerate(result["summary"]["per_shift"].items()):
        cells = sorted((c for c in result["cells"] if c["shift"] == name), key=lambda c: c["level"])
        ax.plot([0] + [c["level"] for c in cells], [result["clean"]["macro_f1"]] + [c["macro_f1"] for c in cells],
                marker="o", ms=3, color=cmap(i % 20), ls="-" if info["simulated_by"] else "--", label=name)
    ax.axhline(result["summary"]["mean_macro_f1"], color="k", lw=1, ls=":", label="mean under shift")
    ax.set(xlabel="severity (0 = clean)", ylabel="macro F1", ylim=(0, 1.02),
           title=f"shift benchmark: {result.get('model') or 'model'} ({result['split']})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5),
              title="solid: simulated by training\naugmentation; dashed: held\nout (never seen in training)",
              title_fontsize=7)
    return save_figure(fig, path)
