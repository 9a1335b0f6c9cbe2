"""The ensemble arithmetic, once: members' probabilities averaged (soft voting), calibrated, and their spread.

Training (out-of-bag validation, the referral threshold), prediction and the benchmarks all combine members here,
so a validation score and a served prediction are the same function of the members' logits.
"""

from __future__ import annotations

import math

import numpy as np

from lungxray.evaluation.metrics import softmax

__all__ = ["average_members", "combine_probs", "normalised_entropy", "out_of_bag_probs", "predictive_uncertainty"]


def average_members(member_probs: np.ndarray) -> np.ndarray:
    """Soft voting: the mean of member probabilities. (N, K, C) -> (N, C)."""
    return member_probs.mean(axis=1)


def combine_probs(member_logits: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, C) logits -> (calibrated probs (N, C), member probs (N, K, C)): the temperature is applied to the
    log of the members' mean probability, the route it was fitted on."""
    member_probs = softmax(member_logits)
    mean = average_members(member_probs)
    return softmax(np.log(np.clip(mean, 1e-12, None)), temperature), member_probs


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy over the last axis divided by log C (0: certain, 1: uniform); 0 log 0 counts as 0."""
    p = np.asarray(probs, dtype=np.float64)
    scale = math.log(p.shape[-1]) if p.shape[-1] > 1 else 1.0
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1) / scale


def predictive_uncertainty(member_probs: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image ensemble uncertainty from member probabilities (N, K, C); entropies normalised by log C.

    mutual_information = entropy of the mean - mean member entropy: the part that comes from members
    disagreeing (epistemic), which is what should trigger referral on unfamiliar images.
    """
    mp = np.asarray(member_probs, dtype=np.float64)
    if mp.ndim != 3:
        raise ValueError(f"member_probs must be (N, K, C), got {mp.shape}")
    mean = average_members(mp)
    entropy = normalised_entropy(mean)
    expected = normalised_entropy(mp).mean(axis=1)
    label = mean.argmax(1)
    return {
        "mean_probs": mean,
        "label": label,
        "entropy": entropy,
        "expected_entropy": expected,
        "mutual_information": np.clip(entropy - expected, 0.0, None),
        "vote_share": (mp.argmax(2) == label[:, None]).mean(axis=1),
    }


def out_of_bag_probs(member_probs: np.ndarray, val_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pool image scored only by the members that did not train on it.

    member_probs (N, K, C) for the whole pool, val_mask (K, N). Returns (probs (M, C), index (M,)) for the M
    images that at least one member held out.
    """
    weights = val_mask.T.astype(member_probs.dtype)  # (N, K)
    counts = weights.sum(axis=1)
    index = np.flatnonzero(counts > 0)
    probs = (member_probs[index] * weights[index, :, None]).sum(axis=1) / counts[index, None]
    return probs, index
