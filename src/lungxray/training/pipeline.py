"""The run orchestrator: data -> members plan -> fit -> calibrate on validation -> score test once -> bundle.

This is what `lungxray train` and `lungxray.train()` call. Selection (early stopping, temperature, referral
threshold) uses validation or out-of-bag images only; the test split is scored once, at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungxray import __version__
from lungxray.config import RunConfig, TrainConfig, load_config
from lungxray.evaluation import metrics
from lungxray.evaluation.gradcam import saliency_summary
from lungxray.evaluation.report import duplicates_text, write_evaluation_report, write_report, write_rows_csv
from lungxray.inference.bundle import Bundle, git_commit, save_bundle
from lungxray.inference.combine import normalised_entropy, out_of_bag_probs
from lungxray.inference.predictor import Predictor, make_predictions
from lungxray.io.dataset import Dataset, load_dataset, stratified_kfold, stratified_split
from lungxray.io.duplicates import find_duplicates, summarize_duplicates
from lungxray.io.files import write_json, write_text
from lungxray.models import kernels
from lungxray.models.kernels import conv3x3
from lungxray.models.nets import build_model, stack_members
from lungxray.runtime import (
    INPUT_MEAN,
    INPUT_STD,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_threads,
)
from lungxray.sites.ood import FeatureReference, reference_from_pool, reference_meta, save_reference
from lungxray.sites.shift import folder_shift
from lungxray.speed import autotune
from lungxray.training import distributed
from lungxray.training.checkpoint import remove_checkpoint
from lungxray.training.loop import TrainState, fit, fit_sequential
from lungxray.training.plan import MemberPlan, plan_members
from lungxray.training.runlock import RUN_INFO, check_new_run, read_run_info, run_lock
from lungxray.transforms.geometric import Augmenter
from lungxray.transforms.photometric import make_photometric
from lungxray.transforms.preprocess import prepare
from lungxray.waitpolicy import wait_policy

log = logging.getLogger(__name__)



@dataclass
class RunResult:
    """What a finished training run produced; `run_dir` is a loadable bundle."""

    run_dir: Path
    config: RunConfig
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def training_pool(
    ds: Dataset, val_fraction: float, seed: int, fold: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool indices, holdout positions within the pool, test indices) for a dataset of any layout.

    The pool is train/ (+ val/ when the folder provides one, which then is the holdout) or, without split folders,
    everything; the holdout is otherwise a stratified, seeded split of train/. test/ is never in the pool.
    With `fold=(k, n)` (cross-validation inside the training split), fold k of a stratified n-fold partition of
    the pool is the scored set instead of test/, and the rest is the pool.
    """
    splits = ds.splits
    pool = np.flatnonzero(np.isin(splits, ["train", "val", "all"]))
    test = np.flatnonzero(splits == "test")
    if len(pool) == 0:
        raise ValueError(f"{ds.root}: no training images (expected train/ or class folders)")
    if fold is not None:
        keep, held_out = stratified_kfold(ds.labels[pool], fold[1], seed)[fold[0]]
        pool, test = pool[keep], pool[held_out]
    missing = sorted(set(ds.labels[test].tolist()) - set(ds.labels[pool].tolist()))
    if missing:
        names = ", ".join(ds.classes[i] for i in missing)
        raise ValueError(f"{ds.root}: test/ has images of class(es) {names} that the training split lacks")
    given_val = np.flatnonzero(splits[pool] == "val")
    if len(given_val):
        return pool, given_val, test
    _, holdout = stratified_split(ds.labels[pool], val_fraction, seed) if val_fraction > 0 else (None, [])
    return pool, np.asarray(holdout, dtype=np.int64), test


def validation_probs(member_logits: np.ndarray, labels: np.ndarray, plan: MemberPlan) -> tuple[np.ndarray, ...]:
    """Ensemble probabilities on validation images: out-of-bag for bootstrap members, else the holdout."""
    member_probs = metrics.softmax(member_logits)
    probs, index = out_of_bag_probs(member_probs, plan.val_mask)
    return probs, labels[index], index


