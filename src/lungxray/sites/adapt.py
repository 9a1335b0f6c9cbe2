"""Adapt a bundle to a new site without labels: re-estimate every BatchNorm layer's statistics on its images.

Why: a new hospital's films differ in exposure, processing and equipment, and BatchNorm's running statistics are
exactly where a network stores what its training films looked like. Re-estimating them on unlabelled images of
the new site (AdaBN, Li et al. 2016) raised macro F1 on other hospitals' films from 0.68 to 0.79-0.85 in the
experiment that opened issue 17. Done naively it is also dangerous, and the three guards below come from that:

- **Relative to the training images, not absolute.** The running statistics were accumulated on *augmented*
  training batches, so plain AdaBN on the training images themselves would already change the model. Instead each
  layer's statistics move by how the site's layer input differs from the clean training images' input (whose
  moments the bundle keeps, `lungxray.sites.ood.BatchNormReference`): adapting on the training images changes nothing.
  Layers are re-estimated in forward order, each on inputs computed with the layers before it already adapted.
- **With the site's class mix.** A folder of one class (all COVID) has other statistics than the training mix of
  classes, and aligning it to that mix pushes its images toward the other classes (macro F1 0.55-0.57 in the
  issue's experiment; Hannover's COVID recall 0.93 -> 0.46 here). The target is the training images' statistics
  *with the site's class mix*: a folder the model calls one class (> 85%) is aligned to that class's training
  images (only from 100 images on; smaller one-class folders are left as they are), and may not lose any of
  that class's share (else the adaptation is blended back toward the
  source statistics, down to nothing); any other folder starts from the training mix, which is then
  re-estimated from the adapted model's predictions until stable.
- **Shrunk toward the training statistics for small folders.** The site's moments are blended with the training
  ones as if the training images counted `prior_strength` images (Schneider et al. 2020), so 8 images move the
  model little and 500 move it almost all the way.

Images that fail an input check (blank, tiny, colour, not a radiograph) or whose feature-space score is an
extreme outlier of the folder itself (a CT slice among films) are left out and listed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lungxray.inference.bundle import CONFIG, META, save_bundle
from lungxray.sites.ood import FeatureReference, batchnorm_layers, save_reference

log = logging.getLogger(__name__)

PRIOR_STRENGTH = 16.0
MIN_IMAGES = 8
ONE_CLASS_SHARE = 0.85  # mean predicted share above which a folder is treated as one class
ONE_CLASS_MIN_IMAGES = 100  # below, a one-class folder is not adapted (guarded 8-32 images lost 3-4% on Hannover)
ONE_CLASS_TOLERANCE = 0.0  # share of that class the one-class guard lets adaptation lose (none: never below frozen)
OUTLIER_FACTOR = 10.0  # a site image this many times farther from the folder's centre than its median is left out


class AdaptError(ValueError):
    """The folder or bundle cannot be adapted (too few usable images, no feature reference)."""


@dataclass(frozen=True)
class AdaptSettings:
    prior_strength: float = PRIOR_STRENGTH  # pseudo-count of the training statistics in the blend
    class_mix: str = "estimate"  # "estimate" (EM, iterated with the adapted model) or "train" (the training mix)
    iterations: int = 4  # class-mix re-estimations at most
    min_images: int = MIN_IMAGES


@dataclass
class AdaptReport:
    """What the adaptation did, for meta.json and the terminal."""

    images: int  # usable site images the statistics came from
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    class_mix: list[float] = field(default_factory=list)  # estimated site class mix (the alignment target)
    frozen_mix: list[float] = field(default_factory=list)  # mean predicted probabilities before adapting
    warnings: list[str] = field(default_factory=list)
    changed_labels: float = 0.0  # fraction of usable site images whose label changed
    one_class: bool = False  # the frozen model called more than ONE_CLASS_SHARE of the folder one class
    blend: float = 1.0  # fraction of the adaptation kept by the one-class guard

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "excluded": [{"name": n, "why": w} for n, w in self.excluded],
                "class_mix": self.class_mix, "frozen_mix": self.frozen_mix, "warnings": self.warnings,
                "changed_labels": self.changed_labels, "one_class": self.one_class, "blend": self.blend}


def estimate_class_mix(probs: np.ndarray, prior: np.ndarray, prior_strength: float = PRIOR_STRENGTH) -> np.ndarray:
    """The site's class mix: its mean predicted probabilities, shrunk toward the training mix `prior` as if the
    training counted `prior_strength` images. Deliberately not EM to convergence (Saerens et al. 2002): on a
    shifted site the predictions are biased, and EM turns a 0.36-vs-0.33 lean of an unsure model into "all one
    class"; the sharpening comes from re-estimating with the adapted model instead (`adapt_predictor`)."""
    n = len(probs)
    return (probs.sum(0) + prior_strength * prior) / (n + prior_strength)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has been seen."""


def site_moments(predictor: Any, images: np.ndarray, layer: nn.Module, batch_size: int = 32) -> tuple[np.ndarray, ...]:
    """(mean, mean square) per channel of `layer`'s input over the site images, stopping each pass at the layer."""
    sums: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().double()
        sums.append(torch.stack([x.mean((2, 3)).sum(0), x.square().mean((2, 3)).sum(0)]).cpu())
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        for start in range(0, len(images), batch_size):
            with contextlib.suppress(_Stop):
                predictor.member_logits(images[start:start + batch_size], batch_size)
    finally:
        handle.remove()
    total = torch.stack(sums).sum(0).numpy() / len(images)
    return total[0], total[1]


