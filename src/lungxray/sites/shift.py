"""Is this folder from another site? A two-sample test of its feature-space scores against the training images'.

Why: one image far from the training data is referred (`lungxray.sites.ood`), but a whole folder that is shifted is a
different message: the model's figures do not transfer to this site, and `lungxray adapt` may help. The statistic
is the folder's mean out-of-distribution score, compared with the mean of equally many *honest* training scores
(out-of-bag or holdout images: scored only by members that never trained on them) drawn at random with
replacement. The p-value is the fraction of those resamples at least as far from the training data as the folder,
so it is calibrated by resampling training images, as the number of images asks. A random sample of the training
images scores at or below the honest reference (members that trained on an image place it closer), so it is
never called shifted; the same site's unseen films score like the honest reference and are not either.
The mean score is a sum over classes, so a folder of one class is not called shifted for its class mix alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

ALPHA = 0.01
RESAMPLES = 5000
MIN_IMAGES = 5


@dataclass(frozen=True)
class ShiftResult:
    images: int
    score: float  # mean ood score of the folder
    reference_score: float  # mean honest ood score of the training images
    ratio: float  # score / reference_score: 1 is like the training images
    p_value: float | None  # None below MIN_IMAGES
    shifted: bool
    over_threshold: float  # fraction of the folder's images above the bundle's ood threshold
    expected_over: float  # the same fraction among honest training scores
    alpha: float = ALPHA

    @property
    def verdict(self) -> str:
        if self.p_value is None:
            return f"too few images for a site verdict ({self.images}; at least {MIN_IMAGES})"
        if self.shifted:
            return (f"shifted: these {self.images} images are unlike the training images (mean ood score "
                    f"{self.score:.2f} vs {self.reference_score:.2f}, p = {_p(self.p_value)}; {self.over_threshold:.0%}"
                    f" above the referral threshold, {self.expected_over:.0%} expected); the model's figures do not "
                    f"carry over: consider `lungxray adapt`")
        return (f"not shifted: these {self.images} images look like the training images (mean ood score "
                f"{self.score:.2f} vs {self.reference_score:.2f}, p = {_p(self.p_value)})")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def shift_test(null_scores: np.ndarray, scores: np.ndarray, threshold: float, alpha: float = ALPHA,
               resamples: int = RESAMPLES, seed: int = 0) -> ShiftResult:
    """Folder `scores` (N,) against the honest training `null_scores` (M,); see the module docstring."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    n, ref = len(scores), float(null_scores.mean())
    obs = float(scores.mean()) if n else float("nan")
    p = None
    if n >= MIN_IMAGES:
        rng = np.random.default_rng(seed)
        hits = 0
        for start in range(0, resamples, 500):  # chunks keep a 1,500-image folder's resamples small in memory
            draws = rng.choice(null_scores, size=(min(500, resamples - start), n), replace=True).mean(1)
            hits += int((draws >= obs).sum())
        p = (1 + hits) / (resamples + 1)
    return ShiftResult(images=n, score=obs, reference_score=ref, ratio=obs / ref if ref > 0 else float("nan"),
                       p_value=p, shifted=p is not None and p < alpha,
                       over_threshold=float((scores > threshold).mean()) if n else 0.0,
                       expected_over=float((null_scores > threshold).mean()), alpha=alpha)


def folder_shift(predictor: Any, ood_scores: np.ndarray, alpha: float = ALPHA) -> ShiftResult | None:
    """The site verdict for scores a predictor computed (None when the bundle has no feature reference)."""
    ref = predictor.reference
    if ref is None:
        return None
    return shift_test(ref.null_scores, ood_scores, ref.threshold, alpha)
