"""Pure metric functions: classification scores, bootstrap intervals, calibration, uncertainty, paired tests.

Everything here takes numpy arrays (labels as ints ``0..C-1``, probabilities as ``(N, C)``) and returns
floats, arrays or JSON-ready dicts; nothing knows about torch or files. Test sets are small (~66 images), so
every test metric gets an interval. Proportions (accuracy, per-class recall and precision) get Wilson score
intervals: a percentile bootstrap collapses to a point at 0/n and n/n (26/26 COVID recall would read
"100% (100-100)"), Wilson's never does. Figures that are no single proportion (F1, macro averages, ROC AUC)
keep a percentile bootstrap, vectorised over resamples (an ``(R, N)`` matrix of resample counts) so thousands
of resamples cost milliseconds. Macro averages run over the classes present in ``y_true`` only (a class with no
image has no recall to average), and per-class figures without data are None ("n/a"), never 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

_EPS = float(np.finfo(np.float64).eps)
_BOOT_KEYS = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "balanced_accuracy")
PROPORTION_METHOD = "Wilson score"  # the interval of accuracy, recall_<class> and precision_<class>


@dataclass(frozen=True)
class Interval:
    """A point estimate on the full set with a confidence interval around it."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready: NaN (undefined) becomes None."""
        return {k: _json_float(getattr(self, k)) for k in ("value", "low", "high")}


