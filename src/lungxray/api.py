"""The Python API: `load` a model and predict, `train` a run, `evaluate` a model on a labelled folder.

Notebook users live here, and the `lungxray` command calls exactly these functions, so the two never drift apart.
Importing this module is cheap (no torch, numpy or pandas): the pipeline is imported on first use.
"""

from __future__ import annotations

import difflib
import html
import importlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from lungxray.evaluation.formatting import ci, pct

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from lungxray.config import RunConfig
    from lungxray.evaluation.audit import AuditResult
    from lungxray.inference.predictor import Predictions, Predictor
    from lungxray.sites.shift import ShiftResult

    ImageInput: TypeAlias = str | os.PathLike[str] | bytes | Image.Image | np.ndarray
    ConfigSource: TypeAlias = str | os.PathLike[str] | Mapping[str, Any] | RunConfig

log = logging.getLogger(__name__)

__all__ = ["Evaluation", "Model", "Run", "audit", "evaluate", "load", "train"]

DEFAULT_CONFIG = "configs/reference.yaml"


# ------------------------------------------------------------------------------------------------------ predict


class Model:
    """A trained model (one network or a packed ensemble) loaded from a bundle folder; see :func:`load`.

    >>> model = lungxray.load("runs/reference")
    >>> model.classes
    ['covid', 'normal', 'pneumonia']
    >>> model.predict("scan.png").labels
    ['covid']
    """

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    @property
    def path(self) -> Path:
        """The bundle folder the model was loaded from."""
        return self.predictor.bundle.path

    @property
    def classes(self) -> list[str]:
        """Class names in the order of the probability columns."""
        return self.predictor.classes

    @property
    def meta(self) -> dict[str, Any]:
        """The bundle's meta.json: input contract, architecture, calibration, metrics, provenance."""
        return self.predictor.meta

    def predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        on_error: Literal["raise", "skip"] = "raise",
        batch_size: int = 32,
    ) -> Predictions:
        """Labels, calibrated probabilities, uncertainty and referral flags for one image or many.

        `images` is a path (a folder is searched recursively), the bytes of a file, a PIL image, a numpy array
        ((H, W) or (H, W, 3|4); an (N, H, W) stack is N images), or a list of any of these. Every input is decoded
        and preprocessed exactly as in training. An unreadable input raises `ImageDecodeError` naming it, or with
        `on_error="skip"` is logged, left out and listed in `Predictions.skipped`.

        >>> model.predict(["a.png", "b.dcm"]).to_dataframe()  # path, label, prob_<class>..., uncertainty, refer
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        return self.predictor.predict_named(_inputs(images), on_error, batch_size)

    def shift(self, images: ImageInput | Iterable[ImageInput], *, alpha: float = 0.01) -> ShiftResult:
        """Is this set of images (typically a folder of one site) from another site than the training images?

        A two-sample test of their feature-space scores against the training images' (`lungxray.sites.shift`); the
        result has `shifted`, `p_value`, `score` and a one-line `verdict`.

        >>> model.shift("other-hospital/").verdict
        """
        from lungxray.sites.shift import shift_test

        reference = self.predictor.reference
        if reference is None:
            raise ValueError(f"{self.path} has no feature reference (trained before lungxray kept one); "
                             "retrain it to get site verdicts")
        pred = self.predict(images, on_error="skip")
        return shift_test(reference.null_scores, pred.ood, reference.threshold, alpha)

    def adapt(self, images: ImageInput | Iterable[ImageInput], *, out: str | os.PathLike[str] | None = None,
              prior_strength: float | None = None, class_mix: Literal["estimate", "train"] = "estimate",
              force: bool = False) -> Model:
        """A copy of this model adapted to a site from its unlabelled images (`lungxray.sites.adapt`).

        With `out` the adapted bundle is written there (what `lungxray adapt` does) and loaded from it; without,
        the adapted model lives in memory only. Labels and folder names are ignored.

        >>> site_model = model.adapt("other-hospital/", out="runs/reference-site")
        """
        import copy

        from lungxray.sites.adapt import PRIOR_STRENGTH, AdaptSettings, adapt_sources, folder_fingerprint, write_adapted

        settings = AdaptSettings(prior_strength=PRIOR_STRENGTH if prior_strength is None else prior_strength,
                                 class_mix=class_mix)
        if self.predictor.__class__.__name__ != "Predictor":
            raise ValueError("adapt runs on the torch engine; load the model with engine='torch'")
        predictor = copy.deepcopy(self.predictor)
        items = _inputs(images)
        report = adapt_sources(predictor, items, settings)
        for warning in report.warnings:
            log.warning("%s", warning)
        if out is None:
            return Model(predictor)
        paths = [Path(src) for src, _ in items if isinstance(src, str | os.PathLike)]
        source = os.fspath(images) if isinstance(images, str | os.PathLike) else "<in-memory images>"
        write_adapted(predictor, Path(out), report, source, folder_fingerprint(paths), settings, force)
        return load(out)

    def gradcam(self, image: ImageInput, *, overlay: bool = True, target: str | None = None) -> np.ndarray:
        """Grad-CAM saliency of one image: an RGB uint8 (S, S, 3) overlay, or with `overlay=False` the heatmap
        float32 (S, S) in [0, 1]. `target` is a class name (default: the predicted class).

        Shows where the model looked: a map lit up on borders or text markers rather than the lungs means the
        prediction rests on a shortcut (see the README's evaluation notes).

        >>> plt.imshow(model.gradcam("scan.png"))
        """
        import numpy as np

        saliency = importlib.import_module("lungxray.evaluation.gradcam")
        items = _inputs(image)
        if len(items) != 1:
            raise ValueError(f"gradcam takes one image, got {len(items)}")
        source, name = items[0]
        u8 = self.predictor.preprocess(source, name=name)  # (S, S) uint8
        if target is not None and target not in self.classes:
            raise ValueError(f"unknown class {target!r} (this model has {', '.join(self.classes)})")
        index = None if target is None else np.array([self.classes.index(target)])
        cam: np.ndarray = saliency.gradcam(self.predictor, u8[None], index)[0]
        return saliency.overlay(u8, cam) if overlay else cam  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, classes={self.classes}, members={self.predictor.bundle.members})"

    def _repr_html_(self) -> str:
        meta = self.meta
        test = (meta.get("metrics") or {}).get("test") or {}
        rows = [
            ("bundle", str(self.path)),
            ("classes", ", ".join(self.classes)),
            ("architecture", f"{meta.get('arch')} × {meta.get('members')} member(s)"
             f"{' (bootstrap)' if meta.get('bootstrap') else ''}"),
            ("input", f"{meta['input']['size']}×{meta['input']['size']} grayscale"),
            ("temperature", _num(meta.get("temperature"))),
            ("refer threshold", _num(meta.get("refer_threshold"))),
            ("test accuracy", pct(test.get("accuracy")) + (f" of {test['n']} images" if "n" in test else "")),
        ]
        return _table(f"lungxray model {meta.get('name', '')}", [("", [v for _, v in rows])], [k for k, _ in rows])


def load(run_dir: str | os.PathLike[str], device: str = "cpu", *, engine: Literal["torch", "onnx"] = "torch",
         onnx: str | os.PathLike[str] | None = None) -> Model:
    """Load a trained model from its bundle folder (what `train` or `lungxray train` wrote).

    `device` is cpu, cuda or auto; `engine="onnx"` scores with ONNX Runtime (same results, exported on first use);
    `onnx="model.int8.onnx"` runs that export of this bundle (e.g. `lungxray export --quantize int8`) instead.

    >>> model = lungxray.load("runs/reference")
    >>> model.predict(["a.png", "b.png"])
    """
    from lungxray.inference.engines import load_predictor
    from lungxray.runtime import resolve_device

    onnx_path = None if onnx is None else Path(onnx)
    return Model(load_predictor(Path(run_dir), str(resolve_device(device)), engine, onnx_path))


def _is_single(images: object) -> bool:
    """One image (a path, bytes, PIL image, (H, W) or (H, W, C<=4) array), as opposed to a collection of them."""
    import numpy as np
    from PIL import Image

    if isinstance(images, str | os.PathLike | bytes | bytearray | memoryview | Image.Image):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim == 2 or (images.ndim == 3 and images.shape[-1] <= 4)
    return False


def _inputs(images: object) -> list[tuple[Any, str]]:
    """(source, name) per image; folders expand to their image files, in-memory inputs get `<kind i>` names."""
    from lungxray.inference.predictor import expand_paths

    items: list[tuple[Any, str]] = []
    sources = [images] if _is_single(images) else list(images)  # type: ignore[call-overload]
    for i, src in enumerate(sources):
        if isinstance(src, str | os.PathLike):
            path = Path(src)
            if path.is_dir():
                files = expand_paths([path])
                if not files:
                    raise FileNotFoundError(f"{path}: no image files in this folder")
                items += [(f, str(f)) for f in files]
            else:
                items.append((path, os.fspath(src)))
        else:
            filename = getattr(src, "filename", "")  # PIL images opened from a file remember it
            kind = "array" if type(src).__module__ == "numpy" else type(src).__name__
            items.append((src, filename if isinstance(filename, str) and filename else f"<{kind} {i}>"))
    return items


# -------------------------------------------------------------------------------------------------------- train


@dataclass
class Run:
    """A finished training run: its bundle folder (loadable with :func:`load`), configuration, metrics, history.

    >>> run = lungxray.train("configs/smoke.yaml", epochs=3)
    >>> run.test_accuracy, run.history[-1]["val_loss"], run.run_dir
    """

    run_dir: Path
    config: RunConfig = field(repr=False)
    metrics: dict[str, Any] = field(repr=False)  # metrics.json: validation/test scores with intervals, timing, data
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)  # history.json: one dict per epoch

    @classmethod
    def from_dir(cls, run_dir: str | os.PathLike[str]) -> Run:
        """Reopen a finished run folder (e.g. `runs/reference` after `make run`) to inspect or display it."""
        from lungxray.config import load_config
        from lungxray.inference.bundle import read_meta

        path = Path(run_dir)
        read_meta(path)  # a clear BundleError for a folder that is not a finished run
        history = path / "history.json"
        return cls(path, load_config(path / "config.yaml"), json.loads((path / "metrics.json").read_text()),
                   json.loads(history.read_text()) if history.is_file() else [])

    @property
    def test_accuracy(self) -> float | None:
        """Accuracy on the test split (scored once), or None when the data had no test split."""
        test = self.metrics.get("test")
        return float(test["metrics"]["accuracy"]) if test else None

    @property
    def report(self) -> Path:
        """The Markdown report with figures."""
        return self.run_dir / "report.md"

    def load(self, device: str = "cpu") -> Model:
        """The trained model, ready to predict."""
        return load(self.run_dir, device)

    def __str__(self) -> str:
        test = self.metrics.get("test")
        score = f"test accuracy {ci(test['intervals']['accuracy'])}" if test else "no test split"
        epochs = self.metrics.get("timing", {}).get("epochs", len(self.history))
        return f"Run {self.config.name!r} in {self.run_dir}: {epochs} epochs, {score}"

    def _repr_html_(self) -> str:
        m = self.metrics
        columns = []
        if m.get("test"):
            columns.append((f"test ({m['test']['metrics']['n']} images)", m["test"]))
        val = m["validation"]
        columns.append((f"validation ({m.get('validation_kind', 'holdout')}, {val['metrics']['n']})", val))
        t, data = m.get("timing", {}), m.get("data", {})
        notes = [
            f"{self.config.model.arch} × {self.config.ensemble.members} member(s), {t.get('epochs', '?')} epochs, "
            f"{t.get('train_seconds', 0):.0f} s training on {t.get('device', '?')}",
            f"duplicates: {data.get('duplicates') or 'none'}; unreadable files: {len(data.get('skipped', []))}",
            f"bundle: {self.run_dir} (report: {self.report.name})",
        ]
        return _scores_html(f"lungxray run {self.config.name}", columns, notes)


def train(
    config: ConfigSource | None = None,
    data: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    device: str = "auto",
    resume: bool = False,
    force: bool = False,
    **overrides: Any,
) -> Run:
    """Train, calibrate, evaluate once on test/ and write a loadable bundle; returns the :class:`Run`.

    `config` is a YAML path (default `configs/reference.yaml`), a mapping or a `RunConfig`; `data` defaults to
    what the CLI finds (`$LUNGXRAY_DATA`, `data/covid19-dataset`, ...); `out` to `runs/<config name>`.
    Overrides take any config key: a bare field name when it is unique across sections (`epochs=3`,
    `arch="resnet_small"`), `section__field` (`train__lr=0.01`), a dotted key (`**{"train.lr": 0.01}`), or a
    section mapping (`augment={"rotation_range": 10}`). `resume=True` continues the interrupted run in `out`
    with its own config.yaml and data. `out` holding a finished bundle or an interrupted run is refused unless
    `force=True` (a folder in use by another training always is).

    >>> run = lungxray.train("configs/smoke.yaml", data="data/covid19-dataset", out="runs/mine", epochs=3)
    >>> run                                    # in Jupyter: a table of the test and validation figures
    """
    from lungxray.config import load_config
    from lungxray.training.pipeline import find_data, read_run_info, train_run

    if resume:
        if out is None:
            raise ValueError("resume=True needs out=RUN_DIR (the run to continue)")
        if overrides or config is not None:
            raise ValueError("a resumed run keeps its config.yaml: pass neither a config nor overrides")
        run_dir = Path(out)
        source: Any = run_dir / "config.yaml"
        if not source.is_file():
            raise FileNotFoundError(f"{run_dir}: nothing to resume (no config.yaml)")
        data = data or read_run_info(run_dir).get("data")  # the data the run started on, not a default
        if not data:
            raise ValueError(f"{run_dir}: no data folder recorded in run.json; pass --data DIR (data= in Python)")
        dotted: dict[str, Any] = {}
    else:
        source = _config_source(config)
        dotted = override_keys(overrides)
        run_dir = Path(out) if out is not None else Path("runs") / load_config(source, dotted).name
    result = train_run(source, find_data(_path(data)), run_dir, dotted, device=device, resume=resume, force=force)
    return Run(result.run_dir, result.config, result.metrics, result.history)


def _path(p: str | os.PathLike[str] | None) -> Path | None:
    return None if p is None else Path(p)


def _config_source(config: ConfigSource | None) -> Any:
    from lungxray.config import RunConfig

    if config is None:
        return DEFAULT_CONFIG
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, Mapping):
        return dict(config)
    return Path(config)


def override_keys(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Python-friendly override names -> dotted config keys (`epochs` -> `train.epochs`); unknown names refused."""
    from lungxray.config import ConfigError, RunConfig

    sections: dict[str, set[str]] = {}
    top: set[str] = set()
    for f in fields(RunConfig):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            sections[f.name] = {g.name for g in fields(default)}
        else:
            top.add(f.name)
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        key = key.replace("__", ".")
        if "." in key or key in top:
            out[key] = value
        elif key in sections and isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            owners = [s for s, names in sections.items() if key in names]
            if len(owners) == 1:
                out[f"{owners[0]}.{key}"] = value
            elif owners:
                raise ConfigError(f"{key} is in several sections ({', '.join(owners)}): write {owners[0]}__{key}=")
            else:
                known = sorted(top | {n for names in sections.values() for n in names})
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"unknown config key {key}{hint}")
    return out