def align_batchnorm(predictor: Any, images: np.ndarray, reference: FeatureReference, mix: np.ndarray,
                    prior_strength: float) -> None:
    """Set every BN layer's running statistics (in place) so the site's layer inputs, normalised, are distributed
    like the clean training images' with class mix `mix`, layer by layer in forward order (module docstring)."""
    n = len(images)
    for name, bn in batchnorm_layers(predictor.bundle.model).items():
        ref = reference.batchnorm[name]
        m_ref, q_ref = mix @ ref.means, mix @ ref.squares
        m_site, q_site = site_moments(predictor, images, bn)
        m = (n * m_site + prior_strength * m_ref) / (n + prior_strength)
        q = (n * q_site + prior_strength * q_ref) / (n + prior_strength)
        scale = np.sqrt(np.maximum(q - m * m, 1e-12) / np.maximum(q_ref - m_ref * m_ref, 1e-12))
        scale = np.clip(scale, 0.1, 10.0)
        mean = m - (m_ref - ref.running_mean) * scale
        var = np.maximum((ref.running_var + bn.eps) * scale * scale - bn.eps, 0.0)
        with torch.no_grad():
            bn.running_mean.copy_(torch.as_tensor(mean))  # type: ignore[union-attr]
            bn.running_var.copy_(torch.as_tensor(var))  # type: ignore[union-attr]


def restore_source(predictor: Any, reference: FeatureReference) -> None:
    """Put the source bundle's BN statistics back (adapting an adapted bundle starts from its source)."""
    for name, bn in batchnorm_layers(predictor.bundle.model).items():
        with torch.no_grad():
            bn.running_mean.copy_(torch.as_tensor(reference.batchnorm[name].running_mean))  # type: ignore[union-attr]
            bn.running_var.copy_(torch.as_tensor(reference.batchnorm[name].running_var))  # type: ignore[union-attr]


def usable_images(predictor: Any, images: np.ndarray, names: list[str], reasons: list[str | None],
                  ) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Indices of the site images to adapt on, and (name, why) of those left out: failed input checks, and images
    far from the folder's own other images in feature space (a CT slice or a photograph among films)."""
    excluded = [(n, f"input check: {r}") for n, r in zip(names, reasons, strict=True) if r]
    keep = np.array([not r for r in reasons], dtype=bool)
    if keep.sum() >= 8:
        _, feats = predictor.member_outputs(images[keep])
        distance = folder_outlyingness(feats, predictor.reference.precision)
        typical = float(np.median(distance))
        for i, d in zip(np.flatnonzero(keep), distance, strict=True):
            if d > OUTLIER_FACTOR * typical:
                keep[i] = False
                excluded.append((names[i], f"unlike the folder's other images (distance {d:.0f}, typical "
                                           f"{typical:.0f})"))
    return np.flatnonzero(keep), excluded


