"""How far an image is from the training images, in the model's own feature space; and the statistics behind it.

Why: a softmax is confident far from its training data (a uniform grey image gets covid p = 1.000), so the
ensemble's entropy cannot say "I have never seen anything like this". The distance of an image's penultimate
features to the training images can. Per member k we keep the class means mu_kc and a shared within-class
covariance (Ledoit-Wolf shrunk; Lee et al., NeurIPS 2018), fitted on the images member k trained on, and score

    ood(x) = mean_k min_c (f_k(x) - mu_kc)' P_k (f_k(x) - mu_kc) / D

(D feature channels; the reference's honest training scores have a median of about 0.2). The referral
threshold is a quantile of the *honest* scores of training images: each pool image scored only by the members
that never trained on it (its out-of-bag members; a single model's holdout), so the threshold is set on data
the model has, never on test.
Those honest scores are also the null distribution of the folder-level shift test (`lungxray.sites.shift`).

The same pass records, per BatchNorm layer and class, the mean and mean square of the layer's input on the clean
(un-augmented) training images, and the source's running statistics: what `lungxray.sites.adapt` needs to re-estimate
normalisation for a new site relative to the training images, with their class mix. Everything lives in the
bundle's `features.safetensors`; the threshold and quantile in `meta.json["ood"]`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FEATURES_FILE = "features.safetensors"
OOD_QUANTILE = 0.975  # fraction of honest training scores below the threshold (chosen before any measurement)


@dataclass(frozen=True)
class BatchNormReference:
    """Per BatchNorm layer: class-wise moments of its input on clean training images, and the source's stats."""

    means: np.ndarray  # (C, ch) per-class mean of the layer input
    squares: np.ndarray  # (C, ch) per-class mean square of the layer input
    running_mean: np.ndarray  # (ch,) the source model's running mean (what adaptation starts from)
    running_var: np.ndarray  # (ch,)