def _json_float(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _div0(num: np.ndarray, den: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """num / den with `fill` where den == 0 (sklearn's zero_division=0 when fill is 0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, fill, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _check(y_true: np.ndarray, probs: np.ndarray, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or y.size == 0:
        raise ValueError(f"need probs (N, C) and y_true (N,) with N > 0, got {p.shape} and {y.shape}")
    if num_classes is not None and p.shape[1] != num_classes:
        raise ValueError(f"probs has {p.shape[1]} columns but there are {num_classes} classes")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError("y_true holds labels outside 0..C-1")
    return y, p


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class; classes absent from both get zero rows."""
    t, p = np.asarray(y_true, dtype=np.int64).ravel(), np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError("y_true and y_pred differ in length")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError("labels outside 0..num_classes-1")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def _confusion_scores(cm: np.ndarray, present: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Scores from stacked confusion matrices (..., C, C); per-class arrays end in C. Zero division -> 0.

    Macro averages run over the `present` classes (default: those with images in y_true; the bootstrap passes
    the full set's, so every resample averages the same classes). A class with no image is left out of them.
    """
    cm = cm.astype(np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(-1), cm.sum(-2)
    n = support.sum(-1)
    precision, recall = _div0(tp, predicted), _div0(tp, support)
    f1 = _div0(2 * tp, support + predicted)
    tn = n[..., None] - support - predicted + tp
    present = support > 0 if present is None else np.broadcast_to(present, support.shape)

    def macro(x: np.ndarray) -> np.ndarray:  # mean over the present classes (balanced accuracy as sklearn's)
        return _div0(np.where(present, x, 0.0).sum(-1), present.sum(-1), fill=np.nan)

    balanced = macro(recall)
    return {
        "accuracy": _div0(tp.sum(-1), n),
        "balanced_accuracy": balanced,
        "macro_precision": macro(precision),
        "macro_recall": balanced,
        "macro_f1": macro(f1),
        "weighted_f1": _div0((f1 * support).sum(-1), n),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "specificity": _div0(tn, tn + predicted - tp),
        "support": support,
        "predicted": predicted,
    }


def _ovr_auc(y_true: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC per class for each row of `weights` (R, N) = how often each image is drawn.

    Mann-Whitney with ties counted as 1/2: sort scores once, sum weights per tied score level, then
    AUC = sum_levels w_pos * (w_neg below + w_neg at level / 2) / (W_pos * W_neg). NaN where a class has no
    positives or no negatives. Returns (R, C).
    """
    n_classes = probs.shape[1]
    out = np.full((weights.shape[0], n_classes), np.nan)
    for c in range(n_classes):
        order = np.argsort(probs[:, c], kind="stable")
        s = probs[order, c]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        w = weights[:, order]
        pos = y_true[order] == c
        wp = np.add.reduceat(w * pos, starts, axis=1)
        wn = np.add.reduceat(w * ~pos, starts, axis=1)
        below = np.cumsum(wn, axis=1) - wn
        num = (wp * (below + 0.5 * wn)).sum(1)
        out[:, c] = _div0(num, wp.sum(1) * wn.sum(1), fill=np.nan)
    return out


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """All point metrics for one scored set, JSON-ready (undefined values are None). Prediction = argmax."""
    y, p = _check(y_true, probs, len(classes))
    n_classes = len(classes)
    cm = confusion_matrix(y, p.argmax(1), n_classes)
    s = _confusion_scores(cm)
    auc = _ovr_auc(y, p, np.ones((1, y.size)))[0]
    support, predicted = cm.sum(1), cm.sum(0)

    def defined(x: float, ok: bool) -> float | None:  # None ("n/a") where the figure has no denominator
        return float(x) if ok else None

    per_class = {
        name: {
            "precision": defined(s["precision"][c], predicted[c] > 0),
            "recall": defined(s["recall"][c], support[c] > 0),
            "f1": defined(s["f1"][c], support[c] + predicted[c] > 0),
            "specificity": defined(s["specificity"][c], support[c] < y.size),
            "support": int(support[c]),
            "predicted": int(predicted[c]),
            "roc_auc": _json_float(auc[c]),
        }
        for c, name in enumerate(classes)
    }
    absent = [name for c, name in enumerate(classes) if support[c] == 0]
    onehot = np.eye(n_classes)[y]
    return {
        "n": int(y.size),
        "classes": list(classes),
        **{k: float(s[k]) for k in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall")},
        **{k: float(s[k]) for k in ("macro_f1", "weighted_f1")},
        "macro_roc_auc": _json_float(np.nanmean(auc)) if np.isfinite(auc).any() else None,  # classes with an AUC
        "absent_classes": absent,  # left out of every macro average
        "per_class": per_class,
        "confusion": cm.tolist(),
        "ece": expected_calibration_error(p, y),
        "nll": float(-np.mean(np.log(np.clip(p[np.arange(y.size), y], _EPS, 1.0)))),
        "brier": float(np.mean(np.sum((p - onehot) ** 2, axis=1))),  # multiclass Brier, range [0, 2]
    }


def _resample_stats(cm: np.ndarray, counts: np.ndarray, y: np.ndarray, p: np.ndarray, present: np.ndarray,
                    with_auc: np.ndarray, classes: Sequence[str]) -> dict[str, np.ndarray]:
    """Every bootstrapped statistic for a chunk of R resamples (confusion matrices cm (R, C, C), image counts
    (R, N)); NaN where a resample leaves it undefined, so `bootstrap_intervals` can leave those out."""
    s = _confusion_scores(cm, present)
    stat = {k: s[k] for k in _BOOT_KEYS}
    auc = _ovr_auc(y, p, counts)[:, with_auc].mean(1) if with_auc.any() else np.full(len(cm), np.nan)
    stat["macro_roc_auc"] = auc
    for c, name in enumerate(classes):
        stat[f"recall_{name}"] = np.where(s["support"][:, c] > 0, s["recall"][:, c], np.nan)
        stat[f"precision_{name}"] = np.where(s["predicted"][:, c] > 0, s["precision"][:, c], np.nan)
        defined = s["support"][:, c] + s["predicted"][:, c] > 0
        stat[f"f1_{name}"] = np.where(defined, s["f1"][:, c], np.nan)
    return stat


def bootstrap_intervals(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """95% intervals for the headline metrics and per-class recall/precision/F1.

    Proportions (accuracy, recall_<class>, precision_<class>) get Wilson score intervals (`wilson_interval`);
    the rest (F1, macro averages, balanced accuracy, ROC AUC) a percentile bootstrap over images. `value` is the
    full-set estimate. Resamples in which a statistic is undefined (a class absent, so its F1 or AUC has no
    denominator) are left out of that statistic's percentiles rather than counted as 0; a figure undefined on
    the full set (a class with no image: its recall) is NaN, shown as "n/a".
    Keys: the headline metrics, macro_roc_auc, and recall_<class>, precision_<class>, f1_<class>.
    """
    y, p = _check(y_true, probs, len(classes))
    n, n_classes = y.size, len(classes)
    pair = np.eye(n_classes * n_classes)[y * n_classes + p.argmax(1)]  # (N, C*C): each image's confusion cell
    full_cm = confusion_matrix(y, p.argmax(1), n_classes)
    present = full_cm.sum(1) > 0
    with_auc = np.isfinite(_ovr_auc(y, p, np.ones((1, n)))[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // n)  # bound memory for large test sets
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(r, n))
        counts = np.bincount((np.arange(r)[:, None] * n + idx).ravel(), minlength=r * n).reshape(r, n)
        counts = counts.astype(np.float64)
        cm = (counts @ pair).reshape(r, n_classes, n_classes)
        parts.append(_resample_stats(cm, counts, y, p, present, with_auc, classes))
    full = classification_metrics(y, p, classes)
    point = {k: full[k] for k in parts[0] if k in full}
    for name in classes:
        for m in ("recall", "precision", "f1"):
            point[f"{m}_{name}"] = full["per_class"][name][m]
    alpha = 100 * (1 - confidence) / 2
    out: dict[str, Interval] = {}
    for key in parts[0]:
        values = np.concatenate([part[key] for part in parts])
        values = values[np.isfinite(values)]
        value = np.nan if point[key] is None else float(point[key])
        # never defined in any resample (e.g. a class never predicted): the interval collapses to the value
        low, high = np.percentile(values, [alpha, 100 - alpha]) if values.size else (value, value)
        out[key] = Interval(value, float(low), float(high))
    tp, support, predicted = np.diag(full_cm), full_cm.sum(1), full_cm.sum(0)
    out["accuracy"] = wilson_interval(int(tp.sum()), n, confidence)
    for c, name in enumerate(classes):
        out[f"recall_{name}"] = wilson_interval(int(tp[c]), int(support[c]), confidence)
        out[f"precision_{name}"] = wilson_interval(int(tp[c]), int(predicted[c]), confidence)
    return out


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of the proportion k/n: never zero-width at 0/n or n/n (a percentile bootstrap is),
    close to nominal coverage for small n. NaN throughout when n == 0 (no data: "n/a")."""
    if n <= 0:
        return Interval(math.nan, math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z = float(stats.norm.ppf((1 + confidence) / 2))
    phat = k / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return Interval(phat, low, high)


def reliability_curve(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label reliability diagram: equal-width confidence bins (lo, hi]; empty bins have NaN acc/conf."""
    y, p = _check(y_true, probs)
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "edges": edges,
        "centers": (edges[:-1] + edges[1:]) / 2,
        "accuracy": _div0(np.bincount(bins, correct, n_bins), counts, fill=np.nan),
        "confidence": _div0(np.bincount(bins, conf, n_bins), counts, fill=np.nan),
        "counts": counts,
    }


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: sum over bins of |accuracy - confidence| weighted by the bin's share of images."""
    curve = reliability_curve(probs, y_true, n_bins)
    used = curve["counts"] > 0
    gap = np.abs(curve["accuracy"][used] - curve["confidence"][used])
    return float(np.sum(gap * curve["counts"][used]) / curve["counts"].sum())


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax over the last axis of logits / temperature, shifted by the max so it never overflows."""
    return np.exp(_log_softmax(np.asarray(logits, dtype=np.float64) / temperature))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature T minimising the NLL of softmax(logits / T), searched on log T (fit on validation only).

    For an ensemble pass log(mean probs); -inf (a zero probability) is clipped to a large finite negative.
    """
    z = np.nan_to_num(np.asarray(logits, dtype=np.float64), nan=0.0, neginf=-1e4, posinf=1e4)
    y, z = _check(y_true, z)
    rows = np.arange(y.size)

    def nll(log_t: float) -> float:
        return float(-_log_softmax(z / math.exp(log_t))[rows, y].mean())

    res = optimize.minimize_scalar(
        nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded", options={"xatol": 1e-5}
    )
    return float(math.exp(res.x))


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar on the discordant pairs of two models scored on the same images.

    b = A right & B wrong, c = A wrong & B right. Exact two-sided binomial when b + c < 25 (the chi-square
    approximation is poor there), otherwise chi-square with continuity correction.
    """
    a, bb = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != bb.shape:
        raise ValueError("correct_a and correct_b differ in shape")
    b, c = int(np.sum(a & ~bb)), int(np.sum(~a & bb))
    if b + c == 0:
        return {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "method": "exact"}
    if b + c < 25:
        p = stats.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
        return {"b": b, "c": c, "statistic": float(min(b, c)), "p_value": float(p), "method": "exact"}
    stat = (abs(b - c) - 1) ** 2 / (b + c)
    p = stats.chi2.sf(stat, 1)
    return {"b": b, "c": c, "statistic": float(stat), "p_value": float(p), "method": "chi2"}


def paired_difference(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> dict:
    """Mean of paired differences b - a (e.g. per-fold scores of two setups), t-interval and paired t-test.

    Zero variance gives a zero-width interval and p = 1 (no difference) or 0 (a constant nonzero difference).
    """
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = d.size
    mean = float(d.mean()) if n else math.nan
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    if n < 2:
        low = high = p = math.nan
    elif sd == 0.0:
        low = high = mean
        p = 1.0 if mean == 0.0 else 0.0
    else:
        half = stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
        p = float(2 * stats.t.sf(abs(mean / (sd / math.sqrt(n))), n - 1))
    return {"n": n, "mean": mean, "std": sd, "low": float(low), "high": float(high), "p_value": float(p)}


def mean_interval(values: np.ndarray, confidence: float = 0.95) -> Interval:
    """t-interval of a mean, for a handful of k-fold CV scores (NaN bounds with fewer than 2 values)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    mean = float(v.mean())
    if v.size < 2:
        return Interval(mean, math.nan, math.nan)
    half = float(stats.t.ppf((1 + confidence) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return Interval(mean, mean - half, mean + half)


def selective_accuracy(correct: np.ndarray, uncertainty: np.ndarray, threshold: float) -> dict:
    """Accuracy on the images kept (uncertainty <= threshold); the rest would be referred to a human."""
    ok = np.asarray(correct, dtype=bool).ravel()
    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    if ok.shape != u.shape:
        raise ValueError("correct and uncertainty differ in length")
    accepted = u <= threshold
    n_acc = int(accepted.sum())
    return {
        "threshold": float(threshold),
        "n": int(u.size),
        "n_accepted": n_acc,
        "coverage": n_acc / u.size if u.size else math.nan,
        "referral_rate": 1 - n_acc / u.size if u.size else math.nan,
        "accuracy": float(ok[accepted].mean()) if n_acc else None,
    }


def threshold_for_coverage(uncertainty: np.ndarray, coverage: float) -> float:
    """Largest-coverage threshold that accepts at most `coverage` of the images (fit it on validation).

    Accepts floor(coverage * N) images when values are distinct; ties at the cut are referred together.
    """
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must be in [0, 1], got {coverage}")
    u = np.sort(np.asarray(uncertainty, dtype=np.float64).ravel())
    if u.size == 0:
        raise ValueError("empty uncertainty array")
    k = math.floor(coverage * u.size + 1e-9)
    if k == 0:
        return float(np.nextafter(u[0], -np.inf))
    t = u[k - 1]
    if k < u.size and u[k] == t:  # a tie straddles the cut: step below it rather than over-accept
        t = np.nextafter(t, -np.inf)
    return float(t)


def format_interval(iv: Interval, percent: bool = True) -> str:
    """'92.4% (86.4–97.0)' for reports; 'n/a' for an undefined value."""
    if not math.isfinite(iv.value):
        return "n/a"
    scale, digits, unit = (100.0, 1, "%") if percent else (1.0, 3, "")
    fmt = lambda x: f"{x * scale:.{digits}f}" if math.isfinite(x) else "n/a"  # noqa: E731
    return f"{fmt(iv.value)}{unit} ({fmt(iv.low)}–{fmt(iv.high)})"
