"""Calibration of the ensemble from out-of-fold (OOF) predictions only: temperature and threshold.

    T, threshold = calibrate_oof(y_oof, p_oof)          # never pass test labels here
    p = apply_temperature(mean_of_fold_probs, T)        # predicted ALL when p >= threshold

Temperature scaling divides the logit of P(ALL) by T (T > 1 softens, T < 1 sharpens); it is
monotone and keeps 0.5 at 0.5. The threshold maximises the weighted F1 (the C-NMC score) of the
calibrated OOF probabilities.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from leuk_ray.metrics import f1_from_counts

EPS = 1e-7
T_MIN, T_MAX = 0.05, 20.0
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _clean(y_true: Sequence[int] | np.ndarray, prob_all: Sequence[float] | np.ndarray,
           what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(prob_all, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{what}: {y.size} labels but {p.size} probabilities")
    keep = y >= 0
    y, p = y[keep], p[keep]
    if y.size == 0:
        raise ValueError(f"{what}: no labelled rows")
    if not np.isfinite(p).all():
        raise ValueError(f"{what}: probabilities contain NaN or infinite values")
    return y, p


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(prob_all: Sequence[float] | np.ndarray, T: float) -> np.ndarray:
    """sigmoid(logit(p) / T), with p clipped away from 0 and 1; T = 1 returns p unchanged."""
    p = np.asarray(prob_all, dtype=np.float64)
    if T == 1.0:
        return p.copy()
    if not (math.isfinite(T) and T > 0):
        raise ValueError(f"temperature must be a positive finite number, got {T!r}")
    z = _logit(p) / T
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free sigmoid


def _nll(z: np.ndarray, y: np.ndarray, T: float) -> float:
    s = z / T
    # -log sigmoid(s) for y=1, -log(1 - sigmoid(s)) = -log sigmoid(-s) for y=0
    signed = np.where(y == 1, s, -s)
    return float(np.mean(np.logaddexp(0.0, -signed)))


def fit_temperature(y_true: Sequence[int] | np.ndarray, prob_all: Sequence[float] | np.ndarray,
                    *, t_min: float = T_MIN, t_max: float = T_MAX, tol: float = 1e-5) -> float:
    """Temperature minimising the NLL of sigmoid(logit(p) / T) on labelled rows (label -1 ignored).

    Golden-section search on log T over [t_min, t_max] (the NLL is unimodal in log T). Returns 1.0
    when only one class is present (the NLL would push T to a bound without meaning anything).
    """
    y, p = _clean(y_true, prob_all, "fit_temperature")
    if np.unique(y).size < 2:
        return 1.0
    z = _logit(p)
    a, b = math.log(t_min), math.log(t_max)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = _nll(z, y, math.exp(c)), _nll(z, y, math.exp(d))
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = _nll(z, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = _nll(z, y, math.exp(d))
    return float(math.exp((a + b) / 2.0))


def weighted_f1_at(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Weighted F1 (predicted ALL when p >= t) for every threshold t at once.

    The same quantity as ``leuk_ray.metrics.classification_metrics(...)["f1"]`` (scikit-learn's
    ``f1_score(average="weighted", zero_division=0)``), vectorised over thresholds so that a sweep
    over tens of thousands of candidates stays fast; the tests check the two agree.
    """
    order = np.sort(p)
    pos_sorted = np.sort(p[y == 1])
    n, n_pos = y.size, int((y == 1).sum())
    n_neg = n - n_pos
    # predicted ALL = p >= t: count = n - #(p < t)
    pred_pos = n - np.searchsorted(order, thresholds, side="left")
    tp = n_pos - np.searchsorted(pos_sorted, thresholds, side="left")
    tn = n_neg - (pred_pos - tp)
    return (n_pos * f1_from_counts(tp, pred_pos, n_pos)
            + n_neg * f1_from_counts(tn, n - pred_pos, n_neg)) / n


def choose_threshold(y_true: Sequence[int] | np.ndarray,
                     prob_all: Sequence[float] | np.ndarray) -> float:
    """Threshold maximising the weighted F1 of ``prob_all`` (OOF data only; label -1 ignored).

    Candidates: 0.5 and the midpoints between consecutive distinct probabilities. Ties go to the
    candidate closest to 0.5.
    """
    y, p = _clean(y_true, prob_all, "choose_threshold")
    u = np.unique(p)
    candidates = np.concatenate([[0.5], (u[:-1] + u[1:]) / 2.0])
    scores = weighted_f1_at(y, p, candidates)
    best = scores.max()
    tied = candidates[scores >= best - 1e-12]
    return float(tied[np.argmin(np.abs(tied - 0.5))])


def calibrate_oof(y_oof: Sequence[int] | np.ndarray, p_oof: Sequence[float] | np.ndarray, *,
                  fit: bool = True) -> tuple[float, float]:
    """(temperature, threshold) from out-of-fold data: T (1.0 when ``fit`` is False), then the
    threshold chosen on the temperature-scaled OOF probabilities (the scale the artifact predicts
    in).
    """
    T = fit_temperature(y_oof, p_oof) if fit else 1.0
    return T, choose_threshold(y_oof, apply_temperature(p_oof, T))