def parse_overrides(texts: Sequence[str]) -> dict[str, Any]:
    """`--set key=value` strings (values read as YAML) -> {dotted key: value}, for the CLI."""
    from lungxray.config import parse_override

    return {".".join(path): value for path, value in map(parse_override, texts)}


# ----------------------------------------------------------------------------------------------------- evaluate


@dataclass
class Evaluation:
    """A model scored on a labelled folder: overall and per-source metrics with 95% intervals.

    >>> ev = lungxray.evaluate("runs/reference", data="other-hospital/")
    >>> ev.accuracy, ev.result["overall"]["intervals"]["macro_f1"]
    """

    run_dir: Path
    out_dir: Path | None  # where evaluation.json, predictions.csv and evaluation.md were written (None: nowhere)
    result: dict[str, Any] = field(repr=False)  # evaluation.json

    @property
    def images(self) -> int:
        return int(self.result["images"])

    @property
    def accuracy(self) -> float:
        return float(self.result["overall"]["metrics"]["accuracy"])

    @property
    def report(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "evaluation.md"

    def __str__(self) -> str:
        from lungxray.evaluation.report import evaluation_lines

        return "\n".join(evaluation_lines(self.result, self.out_dir))

    def _repr_html_(self) -> str:
        r = self.result
        columns = [(f"all ({r['images']} images)", r["overall"])]
        columns += [(f"{s} ({sc['metrics']['n']})", sc) for s, sc in r["sources"].items()]
        notes = [f"data: {r['data']}; unreadable or skipped: {len(r.get('skipped', []))}",
                 f"report: {self.report}" if self.report else "nothing written (pass out=DIR to save a report)"]
        return _scores_html(f"evaluation of {self.run_dir}", columns, notes)


def evaluate(
    run_dir: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    device: str = "cpu",
    seed: int = 0,
    adapt: bool = False,
    folds: int = 5,
) -> Evaluation:
    """Score a trained model on a labelled folder (its test/ split when it has one, else every image).

    Read-only unless `out` is given: then evaluation.json, predictions.csv and evaluation.md are written there
    (nothing is ever written into the bundle unasked). `data` defaults to what the CLI finds. Folders of classes
    the model does not know are skipped and listed.

    >>> lungxray.evaluate("runs/reference", data="other-hospital/")
    """
    from lungxray.training.pipeline import evaluate_run, find_data

    result = evaluate_run(Path(run_dir), find_data(_path(data)), _path(out), seed=seed, device=device,
                          adapt=adapt, folds=folds)
    return Evaluation(Path(run_dir), _path(out), result)


def audit(data: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, seed: int = 0,
          folds: int = 5) -> AuditResult:
    """Shortcut audit of a labelled folder (`lungxray.audit`): can the classes be told apart from borders, 8x8
    thumbnails, grey-level histograms or file facts alone? Cross-validated probes against chance, duplicates,
    per-class statistics and a verdict; with `out`, audit.md, audit.json and figures are written there.

    >>> print(lungxray.audit("data/covid19-dataset").verdict)
    """
    if out is None:
        from lungxray.evaluation.audit import audit as run_audit

        return run_audit(data, seed=seed, folds=folds)
    from lungxray.evaluation.audit_report import audit_to  # matplotlib only when a report is asked for

    return audit_to(data, out, seed=seed, folds=folds)


# --------------------------------------------------------------------------------------------------- rendering


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _table(caption: str, columns: list[tuple[str, list[str]]], row_names: list[str],
           notes: Sequence[str] = ()) -> str:
    """A compact HTML table: one row per name, one column per (header, values)."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h, _ in columns)
    thead = f"<thead><tr><th></th>{head}</tr></thead>" if any(h for h, _ in columns) else ""
    body = "".join(
        f"<tr><th style='text-align:left'>{e(name)}</th>"
        + "".join(f"<td style='text-align:left'>{e(values[i])}</td>" for _, values in columns) + "</tr>"
        for i, name in enumerate(row_names)
    )
    foot = "".join(f"<div style='font-size:smaller'>{e(n)}</div>" for n in notes)
    return (f"<div><table><caption style='text-align:left'><b>{e(caption)}</b></caption>"
            f"{thead}<tbody>{body}</tbody></table>{foot}</div>")


def _scores_html(caption: str, columns: list[tuple[str, dict[str, Any]]], notes: Sequence[str]) -> str:
    """Key figures of scored splits side by side: headline metrics with 95% intervals, recall per class, ECE."""
    classes = list(columns[0][1]["metrics"]["per_class"])
    keys = [("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro F1"),
            ("macro_roc_auc", "macro ROC AUC"), *((f"recall_{c}", f"recall {c}") for c in classes)]
    names = [label for _, label in keys] + ["ECE (calibrated)", "referred / accuracy of the rest"]
    cols = []
    for header, scores in columns:
        iv, refer = scores["intervals"], scores.get("refer") or {}
        values = [ci(iv.get(key)) for key, _ in keys]
        values.append(_num(scores.get("ece_calibrated")))
        values.append(f"{pct(refer.get('referral_rate'))} / {pct(refer.get('accuracy'))}")
        cols.append((header, values))
    return _table(caption, cols, names, [*notes, "95% intervals: Wilson for accuracy and recall, percentile "
                                                 "bootstrap over images for F1 and AUC."])
