"""Tests for lungxray.metrics: against scikit-learn and scipy on random cases, and hand-computed cases."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest
import sklearn.metrics as skm
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from lungxray.evaluation import metrics as M
from lungxray.inference.combine import predictive_uncertainty

CLASSES = ["covid", "normal", "pneumonia"]


def random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, str]:
    """A random (y_true, probs) with the awkward cases mixed in: absent classes, unpredicted classes, ties."""
    c = int(rng.integers(2, 5))
    n = int(rng.integers(1, 80))
    kind = ["plain", "absent", "unpredicted", "ties", "absent+unpredicted"][int(rng.integers(0, 5))]
    y = rng.integers(0, c, n)
    probs = rng.dirichlet(np.full(c, 0.7), n)
    if "absent" in kind:  # the last class never occurs in y_true
        y[y == c - 1] = 0
    if "unpredicted" in kind:  # class 1 is never the argmax
        probs[:, 1] = 0.0
        probs /= probs.sum(1, keepdims=True)
    if kind == "ties":  # rows drawn from a small pool: many tied scores for the AUC
        probs = rng.dirichlet(np.ones(c), 4)[rng.integers(0, 4, n)]
    return y, probs, c, kind


def expected_sklearn(y: np.ndarray, probs: np.ndarray, c: int) -> dict:
    labels = list(range(c))
    pred = probs.argmax(1)
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    in_y = sorted(set(y.tolist()))  # macro averages leave classes without an image out
    mp, mr, mf, _ = skm.precision_recall_fscore_support(y, pred, labels=in_y, average="macro", zero_division=0)
    (tn, fp), _ = skm.multilabel_confusion_matrix(y, pred, labels=labels).transpose(1, 2, 0)
    present = [k for k in labels if 0 < np.sum(y == k) < y.size]
    auc = [skm.roc_auc_score(y == k, probs[:, k]) if k in present else None for k in labels]
    macro_auc = float(np.mean([a for a in auc if a is not None])) if present else None
    # undefined per-class figures are None: no image (recall), never predicted (precision), neither (F1)
    p = [p[k] if np.sum(pred == k) else None for k in labels]
    r = [r[k] if np.sum(y == k) else None for k in labels]
    f = [f[k] if np.sum(y == k) + np.sum(pred == k) else None for k in labels]
    spec = np.divide(tn, tn + fp, out=np.zeros(c), where=tn + fp > 0)
    spec = [spec[k] if np.sum(y == k) < y.size else None for k in labels]
    return {
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "macro_precision": mp,
        "macro_recall": mr,
        "macro_f1": mf,
        "weighted_f1": skm.f1_score(y, pred, labels=labels, average="weighted", zero_division=0),
        "precision": p,
        "recall": r,
        "f1": f,
        "support": s,
        "specificity": spec,
        "auc": auc,
        "macro_roc_auc": macro_auc,
        "confusion": skm.confusion_matrix(y, pred, labels=labels),
        "nll": skm.log_loss(y, probs, labels=labels),
        "brier": skm.mean_squared_error(np.eye(c)[y], probs) * c,
    }


def close(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, abs_tol=1e-9))


def test_classification_metrics_match_sklearn_on_random_cases() -> None:
    rng = np.random.default_rng(1234)
    kinds = set()
    for _ in range(100):
        y, probs, c, kind = random_case(rng)
        kinds.add(kind)
        names = [f"c{k}" for k in range(c)]
        got = M.classification_metrics(y, probs, names)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exp = expected_sklearn(y, probs, c)
        for key in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1"):
            assert close(got[key], exp[key]), (key, kind, got[key], exp[key])
        assert close(got["weighted_f1"], exp["weighted_f1"])
        assert close(got["macro_roc_auc"], exp["macro_roc_auc"]), (kind, got["macro_roc_auc"])
        assert close(got["nll"], exp["nll"]) and close(got["brier"], exp["brier"])
        assert got["confusion"] == exp["confusion"].tolist() and got["n"] == y.size
        for k, name in enumerate(names):
            pc = got["per_class"][name]
            for key in ("precision", "recall", "f1", "specificity"):
                want = exp[key][k]
                assert close(pc[key], None if want is None else float(want)), (key, kind, pc[key], want)
            assert pc["support"] == exp["support"][k]
            assert close(pc["roc_auc"], exp["auc"][k]), (kind, k)
        json.dumps(got, allow_nan=False)  # JSON-ready: undefined AUCs are None, not NaN
    assert len(kinds) == 5


def test_hand_computed_three_class_case() -> None:
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 1, 0, 1, 2, 2, 1, 0, 2])
    probs = np.full((9, 3), 0.1)
    probs[np.arange(9), pred] = 0.8
    cm = [[2, 1, 0], [0, 1, 1], [1, 1, 2]]
    assert M.confusion_matrix(y, pred, 3).tolist() == cm
    got = M.classification_metrics(y, probs, CLASSES)
    assert got["confusion"] == cm
    assert got["accuracy"] == pytest.approx(5 / 9)
    precision, recall = [2 / 3, 1 / 3, 2 / 3], [2 / 3, 1 / 2, 1 / 2]
    f1, specificity = [2 / 3, 2 / 5, 4 / 7], [5 / 6, 5 / 7, 4 / 5]
    for k, name in enumerate(CLASSES):
        pc = got["per_class"][name]
        assert (pc["precision"], pc["recall"]) == pytest.approx((precision[k], recall[k]))
        assert (pc["f1"], pc["specificity"]) == pytest.approx((f1[k], specificity[k]))
    assert pc["support"] == 4
    assert got["macro_f1"] == pytest.approx(np.mean(f1))
    assert got["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 2 / 5 + 4 * 4 / 7) / 9)
    assert got["balanced_accuracy"] == pytest.approx(np.mean(recall))
    assert got["nll"] == pytest.approx(-(5 * np.log(0.8) + 4 * np.log(0.1)) / 9)
    assert got["brier"] == pytest.approx((5 * (0.04 + 0.02) + 4 * (0.01 + 0.81 + 0.64)) / 9)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=0, max_size=40))
def test_confusion_matrix_matches_sklearn(pairs: list[tuple[int, int]]) -> None:
    t = np.array([a for a, _ in pairs], dtype=int)
    p = np.array([b for _, b in pairs], dtype=int)
    got = M.confusion_matrix(t, p, 4)
    assert got.shape == (4, 4) and got.sum() == len(pairs)
    if pairs:
        assert got.tolist() == skm.confusion_matrix(t, p, labels=[0, 1, 2, 3]).tolist()


def test_ece_and_reliability_curve_by_hand() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.25, 0.65, 0.1], [0.05, 0.1, 0.85], [0.45, 0.35, 0.2], [0.05, 0.9, 0.05]])
    y = np.array([0, 2, 2, 1, 1])  # correct, wrong (0.65), correct, wrong (0.45), correct
    # 5 bins: (0.4, 0.6] holds {0.45 wrong}; (0.6, 0.8] {0.7 ok, 0.65 wrong}; (0.8, 1] {0.85 ok, 0.9 ok}
    expected = 0.45 * 1 / 5 + abs(0.5 - 0.675) * 2 / 5 + abs(1.0 - 0.875) * 2 / 5
    assert M.expected_calibration_error(probs, y, n_bins=5) == pytest.approx(expected)
    assert expected == pytest.approx(0.21)
    curve = M.reliability_curve(probs, y, n_bins=5)
    assert curve["counts"].tolist() == [0, 0, 1, 2, 2]
    assert curve["centers"] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    assert np.isnan(curve["accuracy"][0]) and curve["accuracy"][2:] == pytest.approx([0.0, 0.5, 1.0])
    assert curve["confidence"][2:] == pytest.approx([0.45, 0.675, 0.875])
    perfect = np.eye(3)[[0, 1, 2, 1]]
    assert M.expected_calibration_error(perfect, np.array([0, 1, 2, 1])) == 0.0


def test_ece_matches_naive_loop() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        probs = rng.dirichlet(np.ones(3) * 0.5, 50)
        y = rng.integers(0, 3, 50)
        conf, correct = probs.max(1), probs.argmax(1) == y
        ece = 0.0
        for lo, hi in zip(np.linspace(0, 1, 16)[:-1], np.linspace(0, 1, 16)[1:], strict=True):
            m = (conf > lo) & (conf <= hi)
            if m.any():
                ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
        assert M.expected_calibration_error(probs, y) == pytest.approx(ece)


def make_dataset(n: int, accuracy: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Three-class labels and probabilities whose argmax is right with probability `accuracy`."""
    y = rng.integers(0, 3, n)
    right = rng.random(n) < accuracy
    pred = np.where(right, y, (y + rng.integers(1, 3, n)) % 3)
    probs = rng.dirichlet(np.ones(3), n) * 0.5
    probs[np.arange(n), pred] += 0.5
    return y, probs