def calibrate(val_probs: np.ndarray, val_labels: np.ndarray, cfg: RunConfig) -> dict[str, Any]:
    """Temperature and referral threshold, both from validation predictions."""
    log_probs = np.log(np.clip(val_probs, 1e-12, None))
    temperature = metrics.fit_temperature(log_probs, val_labels) if cfg.calibration.temperature else 1.0
    calibrated = metrics.softmax(log_probs, temperature)
    threshold = metrics.threshold_for_coverage(normalised_entropy(calibrated), cfg.calibration.refer_coverage)
    return {"temperature": float(temperature), "refer_threshold": float(threshold)}


def score(pred_meta: dict[str, Any], member_logits: np.ndarray, labels: np.ndarray, classes: list[str],
          paths: list[str], seed: int, ood: np.ndarray | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics with bootstrap intervals, calibration before/after, referral, and one row per image.

    With `ood` (feature-space scores) referral also counts out-of-distribution images (`referral`)."""
    pred = make_predictions(member_logits, pred_meta, ood)
    raw = make_predictions(member_logits, {**pred_meta, "temperature": 1.0})
    correct = pred.probs.argmax(1) == labels
    out = {
        "metrics": metrics.classification_metrics(labels, pred.probs, classes),
        "intervals": {k: v.to_dict() for k, v in metrics.bootstrap_intervals(
            labels, pred.probs, classes, n_resamples=2000, seed=seed).items()},
        "ece_uncalibrated": metrics.expected_calibration_error(raw.probs, labels),
        "ece_calibrated": metrics.expected_calibration_error(pred.probs, labels),
        "refer": metrics.selective_accuracy(correct, pred.uncertainty, pred_meta["refer_threshold"]),
        "mean_uncertainty_correct": float(pred.uncertainty[correct].mean()) if correct.any() else None,
        "mean_uncertainty_wrong": float(pred.uncertainty[~correct].mean()) if (~correct).any() else None,
        "reliability": {k: v.tolist() for k, v in metrics.reliability_curve(pred.probs, labels).items()},
        "referral": referral_summary(correct, pred.refer, pred.refer_reason),
    }
    rows = [
        {"path": p, "true": classes[t], "label": classes[int(pred.probs[i].argmax())],
         **{f"prob_{c}": float(pred.probs[i, j]) for j, c in enumerate(classes)},
         "uncertainty": float(pred.uncertainty[i]), "ood": float(pred.ood[i]), "refer": bool(pred.refer[i]),
         "refer_reason": pred.refer_reason[i]}
        for i, (p, t) in enumerate(zip(paths, labels, strict=True))
    ]
    return out, rows


def referral_summary(correct: np.ndarray, refer: np.ndarray, reasons: list[str]) -> dict[str, Any]:
    """What the referral rule (uncertainty, out of distribution, input checks) did: how many it referred, how
    accurate the accepted answers were, and how many of the errors it caught (the confident errors are the rest)."""
    errors = ~correct
    return {
        "referred": float(refer.mean()) if len(refer) else None,
        "accepted_accuracy": float(correct[~refer].mean()) if (~refer).any() else None,
        "errors": int(errors.sum()), "errors_referred": int((errors & refer).sum()),
        "confident_errors": int((errors & ~refer).sum()),
        "out_of_distribution": int(sum(r.startswith("out of distribution") for r in reasons)),
        "uncertain": int(sum(r.startswith("uncertain") for r in reasons)),
    }


def copied_from_training(test_paths: list[str], pool_paths: set[str], duplicates: list[Any]) -> dict[str, str]:
    """{test path: "exact" | "near"} for test images with an (exact or near) copy among the training images."""
    test_set, out = set(test_paths), dict[str, str]()
    for d in duplicates:
        for mine, other in ((d.a, d.b), (d.b, d.a)):
            if mine in test_set and other in pool_paths and out.get(mine) != "exact":
                out[mine] = d.kind
    return out


def score_without_copies(pred_meta: dict[str, Any], member_logits: np.ndarray, labels: np.ndarray,
                         classes: list[str], paths: list[str], pool_paths: set[str], duplicates: list[Any],
                         seed: int) -> dict[str, Any]:
    """The test scores again without the test images that have a copy in the training split (they inflate it).

    {"excluded": n, "exact": n, "near": n, "excluded_per_class": {...}, "scores": score()'s dict or None when
    nothing (or everything) was excluded}."""
    copies = copied_from_training(paths, pool_paths, duplicates)
    keep = np.array([p not in copies for p in paths], dtype=bool)
    kinds = list(copies.values())
    per_class = {c: int(np.sum(~keep & (labels == i))) for i, c in enumerate(classes)}
    out: dict[str, Any] = {"excluded": int((~keep).sum()), "exact": kinds.count("exact"), "near": kinds.count("near"),
                           "excluded_per_class": per_class, "scores": None}
    if 0 < out["excluded"] < len(paths):
        out["scores"], _ = score(pred_meta, member_logits[keep], labels[keep], classes,
                                 [p for p, k in zip(paths, keep, strict=True) if k], seed)
    return out


def train_run(
    config: str | Path | dict[str, Any] | RunConfig,
    data: str | Path,
    out: str | Path,
    overrides: list[str] | dict[str, Any] | None = None,
    device: str | None = None,
    resume: bool = False,
    fold: tuple[int, int] | None = None,
    force: bool = False,
) -> RunResult:
    """Train, calibrate, evaluate and bundle one run (a single model or a packed ensemble).

    `fold=(k, n)` is for cross-validation (the study): fold k of the training split plays the test split.
    The run holds `out/.lock` while it trains; a new run (not `resume`) refuses a folder with a finished bundle
    or an interrupted run unless `force` (lungxray.runlock).
    """
    run_dir = Path(out)
    if os.environ.get("RANK", "0") != "0" or (resume and read_run_info(run_dir).get("complete")):
        return _train_run(config, data, run_dir, overrides, device, resume, fold)  # rank 0 holds the lock
    load_config(config, overrides)  # a bad config is refused before the folder is created or locked
    with run_lock(run_dir):
        if not resume:
            check_new_run(run_dir, force)
        return _train_run(config, data, run_dir, overrides, device, resume, fold)


@dataclass(frozen=True)
class _Runtime:
    """Where and how this process trains, resolved once before any data is read: the device (one GPU per torchrun
    rank), the measured or recorded speed settings, and what they imply for precision, threads and memory layout."""

    device: torch.device
    ctx: distributed.DistContext
    choice: autotune.Choice
    train_cfg: TrainConfig
    threads: int
    amp_dtype: torch.dtype

    @property
    def layout(self) -> torch.memory_format:
        return torch.channels_last if self.train_cfg.channels_last else torch.contiguous_format

    @property
    def precision(self) -> str:
        return str(self.amp_dtype).replace("torch.", "")


@dataclass(frozen=True)
class _RunData:
    """The decoded dataset, preprocessed as the bundle will preprocess, with its split and members plan: what
    fitting, calibration and scoring all read, so it travels as one value."""

    ds: Dataset
    images: np.ndarray  # prepared uint8 (N, S, S)
    load_seconds: float
    duplicates: list[Any]
    duplicate_summary: dict[str, Any]
    pool: np.ndarray
    holdout: np.ndarray
    test: np.ndarray
    plan: MemberPlan

    @property
    def pool_labels(self) -> np.ndarray:
        return self.ds.labels[self.pool]


@dataclass(frozen=True)
class _Trained:
    """The fitted (stacked) model, its training state and the architecture arguments the bundle records."""

    model: torch.nn.Module
    state: TrainState
    arch_args: dict[str, Any]


@dataclass(frozen=True)
class _Scored:
    """What calibration and scoring produced: the bundle's meta (with temperature and threshold), metrics.json's
    results so far, the per-image test rows and the training images' feature reference saved with the bundle."""

    reference: FeatureReference
    meta: dict[str, Any]
    results: dict[str, Any]
    test_rows: list[dict[str, Any]]
    validation_images: int


def _train_run(
    config: str | Path | dict[str, Any] | RunConfig,
    data: str | Path,
    out: str | Path,
    overrides: list[str] | dict[str, Any] | None,
    device: str | None,
    resume: bool,
    fold: tuple[int, int] | None,
) -> RunResult:
    """The run's stages in order; each stage function says why it is where it is (the order of writes and of
    random draws is part of the contract: `--resume` and the determinism tests depend on it)."""
    started = time.perf_counter()
    cfg = load_config(config, overrides)
    run_dir = Path(out)
    if resume and read_run_info(run_dir).get("complete"):  # killed after its last write, or resumed twice
        log.info("%s is complete; nothing to resume", run_dir)
        return _finished_result(run_dir, cfg)
    rt = _set_up_runtime(cfg, data, run_dir, device, resume)
    rd = _load_run_data(cfg, data, fold)
    trained = _fit_members(cfg, rt, rd, run_dir, resume)
    if not rt.ctx.is_main:  # rank 0 calibrates, scores and writes the bundle; the others return its metrics
        return RunResult(run_dir=run_dir, config=cfg, metrics=distributed.share_from_main(None))
    meta = _bundle_meta(cfg, rd.ds, trained.arch_args)
    scored = _calibrate_and_score(cfg, rt, rd, trained.model, meta, run_dir)
    results = {**scored.results, **_run_summary(rt, rd, trained.state, scored, time.perf_counter() - started)}
    _write_run(run_dir, cfg, data, rt, rd, trained, scored, results)
    return RunResult(run_dir=run_dir, config=cfg, metrics=distributed.share_from_main(results),
                     history=trained.state.history)


def _finished_result(run_dir: Path, cfg: RunConfig) -> RunResult:
    """A complete run resumed again returns what it wrote rather than training a second time."""
    return RunResult(run_dir, cfg, json.loads((run_dir / "metrics.json").read_text()),
                     json.loads((run_dir / "history.json").read_text()))


def _set_up_runtime(cfg: RunConfig, data: str | Path, run_dir: Path, device: str | None, resume: bool) -> _Runtime:
    """config.yaml and run.json first (so `--resume` can rebuild an interrupted run), then the device, the torchrun
    job and the speed settings, and only then the seeds: the autotune measurement draws random numbers."""
    recorded = read_run_info(run_dir).get("runtime") if resume else None  # a resumed run keeps its settings
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", cfg.to_yaml())
    write_json(run_dir / RUN_INFO, {"data": str(Path(data).resolve()), "complete": False})
    ctx = distributed.setup(resolve_device(device))  # joins the torchrun job, if any (one GPU per local rank)
    dev = ctx.device
    choice = autotune.for_run(cfg, dev, ctx.active, recorded)  # measured once per machine and shape, cached
    train_cfg = choice.apply(cfg.train)
    log.info("%s", choice.line())
    write_json(run_dir / RUN_INFO, {"data": str(Path(data).resolve()), "complete": False,
                                    "runtime": choice.to_dict()})
    seed_everything(cfg.seed, cfg.train.deterministic)  # after the calibration, which draws random numbers
    threads = set_threads(train_cfg.threads or ctx.threads)
    rt = _Runtime(dev, ctx, choice, train_cfg, threads, resolve_precision(dev, train_cfg.precision))
    log.info("device %s, %s, %d threads (OpenMP wait: %s)", dev, rt.precision, threads, wait_policy())
    return rt


def _load_run_data(cfg: RunConfig, data: str | Path, fold: tuple[int, int] | None) -> _RunData:
    """Decode (rank 0 first under torchrun, the others read its cache), report duplicates, preprocess exactly as
    the bundle will, split, and plan the members; the duplicate pairs are kept for the test scores without copies."""
    t0 = time.perf_counter()
    with distributed.main_first():
        ds = load_dataset(data, size=cfg.data.image_size)
    load_seconds = time.perf_counter() - t0
    duplicates = find_duplicates(ds)
    summary = summarize_duplicates(duplicates)
    log.info("%d images (%s), %d skipped; duplicates: %s", len(ds), ", ".join(f"{c} {n}" for c, n in
             ds.class_counts().items()), len(ds.skipped), duplicates_text(summary))
    images = prepare(ds.images, cfg.data.standardize, cfg.data.crop_border)
    pool, holdout, test = training_pool(ds, cfg.data.val_fraction, cfg.seed, fold)
    ens = cfg.ensemble
    plan = plan_members(ds.labels[pool], ens.members, ens.bootstrap, cfg.seed, ens.stratified, holdout)
    return _RunData(ds, images, load_seconds, duplicates, summary, pool, holdout, test, plan)


@dataclass(frozen=True)
class _MemberFactory:
    """Builds one sequential member's network and augmenters; member k's seeds are offset by 1000 k so that
    members differ, as in every earlier run."""

    cfg: RunConfig
    rt: _Runtime
    num_classes: int
    arch_args: dict[str, Any]
    preset: str | None

    def build(self) -> torch.nn.Module:
        net = build_model(self.cfg.model.arch, num_classes=self.num_classes, members=1, **self.arch_args)
        self.rt.choice.apply_model(net)
        return net.to(self.rt.device, memory_format=self.rt.layout)  # type: ignore[call-overload,no-any-return]

    def augmenter(self, k: int) -> Augmenter:
        return Augmenter(self.cfg.augment.params(self.preset), seed=self.cfg.seed + 1 + 1000 * k,
                         device=self.rt.device)

    def photometric(self, k: int) -> Any:
        return make_photometric(self.cfg.augment.photometric, self.cfg.seed + 2 + 1000 * k, self.rt.device)


def _fit_members(cfg: RunConfig, rt: _Runtime, rd: _RunData, run_dir: Path, resume: bool) -> _Trained:
    """Build the stacked model and train it: packed (or a single model) in one pass, else member by member.

    The full model and the first augmenter are built even for sequential members: the random draws of every run
    stay in the same order, and the sequential members' states are stacked into that model."""
    ens = cfg.ensemble
    arch_args = {"image_size": cfg.data.image_size, **cfg.model.args}  # seed_cnn's dense layer depends on it
    model = build_model(cfg.model.arch, num_classes=len(rd.ds.classes), members=ens.members, **arch_args)
    model = model.to(rt.device, memory_format=rt.layout)  # type: ignore[call-overload]
    rt.choice.apply_model(model)
    preset = ens.augment_preset if ens.members > 1 and ens.augment_preset else None
    augmenter = Augmenter(cfg.augment.params(preset), seed=cfg.seed + 1, device=rt.device)
    pool_images = torch.as_tensor(rd.images[rd.pool], device=rt.device)
    pool_labels = torch.as_tensor(rd.pool_labels, device=rt.device)
    # Under torchrun with LUNGXRAY_DISTRIBUTE=members each rank trains its share of the members (else: all).
    packed = ens.packed or ens.members == 1
    local_plan, local_model, ks = distributed.local_share(rd.plan, model, augmenter, packed)
    if packed:
        state = fit(
            local_model, pool_images, pool_labels, local_plan, rt.train_cfg, augmenter,
            seed=cfg.seed, amp_dtype=rt.amp_dtype, run_dir=distributed.checkpoint_dir(run_dir), resume=resume,
            photometric=make_photometric(cfg.augment.photometric, seed=cfg.seed + 2, device=rt.device),
        )
        state = distributed.collect_members(local_model, model, state, ks)  # rank 0 stacks all members
        return _Trained(model, state, arch_args)
    members = _MemberFactory(cfg, rt, len(rd.ds.classes), arch_args, preset)
    member_states, state = fit_sequential(
        members.build, pool_images, pool_labels, rd.plan, rt.train_cfg, members.augmenter,
        seed=cfg.seed, amp_dtype=rt.amp_dtype, run_dir=run_dir, resume=resume,
        make_photometric=members.photometric,
    )
    model.load_state_dict(stack_members(member_states))
    return _Trained(model, state, arch_args)


def _bundle_meta(cfg: RunConfig, ds: Dataset, arch_args: dict[str, Any]) -> dict[str, Any]:
    """meta.json before calibration: the input contract every predictor reproduces, and the provenance (versions,
    commit, the data root resolved so that commands find it from any current folder)."""
    return {
        "name": cfg.name, "classes": ds.classes, "arch": cfg.model.arch, "arch_args": arch_args,
        "members": cfg.ensemble.members, "bootstrap": cfg.ensemble.bootstrap,
        "input": {"size": cfg.data.image_size, "channels": 1, "mean": INPUT_MEAN, "std": INPUT_STD,
                  "standardize": cfg.data.standardize, "crop_border": cfg.data.crop_border},
        "seed": cfg.seed, "package_version": __version__, "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "data": {"root": str(Path(ds.root).resolve()), "fingerprint": ds.fingerprint},
    }


def _calibrate_and_score(cfg: RunConfig, rt: _Runtime, rd: _RunData, model: torch.nn.Module,
                         meta: dict[str, Any], run_dir: Path) -> _Scored:
    """Temperature and referral threshold from validation (or out-of-bag) predictions only, then the validation
    scores; the test split is scored once, after everything is fixed (`_test_scores`)."""
    ds, pool, plan = rd.ds, rd.pool, rd.plan
    predictor = Predictor(bundle=Bundle(model=model, meta=meta, path=run_dir), device=rt.device)
    # one pass over the pool: validation logits, and the training features behind ood scores and adaptation
    pool_logits, reference = reference_from_pool(predictor, rd.images[pool], rd.pool_labels,
                                                 plan.train_index, plan.val_mask)
    predictor.reference = reference  # test images get ood scores against it
    meta["ood"] = reference_meta(reference)
    val_probs, val_labels, val_index = validation_probs(pool_logits, rd.pool_labels, plan)
    meta.update(calibrate(val_probs, val_labels, cfg))
    val_scores, _ = score(meta, np.log(np.clip(val_probs, 1e-12, None))[:, None, :], val_labels, ds.classes,
                          [ds.paths[pool[i]] for i in val_index], cfg.seed)
    results: dict[str, Any] = {"validation": val_scores, "validation_kind": "out-of-bag" if plan.bootstrap
                               else "holdout", "test": None}
    test_rows = _test_scores(cfg, rd, predictor, meta, results, run_dir) if len(rd.test) else []
    meta["metrics"] = {"validation": val_scores["metrics"],
                       "test": results["test"]["metrics"] if results["test"] else None}
    return _Scored(reference, meta, results, test_rows, len(val_labels))


def _test_scores(cfg: RunConfig, rd: _RunData, predictor: Predictor, meta: dict[str, Any],
                 results: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """Score the test split once (into `results`): with ood referral, again without the images copied from
    training (they inflate the score), and Grad-CAM (where the model looks: the shortcut check, and the report's
    gallery). Returns the per-image rows of predictions_test.csv."""
    ds, test = rd.ds, rd.test
    test_paths = [ds.paths[i] for i in test]
    test_logits, test_features = predictor.member_outputs(rd.images[test])
    results["test"], rows = score(meta, test_logits, ds.labels[test], ds.classes, test_paths, cfg.seed,
                                  predictor.ood_scores(test_features))
    results["test_without_duplicates"] = score_without_copies(
        meta, test_logits, ds.labels[test], ds.classes, test_paths, {ds.paths[i] for i in rd.pool},
        rd.duplicates, cfg.seed)
    results["saliency"] = saliency_summary(predictor, rd.images[test], ds.labels[test],
                                           run_dir / "figures" / "gradcam_test.png", names=test_paths)
    results["saliency_central_mass"] = results["saliency"]["central_mass_mean"]
    return rows


def _run_summary(rt: _Runtime, rd: _RunData, state: TrainState, scored: _Scored,
                 total_seconds: float) -> dict[str, Any]:
    """metrics.json's timing, data and members sections: what the run cost, on what, and which images it used."""
    ds = rd.ds
    return {
        "timing": {
            "total_seconds": total_seconds, "train_seconds": state.train_seconds, "load_seconds": rd.load_seconds,
            "epochs": state.epoch, "images_seen": state.images_seen,
            "train_images_per_second": state.images_seen / max(state.train_seconds, 1e-9),
            "device": str(rt.device), "precision": rt.precision, "threads": rt.threads,
            "runtime": rt.choice.to_dict(), "convolutions": conv3x3.chosen(), "kernels": kernels.available(),
        },
        "data": {
            "classes": ds.classes, "counts": ds.class_counts(), "pool": len(rd.pool), "holdout": len(rd.holdout),
            "validation_kind": scored.results["validation_kind"], "validation_images": scored.validation_images,
            "test": len(rd.test), "skipped": [s.__dict__ for s in ds.skipped], "duplicates": rd.duplicate_summary,
            "duplicate_pairs": [d.__dict__ for d in rd.duplicates],
        },
        "members": {"best_epoch": state.member_best_epoch, "stopped": state.member_stopped},
    }


def _write_run(run_dir: Path, cfg: RunConfig, data: str | Path, rt: _Runtime, rd: _RunData, trained: _Trained,
               scored: _Scored, results: dict[str, Any]) -> None:
    """The bundle and its reports, in an order that makes a finished run recognisable: the feature reference
    before meta.json (written last of the bundle), the resume files removed, and run.json marked complete last."""
    history = trained.state.history
    save_reference(run_dir, scored.reference)
    save_bundle(run_dir, trained.model, scored.meta, cfg.to_yaml())
    write_json(run_dir / "plan.json", {"train_index": rd.plan.train_index, "val_mask": rd.plan.val_mask.astype(int),
                                       "pool_paths": [rd.ds.paths[i] for i in rd.pool]})
    write_json(run_dir / "metrics.json", results)
    write_json(run_dir / "history.json", history)
    if scored.test_rows:
        write_rows_csv(run_dir / "predictions_test.csv", scored.test_rows)
    write_report(run_dir, cfg, scored.meta, results, history)
    remove_checkpoint(run_dir)
    shutil.rmtree(run_dir / "members", ignore_errors=True)  # sequential members' resume files
    shutil.rmtree(run_dir / distributed.RANKS_DIR, ignore_errors=True)  # members-over-ranks checkpoints
    write_json(run_dir / RUN_INFO, {"data": str(Path(data).resolve()), "complete": True,
                                    "runtime": rt.choice.to_dict(), "convolutions": conv3x3.chosen(),
                                    "kernels": kernels.available()})


def adapted_scores(predictor: Predictor, images: np.ndarray, labels: np.ndarray, paths: list[str],
                   data: str | Path, folds: int, seed: int) -> dict[str, Any]:
    """Cross-fitted adapted scores (`adapt.crossfit`): each image scored by a model adapted on the other folds."""
    from lungxray.sites.adapt import crossfit, patient_groups

    groups = patient_groups(paths, data)
    fit = crossfit(predictor, images, groups, folds, seed=seed)
    scores, _ = score(predictor.meta, fit.logits, labels, predictor.classes, paths, seed, fit.ood)
    grouped = int((~np.char.startswith(groups.astype(str), "image:")).sum())
    return {"overall": scores, "folds": int(fit.fold.max()) + 1, "grouped_by_patient": grouped,
            "adapted_on": [len(a) for a in fit.adapted_on], "left_out": [len(r.excluded) for r in fit.reports],
            "one_class": [r.one_class for r in fit.reports], "blend": [r.blend for r in fit.reports],
            "warnings": sorted({w for r in fit.reports for w in r.warnings}),
            "class_mix": [r.class_mix for r in fit.reports]}


def find_data(explicit: str | Path | None = None) -> Path:
    """--data, then $LUNGXRAY_DATA, then data/covid19-dataset, then ../shared/data/covid19-dataset."""
    for given, what in ((explicit, "data folder"), (os.environ.get("LUNGXRAY_DATA"), "LUNGXRAY_DATA folder")):
        if given:  # asked for by name: never fall back to another dataset when it is missing
            if not Path(given).is_dir():
                raise FileNotFoundError(f"{what} not found: {given}")
            return Path(given)
    for c in ("data/covid19-dataset", "../shared/data/covid19-dataset"):
        if Path(c).is_dir():
            return Path(c)
    raise FileNotFoundError(
        "no dataset found: pass --data DIR or set LUNGXRAY_DATA (looked in data/covid19-dataset and "
        "../shared/data/covid19-dataset)"
    )


def bundle_data(run_dir: str | Path, explicit: str | Path | None = None) -> Path:
    """`explicit` (--data), else the folder the bundle was trained on (meta.json's data.root; a relative one, as
    older bundles kept it, is tried from the current folder and from the bundle's), else $LUNGXRAY_DATA. A bundle
    moved to another machine names where its data was and asks for --data rather than failing on a bare path."""
    from lungxray.inference.bundle import read_meta

    if explicit:
        return find_data(explicit)
    recorded = read_meta(run_dir).get("data", {}).get("root")
    if recorded:
        tries = [Path(recorded)] if Path(recorded).is_absolute() else [Path(recorded), Path(run_dir) / recorded]
        for candidate in tries:
            if candidate.is_dir():
                return candidate
    if os.environ.get("LUNGXRAY_DATA"):
        return find_data(None)
    raise FileNotFoundError(
        f"{run_dir} was trained on {recorded or 'an unrecorded folder'} (meta.json data.root), which is not on this "
        "machine: pass --data DIR with the same dataset (or set LUNGXRAY_DATA)")


def evaluate_run(run_dir: str | Path, data: str | Path, out: str | Path | None = None, seed: int = 0,
                 device: str = "cpu", adapt: bool = False, folds: int = 5) -> dict[str, Any]:
    """Score a bundle on a labelled folder (its test/ split when it has one, else every image).

    Folders whose names map to no class of the model are skipped and listed; with several top-level sources
    (DATA/source/class/...) each source is also scored on its own. When some sources have a test/ split and
    others only class folders, the latter are scored whole (never another source's train/ images). When the folder
    has a train/ split too, the scores are also given without the scored images that have a copy in it.
    Read-only unless `out` is given: then evaluation.json, predictions.csv and evaluation.md are written there.
    The folder's site verdict (`lungxray.sites.shift`) is part of the result; with `adapt` the model is also scored
    adapted to the folder, cross-fitted: each image by a model adapted on the other `folds` folds (by patient where
    a MANIFEST.csv says), never on itself.
    """
    predictor = Predictor.load(run_dir, device)
    meta, classes = predictor.meta, predictor.classes
    contract = meta["input"]
    ds = load_dataset(data, size=contract["size"], classes=classes)
    idx = np.flatnonzero(np.isin(ds.splits, ["test", "all"]))  # "all": a source without split folders
    idx = idx if (ds.splits == "test").any() else np.arange(len(ds))
    if len(idx) == 0:
        raise ValueError(f"{data}: no readable images of the classes {', '.join(classes)}")
    images = prepare(ds.images[idx], contract.get("standardize", "none"), contract.get("crop_border", 0.0))
    logits, features = predictor.member_outputs(images)
    ood = predictor.ood_scores(features)
    labels, paths = ds.labels[idx], [ds.paths[i] for i in idx]
    overall, rows = score(meta, logits, labels, classes, paths, seed, ood)
    shift = folder_shift(predictor, ood) if ood is not None else None
    result: dict[str, Any] = {"data": str(data), "images": len(idx), "overall": overall,
                              "skipped": [s.__dict__ for s in ds.skipped], "sources": {}, "written_to": None,
                              "shift": shift.to_dict() if shift else None}
    if adapt:
        result["adapted"] = adapted_scores(predictor, images, labels, paths, data, folds, seed)
    others = {ds.paths[i] for i in np.setdiff1d(np.arange(len(ds)), idx)}  # train/ images beside the scored ones
    if others:
        result["without_duplicates"] = score_without_copies(meta, logits, labels, classes, paths, others,
                                                            find_duplicates(ds), seed)
    sources = ds.sources[idx]
    for source in sorted(set(sources) - {""}):
        sel = np.flatnonzero(sources == source)
        result["sources"][source], _ = score(meta, logits[sel], labels[sel], classes,
                                             [paths[i] for i in sel], seed)
    if out is None:  # read-only by default: nothing is written into the bundle or anywhere else
        return result
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result["written_to"] = str(out_dir)
    write_json(out_dir / "evaluation.json", result)
    write_rows_csv(out_dir / "predictions.csv", rows)
    write_evaluation_report(out_dir, meta, result)
    return result
