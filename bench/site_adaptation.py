"""Measure the site tools on the data at hand: ood separation, site verdicts, Hannover with and without the
one-class guard, and the gain against the number of adaptation images. Prints Markdown tables.

    python bench/site_adaptation.py RUN [--data DATASET] [--hannover FOLDER] [--parts ood,shift,hannover,curve]

Every adapted score is cross-fitted: adaptation images and scored images never overlap (by patient for Hannover).
The curve uses the test split of DATASET with a synthetic acquisition shift (robustness.apply_shift), adapted on
n images of one half and scored on the other half, both ways, averaged over `--repeats` draws.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lungxray.evaluation import metrics
from lungxray.evaluation.robustness import apply_shift
from lungxray.inference.predictor import Predictor
from lungxray.io.dataset import Dataset, load_dataset
from lungxray.sites.adapt import AdaptSettings, adapt_predictor, crossfit, patient_groups, restore_source
from lungxray.sites.shift import shift_test
from lungxray.transforms.preprocess import prepare


def _prep(predictor: Predictor, images: np.ndarray) -> np.ndarray:
    c = predictor.meta["input"]
    return prepare(images, c.get("standardize", "none"), c.get("crop_border", 0.0))


def _scores(predictor: Predictor, images: np.ndarray) -> np.ndarray:
    return predictor.ood_scores(predictor.member_outputs(images)[1])  # type: ignore[return-value]


def non_chest(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic inputs a model must not answer: a CT-like slice, flat grey, noise, a gradient, a checkerboard."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    body = ((xx - 0.5) / 0.43) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1
    lungs = ((xx - 0.35) ** 2 + (yy - 0.47) ** 2 < 0.014) | ((xx - 0.65) ** 2 + (yy - 0.47) ** 2 < 0.014)
    spine = (xx - 0.5) ** 2 + (yy - 0.66) ** 2 < 0.0022
    ct = np.clip(body * 110 - lungs * 90 + spine * 140 + rng.normal(0, 8, body.shape), 0, 255)
    return {"ct_slice": ct.astype(np.uint8), "grey": np.full((size, size), 128, np.uint8),
            "noise": rng.integers(0, 256, (size, size)).astype(np.uint8),
            "gradient": (xx * 255).astype(np.uint8), "checker": (((xx * 8).astype(int) + (yy * 8).astype(int)) % 2 * 255
                                                              ).astype(np.uint8)}


def part_ood(predictor: Predictor, ds: Dataset, hannover: Dataset | None) -> None:
    ref = predictor.reference
    assert ref is not None
    t = ref.threshold
    rows = [("training, honest (out-of-bag)", ref.null_scores)]
    rows.append(("test split", _scores(predictor, _prep(predictor, ds.images[ds.splits == "test"]))))
    if hannover is not None:
        rows.append(("Hannover (other hospital)", _scores(predictor, _prep(predictor, hannover.images))))
    fakes = non_chest(int(predictor.meta["input"]["size"]))
    fake_scores = _scores(predictor, _prep(predictor, np.stack(list(fakes.values()))))
    print(f"\n### Out-of-distribution score (threshold {t:.3f})\n")
    print("| images | n | median | 95th pct | above threshold |")
    print("|---|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {len(s)} | {np.median(s):.3f} | {np.percentile(s, 95):.3f} | {np.mean(s > t):.1%} |")
    for name, s in zip(fakes, fake_scores, strict=True):
        print(f"| non-chest: {name} | 1 | {s:.2f} | | {'yes' if s > t else 'no'} |")


def part_shift(predictor: Predictor, ds: Dataset, hannover: Dataset | None) -> None:
    ref = predictor.reference
    assert ref is not None
    rng = np.random.default_rng(0)
    pool = np.flatnonzero(ds.splits != "test")
    sets = {"64 training images": ds.images[rng.choice(pool, 64, replace=False)],
            "test split (same source)": ds.images[ds.splits == "test"]}
    if hannover is not None:
        sets["Hannover, 64 images"] = hannover.images[rng.choice(len(hannover.images), 64, replace=False)]
        sets["Hannover, all"] = hannover.images
    print("\n### Site verdict (`lungxray shift`)\n")
    print("| folder | n | mean score | reference | p | verdict |\n|---|---|---|---|---|---|")
    for name, images in sets.items():
        r = shift_test(ref.null_scores, _scores(predictor, _prep(predictor, images)), ref.threshold)
        print(f"| {name} | {r.images} | {r.score:.3f} | {r.reference_score:.3f} | {r.p_value:.4f} | "
              f"{'shifted' if r.shifted else 'not shifted'} |")


def part_hannover(predictor: Predictor, hannover: Dataset | None, root: str) -> None:
    images = _prep(predictor, hannover.images)
    groups = patient_groups(hannover.paths, root)
    frozen = predictor.predict_images(images).probs.argmax(1)
    print(f"\n### Hannover, one class (207 COVID films, 2 folds by patient, {len(set(groups))} patients)\n")
    print("| model | COVID recall | referred |\n|---|---|---|")
    print(f"| frozen | {np.mean(frozen == 0):.3f} | {predictor.predict_images(images).refer.mean():.1%} |")
    for label, settings in (("adapted, plain AdaBN (training class mix, no guard)", AdaptSettings(class_mix="train")),
                            ("adapted, default (one-class mode + guard)", AdaptSettings())):
        fit = crossfit(predictor, images, groups, folds=2, settings=settings)
        pred = metrics.softmax(fit.logits).mean(1).argmax(1)
        blends = ", ".join(f"{r.blend:.2f}" for r in fit.reports)
        print(f"| {label} | {np.mean(pred == 0):.3f} | blend kept per fold: {blends} |")


def curve(predictor: Predictor, images: np.ndarray, labels: np.ndarray, sizes: tuple, repeats: int,
          title: str) -> None:
    """Adapt on n images of one random half, score the other half, both ways; mean over `repeats` draws."""
    classes = predictor.classes
    frozen = metrics.classification_metrics(labels, predictor.predict_images(images).probs, classes)
    print(f"\n### Gain against adaptation images: {title} (frozen accuracy {frozen['accuracy']:.3f}, macro F1 "
          f"{frozen['macro_f1']:.3f})\n\n| n | accuracy | macro F1 (min-max over {repeats} draws) |\n|---|---|---|")
    rng = np.random.default_rng(0)
    for n in sizes:
        acc, f1s = [], []
        for _ in range(repeats):
            half = rng.permutation(len(images)) < len(images) // 2
            probs = np.zeros((len(images), len(classes)))
            for side in (half, ~half):
                pool = np.flatnonzero(side)
                use = pool if n == "all" else rng.choice(pool, min(int(n), len(pool)), replace=False)
                adapt_predictor(predictor, images[use], [str(i) for i in use], [None] * len(use))
                probs[~side] = predictor.predict_images(images[~side]).probs
            restore_source(predictor, predictor.reference)
            m = metrics.classification_metrics(labels, probs, classes)
            acc.append(m["accuracy"])
            f1s.append(m["macro_f1"])
        print(f"| {n} | {np.mean(acc):.3f} | {np.mean(f1s):.3f} ({min(f1s):.3f}-{max(f1s):.3f}) |")


def part_curve(predictor: Predictor, ds: Dataset, hannover: Dataset | None, shift: str, level: int,
               repeats: int) -> None:
    test = np.flatnonzero(ds.splits == "test")
    raw = ds.images[test]
    images = _prep(predictor, apply_shift(raw, shift, level, 0) if shift != "none" else raw)
    curve(predictor, images, ds.labels[test], (8, 16, 32, "all"), repeats,
          f"test split under {shift} level {level}")
    if hannover is not None:
        curve(predictor, _prep(predictor, hannover.images), hannover.labels,
              (8, 16, 32, 64, "all"), repeats, "Hannover (one class; split by image)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--data", default="../shared/data/covid19-dataset")
    ap.add_argument("--hannover", default="../shared/data/external-dev/hannover")
    ap.add_argument("--parts", default="ood,shift,hannover,curve")
    ap.add_argument("--shift", default="contrast_low", help="synthetic shift for the curve (none: clean)")
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    started = time.perf_counter()
    predictor = Predictor.load(args.run_dir)
    size = int(predictor.meta["input"]["size"])
    ds = load_dataset(args.data, size=size, classes=predictor.classes)
    try:
        hannover = load_dataset(args.hannover, size=size, classes=predictor.classes)
    except (OSError, ValueError):
        hannover = None
    parts = set(args.parts.split(","))
    if "ood" in parts:
        part_ood(predictor, ds, hannover)
    if "shift" in parts:
        part_shift(predictor, ds, hannover)
    if "hannover" in parts and hannover is not None:
        part_hannover(predictor, hannover, args.hannover)
    if "curve" in parts:
        part_curve(predictor, ds, hannover, args.shift, args.level, args.repeats)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