def test_bootstrap_matches_materialised_resamples() -> None:
    """The vectorised (count-matrix) bootstrap equals scoring each resample explicitly with sklearn."""
    rng = np.random.default_rng(3)
    y, probs = make_dataset(66, 0.75, rng)
    r = 100
    got = M.bootstrap_intervals(y, probs, CLASSES, n_resamples=r, seed=11)
    idx = np.random.default_rng(11).integers(0, 66, size=(r, 66))  # same draws as the implementation
    bal, f1, auc, f1c = [], [], [], []
    for i in idx:
        yt, pr = y[i], probs[i]
        bal.append(skm.balanced_accuracy_score(yt, pr.argmax(1)))
        f1.append(skm.f1_score(yt, pr.argmax(1), labels=[0, 1, 2], average="macro", zero_division=0))
        auc.append(skm.roc_auc_score(yt, pr, multi_class="ovr", labels=[0, 1, 2]))
        f1c.append(skm.f1_score(yt == 0, pr.argmax(1) == 0))
    for key, vals in (("balanced_accuracy", bal), ("macro_f1", f1), ("macro_roc_auc", auc), ("f1_covid", f1c)):
        assert (got[key].low, got[key].high) == pytest.approx(tuple(np.percentile(vals, [2.5, 97.5])))