def folder_outlyingness(features: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(N, K, D) -> (N,): each image's squared distance to its k-th nearest other image of the folder (k = N/20,
    at least 2), in the training features' Mahalanobis metric, averaged over members. Films of one site sit in
    class clusters of many images; a CT slice or a photograph among them has no near neighbours."""
    n, members, dims = features.shape
    k = max(2, n // 20)
    dist = np.zeros((n, n))
    for m in range(members):
        white = features[:, m].astype(np.float64) @ np.linalg.cholesky(precision[m])  # Euclidean = Mahalanobis
        sq = (white * white).sum(1)
        dist += np.maximum(sq[:, None] + sq[None] - 2 * white @ white.T, 0) / dims
    np.fill_diagonal(dist, np.inf)
    return np.sort(dist / members, axis=1)[:, k - 1]


def adapt_predictor(predictor: Any, images: np.ndarray, names: list[str], reasons: list[str | None],
                    settings: AdaptSettings | None = None) -> AdaptReport:
    """Adapt `predictor`'s model in place to the site `images` (preprocessed uint8 (N, S, S)); see the module doc."""
    settings = settings or AdaptSettings()
    reference = predictor.reference
    if reference is None or not reference.batchnorm:
        raise AdaptError(f"{predictor.bundle.path}: the bundle has no BatchNorm reference statistics "
                         "(trained before lungxray kept them, or a network without BatchNorm)")
    restore_source(predictor, reference)
    keep, excluded = usable_images(predictor, images, names, reasons)
    if len(keep) < settings.min_images:
        raise AdaptError(f"only {len(keep)} usable images (at least {settings.min_images} needed; "
                         f"{len(excluded)} left out)")
    site = images[keep]
    frozen = predictor.predict_images(site).probs
    one_class = settings.class_mix == "estimate" and frozen.mean(0).max() > ONE_CLASS_SHARE
    mix = align_with_class_mix(predictor, site, frozen, one_class, settings)
    adapted = predictor.predict_images(site).probs
    blend = 1.0
    if one_class and len(site) < ONE_CLASS_MIN_IMAGES:  # too few for the guard to generalise: leave it as it was
        restore_source(predictor, reference)
        blend, adapted = 0.0, frozen
    elif one_class:
        blend, adapted = keep_the_predicted_class(predictor, site, frozen, adapted)
    report = AdaptReport(images=len(keep), excluded=excluded, class_mix=[float(v) for v in mix],
                         frozen_mix=[float(v) for v in frozen.mean(0)], one_class=one_class, blend=blend,
                         changed_labels=float((adapted.argmax(1) != frozen.argmax(1)).mean()))
    report.warnings = adaptation_warnings(report, predictor.classes, settings)
    return report


def align_with_class_mix(predictor: Any, site: np.ndarray, frozen: np.ndarray, one_class: bool,
                         settings: AdaptSettings) -> np.ndarray:
    """Align to the training images with the right class mix; returns the mix used.

    A folder the model sees as one class is aligned to that class's training images (the frozen predictions'
    mix, shrunk), once. Otherwise alignment starts from the training mix and the mix is re-estimated from the
    adapted model's predictions: re-estimating from a one-class folder's adapted predictions instead feeds back
    toward the training mix (measured: a model that called 95% of the Hannover films covid drifted to 61%)."""
    reference, prior = predictor.reference, predictor.reference.class_prior
    mix = frozen.mean(0) if one_class else prior  # the moments are shrunk already; shrinking the mix too mixes classes
    align_batchnorm(predictor, site, reference, mix, settings.prior_strength)
    if one_class or settings.class_mix == "train":
        return mix
    for _ in range(settings.iterations):
        new_mix = estimate_class_mix(predictor.predict_images(site).probs, prior, settings.prior_strength)
        if np.abs(new_mix - mix).max() < 0.02:
            break
        mix = new_mix
        restore_source(predictor, reference)
        align_batchnorm(predictor, site, reference, mix, settings.prior_strength)
    return mix