@dataclass(frozen=True)
class FeatureReference:
    """What the bundle knows about its training images' features (see the module docstring)."""

    class_means: np.ndarray  # (K, C, D)
    precision: np.ndarray  # (K, D, D)
    null_scores: np.ndarray  # (M,) honest ood scores of training images
    class_prior: np.ndarray  # (C,) class frequencies of the training pool
    threshold: float
    batchnorm: dict[str, BatchNormReference] = field(default_factory=dict)

    def score(self, features: np.ndarray, members: np.ndarray | None = None) -> np.ndarray:
        """(N, K, D) features -> (N,) ood scores; `members` (N, K) bool restricts each image to some members."""
        per_member = mahalanobis(features, self.class_means, self.precision)  # (N, K)
        if members is None:
            return per_member.mean(1)
        weights = members.astype(np.float64)
        return (per_member * weights).sum(1) / np.maximum(weights.sum(1), 1)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"class_means": self.class_means, "precision": self.precision, "null_scores": self.null_scores,
               "class_prior": self.class_prior, "threshold": np.array([self.threshold])}
        for name, bn in self.batchnorm.items():
            out |= {f"bn.{name}.means": bn.means, f"bn.{name}.squares": bn.squares,
                    f"bn.{name}.running_mean": bn.running_mean, f"bn.{name}.running_var": bn.running_var}
        return {k: torch.as_tensor(np.ascontiguousarray(v, dtype=np.float32)) for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> FeatureReference:
        arrays = {k: v.double().numpy() for k, v in tensors.items()}
        names = sorted({k[3:].rsplit(".", 1)[0] for k in arrays if k.startswith("bn.")})
        batchnorm = {n: BatchNormReference(*(arrays[f"bn.{n}.{part}"] for part in
                                             ("means", "squares", "running_mean", "running_var"))) for n in names}
        return cls(arrays["class_means"], arrays["precision"], arrays["null_scores"], arrays["class_prior"],
                   float(arrays["threshold"][0]), batchnorm)


def save_reference(run_dir: str | Path, reference: FeatureReference) -> Path:
    from safetensors.torch import save_file

    from lungxray.io.files import atomic_write

    path = Path(run_dir) / FEATURES_FILE
    tensors = reference.to_tensors()
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return path


def load_reference(run_dir: str | Path) -> FeatureReference | None:
    """The bundle's feature reference, or None for bundles trained before it existed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(run_dir) / FEATURES_FILE
    if not path.is_file():
        return None
    try:
        return FeatureReference.from_tensors(load_file(str(path)))
    except (SafetensorError, KeyError, ValueError, OSError) as exc:
        from lungxray.inference.bundle import BundleError

        raise BundleError(f"{path}: not a valid feature reference ({exc})") from exc


def mahalanobis(features: np.ndarray, class_means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(N, K, D) features -> (N, K) min over classes of the squared Mahalanobis distance, divided by D."""
    f = features.astype(np.float64)
    diff = f[:, :, None, :] - class_means[None]  # (N, K, C, D)
    dist = np.einsum("nkcd,kde,nkce->nkc", diff, precision, diff)
    return dist.min(-1) / features.shape[-1]


# ------------------------------------------------------------------------------------------- capturing features


def penultimate(model: nn.Module) -> nn.Module:
    """The last packed linear layer: its input (B, K, D) is each member's penultimate feature vector."""
    from lungxray.models.nets import PackedLinear

    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PackedLinear output layer to take features from")
    return layers[-1]


def batchnorm_layers(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """The model's BatchNorm layers by name, in forward (definition) order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@dataclass
class Captured:
    """What `capture` collected during forward passes, one entry per batch."""

    features: list[torch.Tensor] = field(default_factory=list)  # (B, K, D)
    bn_means: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> (B, ch) per-image means
    bn_squares: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def feature_array(self, members: int) -> np.ndarray:
        if not self.features:
            return np.zeros((0, members, 0), np.float32)
        return torch.cat(self.features).float().numpy()


@contextlib.contextmanager
def capture(model: nn.Module, batchnorm: bool = False) -> Iterator[Captured]:
    """Record penultimate features (and with `batchnorm` every BN layer's per-image input moments)."""
    got = Captured()

    def on_features(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        got.features.append(args[0].detach().float().cpu())

    def on_bn(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float()
            got.bn_means.setdefault(name, []).append(x.mean((2, 3)).cpu())
            got.bn_squares.setdefault(name, []).append(x.square().mean((2, 3)).cpu())
        return hook

    handles = [penultimate(model).register_forward_pre_hook(on_features)]
    if batchnorm:
        handles += [bn.register_forward_pre_hook(on_bn(n)) for n, bn in batchnorm_layers(model).items()]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------- fitting


def fit_gaussians(features: np.ndarray, labels: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) features of one member's training images -> (class means (C, D), shrunk shared precision (D, D)).

    A class absent from the images gets the overall mean (it then never is the nearest by much)."""
    from sklearn.covariance import LedoitWolf

    f = features.astype(np.float64)
    means = np.stack([f[labels == c].mean(0) if (labels == c).any() else f.mean(0) for c in range(classes)])
    centred = f - means[labels]
    cov = LedoitWolf(assume_centered=True).fit(centred).covariance_
    cov += np.eye(len(cov)) * 1e-6 * np.trace(cov) / len(cov)  # keeps a degenerate channel invertible
    return means, np.linalg.inv(cov)


def fit_reference(features: np.ndarray, labels: np.ndarray, train_index: np.ndarray, val_mask: np.ndarray,
                  classes: int, batchnorm: dict[str, BatchNormReference] | None = None,
                  quantile: float = OOD_QUANTILE) -> FeatureReference:
    """Fit each member on the images it trained on; threshold = `quantile` of the honest pool scores.

    features (N, K, D) of the pool, labels (N,), train_index (K, n) (bootstrap: with repeats), val_mask (K, N)."""
    members = features.shape[1]
    fits = [fit_gaussians(features[np.unique(train_index[k]), k], labels[np.unique(train_index[k])], classes)
            for k in range(members)]
    means, precision = np.stack([m for m, _ in fits]), np.stack([p for _, p in fits])
    honest = val_mask.T  # (N, K): member k never trained on image i
    scored = honest.any(1)
    provisional = FeatureReference(means, precision, np.zeros(0), np.zeros(classes), 0.0)
    null = provisional.score(features[scored], honest[scored])
    prior = np.bincount(labels, minlength=classes) / max(len(labels), 1)
    return FeatureReference(means, precision, null, prior, float(np.quantile(null, quantile)), batchnorm or {})


def batchnorm_reference(model: nn.Module, captured: Captured, labels: np.ndarray,
                        classes: int) -> dict[str, BatchNormReference]:
    """Class-wise input moments of every BN layer (from `capture(..., batchnorm=True)`) and its running stats."""
    out = {}
    for name, bn in batchnorm_layers(model).items():
        means, squares = torch.cat(captured.bn_means[name]).numpy(), torch.cat(captured.bn_squares[name]).numpy()

        def per_class(v: np.ndarray) -> np.ndarray:
            return np.stack([v[labels == c].mean(0) if (labels == c).any() else v.mean(0) for c in range(classes)])

        out[name] = BatchNormReference(per_class(means), per_class(squares),
                                       bn.running_mean.detach().cpu().double().numpy(),  # type: ignore[union-attr]
                                       bn.running_var.detach().cpu().double().numpy())  # type: ignore[union-attr]
    return out


def reference_from_pool(predictor: Any, images: np.ndarray, labels: np.ndarray, train_index: np.ndarray,
                        val_mask: np.ndarray) -> tuple[np.ndarray, FeatureReference]:
    """One pass over the preprocessed training pool: (member logits (N, K, C), the bundle's FeatureReference)."""
    model, classes = predictor.bundle.model, len(predictor.classes)
    with capture(model, batchnorm=True) as got:
        logits = predictor.member_logits(images)
    features = got.feature_array(predictor.bundle.members)
    batchnorm = batchnorm_reference(model, got, labels, classes)
    return logits, fit_reference(features, labels, train_index, val_mask, classes, batchnorm)


def reference_meta(reference: FeatureReference, quantile: float = OOD_QUANTILE) -> dict[str, Any]:
    """What meta.json says about the reference (the scores themselves are in features.safetensors)."""
    return {"threshold": reference.threshold, "quantile": quantile, "score": "mahalanobis-min-class-mean-members",
            "reference_images": len(reference.null_scores), "file": FEATURES_FILE}