def test_bootstrap_intervals_properties() -> None:
    rng = np.random.default_rng(0)
    y, probs = make_dataset(66, 0.85, rng)
    full = M.classification_metrics(y, probs, CLASSES)
    iv = M.bootstrap_intervals(y, probs, CLASSES, n_resamples=2000, seed=7)
    expected_keys = {"accuracy", "macro_f1", "macro_precision", "macro_recall", "balanced_accuracy"}
    expected_keys |= {"macro_roc_auc"} | {f"{m}_{c}" for m in ("recall", "precision", "f1") for c in CLASSES}
    assert set(iv) == expected_keys
    for key, interval in iv.items():
        assert interval.low <= interval.value <= interval.high, key
    assert iv["accuracy"].value == full["accuracy"]
    assert iv["recall_covid"].value == full["per_class"]["covid"]["recall"]
    assert iv == M.bootstrap_intervals(y, probs, CLASSES, n_resamples=2000, seed=7)  # reproducible
    assert iv != M.bootstrap_intervals(y, probs, CLASSES, n_resamples=2000, seed=8)
    y_big, probs_big = make_dataset(660, 0.85, rng)
    big = M.bootstrap_intervals(y_big, probs_big, CLASSES, n_resamples=2000, seed=7)
    width = lambda i: i.high - i.low  # noqa: E731
    assert width(big["accuracy"]) < 0.5 * width(iv["accuracy"])
    assert width(big["macro_f1"]) < 0.5 * width(iv["macro_f1"])


def test_bootstrap_coverage_of_binomial_accuracy() -> None:
    rng = np.random.default_rng(2024)
    hits = 0
    for i in range(200):
        y, probs = make_dataset(66, 0.8, rng)
        iv = M.bootstrap_intervals(y, probs, CLASSES, n_resamples=500, seed=i)["accuracy"]
        hits += iv.low <= 0.8 <= iv.high
    assert 0.88 <= hits / 200 <= 0.99


def test_bootstrap_with_absent_and_unpredicted_classes() -> None:
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1])  # class 2 absent from y_true and never predicted
    probs = np.array([[0.8, 0.2, 0.0]] * 4 + [[0.3, 0.7, 0.0]] * 4)
    iv = M.bootstrap_intervals(y, probs, CLASSES, n_resamples=300)
    assert iv["recall_pneumonia"].to_dict() == {"value": None, "low": None, "high": None}  # no image: n/a
    assert iv["precision_pneumonia"].to_dict() == {"value": None, "low": None, "high": None}  # never predicted
    assert iv["macro_roc_auc"].value == 0.5  # over the two classes with an AUC
    assert 0.0 <= iv["accuracy"].low <= iv["accuracy"].value == 0.5 <= iv["accuracy"].high <= 1.0


def test_macro_scores_leave_absent_classes_out() -> None:
    """A folder with two of three classes, every image right: 100% macro F1, not 66.7%; the third class n/a."""
    y = np.array([0, 0, 0, 1, 1])
    probs = np.eye(3)[y] * 0.9 + 0.1 / 3
    got = M.classification_metrics(y, probs, CLASSES)
    assert got["accuracy"] == 1.0 and got["macro_f1"] == 1.0 and got["macro_precision"] == 1.0
    assert got["absent_classes"] == ["pneumonia"]
    assert got["per_class"]["pneumonia"]["precision"] is None and got["per_class"]["pneumonia"]["recall"] is None
    assert got["macro_roc_auc"] == 1.0
    iv = M.bootstrap_intervals(y, probs, CLASSES, n_resamples=200)
    assert iv["macro_f1"].value == 1.0
    assert M.format_interval(iv["recall_pneumonia"]) == "n/a"