def keep_the_predicted_class(predictor: Any, site: np.ndarray, frozen: np.ndarray,
                             adapted: np.ndarray) -> tuple[float, np.ndarray]:
    """The one-class guard: when adapting moves a one-class folder's images away from the class the frozen model
    gives most of them (which, for a folder of one class, can only add errors), blend the BN statistics back
    toward the source's, halving the step until no more than `ONE_CLASS_TOLERANCE` of the share is lost.
    Returns (blend weight 0..1 of the adaptation kept, the predictions it gives)."""
    top = int(frozen.mean(0).argmax())

    def lost(probs: np.ndarray) -> bool:  # fewer images of that class, or less belief in it on average
        return bool((probs.argmax(1) == top).mean() < (frozen.argmax(1) == top).mean() - ONE_CLASS_TOLERANCE
                    or probs[:, top].mean() < frozen[:, top].mean() - ONE_CLASS_TOLERANCE)

    adapted_state = {n: (bn.running_mean.clone(), bn.running_var.clone())  # type: ignore[union-attr]
                     for n, bn in batchnorm_layers(predictor.bundle.model).items()}
    blend = 1.0
    while lost(adapted) and blend > 0.01:
        blend /= 2
        set_blend(predictor, adapted_state, blend)
        adapted = predictor.predict_images(site).probs
    if blend <= 0.01:
        restore_source(predictor, predictor.reference)
        return 0.0, frozen
    return blend, adapted


def set_blend(predictor: Any, adapted_state: dict[str, tuple[torch.Tensor, torch.Tensor]], blend: float) -> None:
    """BN statistics = source + blend * (adapted - source), every layer."""
    for name, bn in batchnorm_layers(predictor.bundle.model).items():
        ref = predictor.reference.batchnorm[name]
        mean, var = adapted_state[name]
        with torch.no_grad():
            src_mean = torch.as_tensor(ref.running_mean, dtype=mean.dtype)
            src_var = torch.as_tensor(ref.running_var, dtype=var.dtype)
            bn.running_mean.copy_(src_mean + blend * (mean - src_mean))  # type: ignore[union-attr]
            bn.running_var.copy_(src_var + blend * (var - src_var))  # type: ignore[union-attr]


def adaptation_warnings(report: AdaptReport, classes: list[str], settings: AdaptSettings) -> list[str]:
    out = []
    top = int(np.argmax(report.frozen_mix))
    if report.one_class:
        out.append(f"the folder looks like one class ({report.frozen_mix[top]:.0%} {classes[top]} predicted): it was "
                   f"aligned to the training {classes[top]} images, not to the training mix; a sample of the site's "
                   f"whole archive adapts better")
    if report.one_class and report.images < ONE_CLASS_MIN_IMAGES:
        out.append(f"fewer than {ONE_CLASS_MIN_IMAGES} images of a one-class folder: the model was left as it was "
                   f"(adapting so few measured worse than not adapting)")
    elif report.blend < 1.0:
        out.append(f"adapting moved this one-class folder's images away from {classes[top]}; only "
                   f"{report.blend:.0%} of the adaptation was kept" if report.blend > 0 else
                   f"adapting moved this one-class folder's images away from {classes[top]}; the model was left "
                   f"as it was (nothing adapted)")
    if report.images < 4 * settings.prior_strength:
        out.append(f"{report.images} images: the statistics are blended with the training ones "
                   f"(weight {settings.prior_strength:g} images), so the model moved only part of the way")
    return out