def test_proportions_get_wilson_intervals_that_never_collapse() -> None:
    """26/26 COVID recall: a percentile bootstrap says 100-100; Wilson (as scipy computes it) says 87.1-100."""
    for k, n in ((26, 26), (0, 10), (61, 66), (3, 7), (1, 1)):
        iv = M.wilson_interval(k, n)
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert (iv.value, iv.low, iv.high) == pytest.approx((k / n, ref.low, ref.high))
        assert iv.high - iv.low > 0.05
    assert M.wilson_interval(26, 26).low == pytest.approx(0.8713, abs=1e-4)
    assert M.format_interval(M.wilson_interval(0, 0)) == "n/a"
    y = np.zeros(26, dtype=int)
    probs = np.tile([0.9, 0.05, 0.05], (26, 1))
    iv = M.bootstrap_intervals(y, probs, CLASSES, n_resamples=200)
    assert iv["recall_covid"].value == 1.0 and iv["recall_covid"].low < 0.9  # not "100.0% (100.0%-100.0%)"
    assert iv["accuracy"] == M.wilson_interval(26, 26)


def test_bootstrap_is_fast() -> None:
    y, probs = make_dataset(66, 0.85, np.random.default_rng(1))
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        M.bootstrap_intervals(y, probs, CLASSES, n_resamples=2000)
        best = min(best, time.perf_counter() - t0)
    assert best < 0.5


def test_softmax_is_stable() -> None:
    z = np.array([[1000.0, 1001.0, 1002.0], [-1000.0, 0.0, 5.0]])
    assert np.allclose(M.softmax(z), special.softmax(z, axis=1))
    assert np.allclose(M.softmax(z, 2.0), special.softmax(z / 2, axis=1))
    assert np.all(np.isfinite(M.softmax(z, 0.01)))


@pytest.mark.parametrize("t0", [0.5, 2.5])
def test_fit_temperature_recovers_known_temperature(t0: float) -> None:
    rng = np.random.default_rng(int(t0 * 10))
    z = rng.normal(0.0, 3.0, (4000, 3))
    p_true = M.softmax(z, t0)
    y = (rng.random(4000)[:, None] > np.cumsum(p_true, axis=1)).sum(1)  # labels sampled from softmax(z/T0)
    t = M.fit_temperature(z, y)
    assert abs(t - t0) / t0 < 0.10
    nll = lambda temp: skm.log_loss(y, M.softmax(z, temp), labels=[0, 1, 2])  # noqa: E731
    assert nll(t) < nll(1.0)
    ensemble_logits = np.log(np.clip(p_true, 0.0, None))  # the ensemble route: log of mean probs
    assert M.fit_temperature(ensemble_logits, y) == pytest.approx(1.0, rel=0.1)


def test_predictive_uncertainty() -> None:
    member = np.array([0.7, 0.2, 0.1])
    same = predictive_uncertainty(np.tile(member, (2, 5, 1)))
    assert np.allclose(same["mutual_information"], 0.0, atol=1e-12)
    assert np.allclose(same["entropy"], same["expected_entropy"])
    assert same["vote_share"].tolist() == [1.0, 1.0] and np.allclose(same["mean_probs"], member)
    hi, lo = 0.8, 0.1
    votes = np.array([[hi, lo, lo], [hi, lo, lo], [lo, hi, lo], [lo, lo, hi]])  # labels 0, 0, 1, 2
    certain = np.eye(3)  # three members each certain of a different class
    out = predictive_uncertainty(np.stack([votes, np.vstack([certain, certain[:1]])]))
    assert out["label"].tolist() == [0, 0]
    assert out["vote_share"].tolist() == [0.5, 0.5]
    assert np.all(out["mutual_information"] > 0.05)
    single = predictive_uncertainty(certain[None])  # one image, uniform mean of confident members
    assert single["entropy"][0] == pytest.approx(1.0) and single["expected_entropy"][0] == pytest.approx(0.0)
    assert single["mutual_information"][0] == pytest.approx(1.0)
    assert single["vote_share"][0] == pytest.approx(1 / 3)