def folder_fingerprint(paths: list[Path]) -> str:
    """sha256 over the sorted (file name, content digest) pairs: which images a bundle was adapted on."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def adapt_bundle(run_dir: str | Path, data: str | Path, out: str | Path, settings: AdaptSettings | None = None,
                 force: bool = False) -> tuple[Path, AdaptReport]:
    """`lungxray adapt`: adapt the bundle at `run_dir` to the images under `data` (labels and folder names
    ignored) and write a complete new bundle at `out`."""
    from lungxray.inference.predictor import Predictor, expand_paths

    out = Path(out)
    check_out(out, Path(run_dir), force)  # before the work, not after it
    files = expand_paths([data])
    if not files:
        raise AdaptError(f"{data}: no image files")
    predictor = Predictor.load(run_dir)
    report = adapt_sources(predictor, [(f, str(f)) for f in files], settings)
    write_adapted(predictor, out, report, data, folder_fingerprint(files), settings or AdaptSettings(), force)
    return out, report


def adapt_sources(predictor: Any, items: list[tuple[Any, str]], settings: AdaptSettings | None) -> AdaptReport:
    """Decode and check (source, name) pairs, adapt `predictor` in place; unreadable inputs are listed as left out."""
    loaded = predictor.load_named(items, on_error="skip")
    report = adapt_predictor(predictor, loaded.images, loaded.names, loaded.reasons, settings)
    report.excluded += [(name, f"unreadable: {error}") for name, error in loaded.skipped]
    return report


def check_out(out: Path, source: Path, force: bool) -> None:
    """Nothing finished is overwritten without --force, and never the source bundle itself."""
    if out.resolve() == source.resolve():
        raise AdaptError(f"{out} is the source bundle itself; write the adapted bundle to another folder")
    if (out / META).exists() and not force:
        raise AdaptError(f"{out} already holds a bundle; pass --force to replace it")


def write_adapted(predictor: Any, out: Path, report: AdaptReport, data: str | Path, fingerprint: str,
                  settings: AdaptSettings, force: bool = False) -> None:
    """The adapted bundle: the source's files with new BN statistics; meta records source, site and settings."""
    source = predictor.bundle.path
    check_out(out, Path(source), force)
    meta = {k: v for k, v in predictor.meta.items() if k not in ("format_version", "metrics")}
    previous = meta.get("adaptation") or {}
    meta["adaptation"] = {
        "source": previous.get("source", str(Path(source).resolve())),
        "source_metrics": previous.get("source_metrics", predictor.meta.get("metrics")),
        "site": {"folder": str(Path(data).resolve()), "fingerprint": fingerprint, "images": report.images},
        "settings": asdict(settings), **report.to_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_reference(out, predictor.reference)
    config = Path(source) / CONFIG
    save_bundle(out, predictor.bundle.model, meta, config.read_text() if config.is_file() else None)


# ------------------------------------------------------------------------------------- cross-fitted evaluation


def patient_groups(paths: list[str], root: str | Path) -> np.ndarray:
    """A group id per image: its `patient_id` from a MANIFEST.csv (columns path, patient_id) in `root` or a folder
    below it, else the image itself. Cross-fitting splits by these groups, so no patient is on both sides."""
    import csv

    known: dict[str, str] = {}
    for manifest in sorted(Path(root).glob("**/MANIFEST.csv"))[:20]:
        with open(manifest, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("path") and row.get("patient_id"):
                    known[str((manifest.parent / row["path"]).resolve())] = row["patient_id"]
    where = [Path(p) if Path(p).is_absolute() else Path(root) / p for p in paths]  # dataset paths are relative
    return np.array([known.get(str(w.resolve()), f"image:{p}") for w, p in zip(where, paths, strict=True)])


def crossfit_folds(groups: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """(N,) fold of each image: whole groups dealt round-robin to `folds` folds in a seeded random order."""
    unique = np.unique(groups)
    np.random.default_rng(seed).shuffle(unique)
    fold_of_group = {g: i % folds for i, g in enumerate(unique)}
    return np.array([fold_of_group[g] for g in groups])


@dataclass
class CrossFit:
    """Adapted member logits of every image, each from a model adapted on the other folds only."""

    logits: np.ndarray  # (N, K, C)
    ood: np.ndarray  # (N,)
    fold: np.ndarray  # (N,)
    adapted_on: list[np.ndarray]  # per fold: indices of the images its adaptation used
    reports: list[AdaptReport]


def crossfit(predictor: Any, images: np.ndarray, groups: np.ndarray, folds: int = 5,
             settings: AdaptSettings | None = None, seed: int = 0) -> CrossFit:
    """Score every image with the model adapted on the other folds (never on itself or its patient)."""
    fold = crossfit_folds(groups, min(folds, len(np.unique(groups))), seed)
    k, c = predictor.bundle.members, len(predictor.classes)
    logits, ood = np.zeros((len(images), k, c), np.float32), np.full(len(images), np.nan)
    adapted_on, reports = [], []
    try:
        for f in np.unique(fold):
            train, scored = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            report = adapt_predictor(predictor, images[train], [str(i) for i in train], [None] * len(train), settings)
            logits[scored], feats = predictor.member_outputs(images[scored])
            ood[scored] = predictor.ood_scores(feats)
            adapted_on.append(train)
            reports.append(report)
    finally:
        restore_source(predictor, predictor.reference)
    return CrossFit(logits, ood, fold, adapted_on, reports)