def test_mcnemar() -> None:
    a = np.array([1] * 8 + [0] * 2 + [1] * 20 + [0] * 5, dtype=bool)  # b = 8, c = 2
    b = np.array([0] * 8 + [1] * 2 + [1] * 20 + [0] * 5, dtype=bool)
    res = M.mcnemar_test(a, b)
    assert (res["b"], res["c"]) == (8, 2)
    assert res["p_value"] == pytest.approx(112 / 1024)  # 2 * P(X <= 2), X ~ Bin(10, 1/2)
    assert res["p_value"] == pytest.approx(stats.binomtest(8, 10, 0.5).pvalue)
    a = np.array([1] * 30 + [0] * 15 + [1] * 10, dtype=bool)  # b = 30, c = 15: chi-square branch
    b = np.array([0] * 30 + [1] * 15 + [1] * 10, dtype=bool)
    res = M.mcnemar_test(a, b)
    assert res["statistic"] == pytest.approx(14**2 / 45)
    assert res["p_value"] == pytest.approx(stats.chi2.sf(14**2 / 45, 1)) and res["method"] == "chi2"
    assert M.mcnemar_test(a, a)["p_value"] == 1.0


def test_paired_difference_matches_ttest_rel() -> None:
    rng = np.random.default_rng(9)
    for _ in range(10):
        a = rng.normal(0.85, 0.03, 5)
        b = a + rng.normal(0.01, 0.02, 5)
        got = M.paired_difference(a, b)
        ref = stats.ttest_rel(b, a)
        ci = ref.confidence_interval(0.95)
        assert got["mean"] == pytest.approx(np.mean(b - a)) and got["p_value"] == pytest.approx(ref.pvalue)
        assert (got["low"], got["high"]) == pytest.approx((ci.low, ci.high))
    a = np.array([0.8, 0.9, 0.85])
    assert M.paired_difference(a, a + 0.02) == pytest.approx(
        {"n": 3, "mean": 0.02, "std": 0.0, "low": 0.02, "high": 0.02, "p_value": 0.0}, abs=1e-12
    )
    assert M.paired_difference(a, a)["p_value"] == 1.0


def test_mean_interval() -> None:
    v = np.array([0.81, 0.86, 0.84, 0.9, 0.79])
    iv = M.mean_interval(v)
    low, high = stats.t.interval(0.95, 4, loc=v.mean(), scale=stats.sem(v))
    assert (iv.value, iv.low, iv.high) == pytest.approx((v.mean(), low, high))
    assert M.mean_interval(np.array([0.8, 0.8])) == M.Interval(0.8, 0.8, 0.8)
    assert M.mean_interval(np.array([0.8])).to_dict() == {"value": 0.8, "low": None, "high": None}


def test_selective_accuracy() -> None:
    correct = np.array([1, 1, 0, 1, 0], dtype=bool)
    unc = np.array([0.1, 0.2, 0.9, 0.3, 0.5])
    res = M.selective_accuracy(correct, unc, 0.3)
    assert res["n_accepted"] == 3 and res["coverage"] == pytest.approx(0.6)
    assert res["accuracy"] == 1.0 and res["referral_rate"] == pytest.approx(0.4)
    assert M.selective_accuracy(correct, unc, 0.0)["accuracy"] is None
    assert M.selective_accuracy(correct, unc, 1.0)["accuracy"] == pytest.approx(0.6)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=60, unique=True),
    st.floats(0, 1, allow_nan=False),
)
def test_threshold_for_coverage_gives_requested_coverage(values: list[float], coverage: float) -> None:
    u = np.array(values)
    t = M.threshold_for_coverage(u, coverage)
    assert np.mean(u <= t) == math.floor(coverage * u.size + 1e-9) / u.size


def test_threshold_for_coverage_ties_and_edges() -> None:
    u = np.array([0.1, 0.2, 0.2, 0.3])
    assert np.mean(u <= M.threshold_for_coverage(u, 0.5)) == 0.25  # the tie at the cut is referred
    assert np.mean(u <= M.threshold_for_coverage(u, 1.0)) == 1.0
    assert np.mean(u <= M.threshold_for_coverage(u, 0.0)) == 0.0
    with pytest.raises(ValueError):
        M.threshold_for_coverage(u, 1.5)


def test_format_interval_and_to_dict() -> None:
    iv = M.Interval(0.924, 0.864, 0.97)
    assert M.format_interval(iv) == "92.4% (86.4–97.0)"
    assert M.format_interval(iv, percent=False) == "0.924 (0.864–0.970)"
    assert M.format_interval(M.Interval(math.nan, math.nan, math.nan)) == "n/a"
    assert iv.to_dict() == {"value": 0.924, "low": 0.864, "high": 0.97}


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        M.classification_metrics(np.array([0, 1]), np.ones((3, 3)) / 3, CLASSES)
    with pytest.raises(ValueError):
        M.classification_metrics(np.array([0, 3]), np.ones((2, 3)) / 3, CLASSES)
    with pytest.raises(ValueError):
        M.classification_metrics(np.array([0, 1]), np.ones((2, 2)) / 2, CLASSES)
