"""Calibration of the ensemble from out-of-fold (OOF) predictions only: what predict applies.

What predict deploys, and so what is fitted here (``Calibration``)::

    fold i's P(ALL) p_i (plain, or the mean over the 8 TTA views)
      -> q_i = sigmoid(logit(p_i) / T_i)          a temperature per fold
      -> q   = mean_i q_i                         the ensemble probability
      -> ALL when q >= threshold

    cal = fit_calibration(y_oof, p_oof, fold_oof, k)   # never pass test labels here
    q = cal.combine(per_fold)                          # (k, N) fold P(ALL) -> (N,)

``combine`` is the one function that turns fold probabilities into the ensemble's probability:
final's test evaluation and ``Ensemble.predict`` (predict) both call it, with what was fitted.

Why a temperature per fold: the k fold models differ in confidence (different data, epochs, early
stop). One temperature fitted on the pooled OOF rows (each row scored by one model) is a compromise
between them, and applying it to the logit of the *mean* of the raw fold probabilities applies it
to a third distribution that was never fitted. Fold i's temperature is fitted on exactly the rows
fold i validated on, and applied to fold i's outputs only.

Why the threshold transfers: OOF gives one model per row (every other fold model trained on that
row), so the ensemble has no OOF rows of its own. After per-fold scaling every q_i estimates the
same quantity, P(ALL | image), on images its model did not see, whichever fold produced it; the
pooled calibrated OOF values q_fold(row)(row) are therefore samples of the quantity predict
thresholds (a mean of such estimates), and the threshold maximising their weighted F1 is chosen
on them. The remaining difference: a mean of k estimates that disagree is pulled towards 0.5 a
little (the ensemble is slightly less confident than its members); with a threshold near 0.5
this barely moves decisions, and it is the closest match available without held-out ensemble
rows. TTA changes each fold's outputs, so a TTA artifact carries a second ``Calibration`` fitted
the same way on TTA OOF probabilities; predict --tta uses that one.

Temperature scaling divides the logit of P(ALL) by T (T > 1 softens, T < 1 sharpens); it is
monotone and keeps 0.5 at 0.5. For the two-logit head, logit(P(ALL)) = z_all - z_hem, so scaling
the logit of the probability is scaling the model's logits.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from leuk_ray.metrics import f1_from_counts, labelled

EPS = 1e-7
T_MIN, T_MAX = 0.05, 20.0
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


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
    y, p = labelled("fit_temperature", y_true, prob_all)
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
    y, p = labelled("choose_threshold", y_true, prob_all)
    u = np.unique(p)
    candidates = np.concatenate([[0.5], (u[:-1] + u[1:]) / 2.0])
    scores = weighted_f1_at(y, p, candidates)
    best = scores.max()
    tied = candidates[scores >= best - 1e-12]
    return float(tied[np.argmin(np.abs(tied - 0.5))])


@dataclass(frozen=True)
class Calibration:
    """A temperature per fold and one decision threshold on the combined probability."""

    temperatures: tuple[float, ...]
    threshold: float

    def __post_init__(self) -> None:
        if not self.temperatures:
            raise ValueError("Calibration: no fold temperatures")
        for T in self.temperatures:
            if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
                raise ValueError(f"Calibration: temperature {T!r} is not a positive number")
        if not (isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0):
            raise ValueError(f"Calibration: threshold {self.threshold!r} is not in [0, 1]")

    @classmethod
    def uniform(cls, k: int, temperature: float = 1.0, threshold: float = 0.5) -> Calibration:
        """The same temperature for each of ``k`` folds."""
        return cls(tuple([float(temperature)] * k), float(threshold))

    @property
    def k(self) -> int:
        return len(self.temperatures)

    def calibrated_folds(self, per_fold: np.ndarray) -> np.ndarray:
        """(k, N) fold P(ALL) -> (k, N) fold P(ALL), each scaled by its fold's temperature."""
        pf = np.asarray(per_fold, dtype=np.float64)
        if pf.ndim != 2 or pf.shape[0] != self.k:
            raise ValueError(f"Calibration of {self.k} folds got fold probabilities of shape "
                             f"{pf.shape}")
        return np.stack([apply_temperature(pf[i], T) for i, T in enumerate(self.temperatures)])

    def combine(self, per_fold: np.ndarray) -> np.ndarray:
        """The ensemble's P(ALL): the mean over folds of the temperature-scaled fold P(ALL)."""
        return self.calibrated_folds(per_fold).mean(axis=0)

    def calibrated_oof(self, p_oof: Sequence[float] | np.ndarray,
                       fold_oof: Sequence[int] | np.ndarray) -> np.ndarray:
        """Each OOF row's P(ALL) scaled by the temperature of the fold that scored it."""
        p = np.asarray(p_oof, dtype=np.float64).ravel()
        f = np.asarray(fold_oof, dtype=np.int64).ravel()
        if p.shape != f.shape:
            raise ValueError(f"calibrated_oof: {p.size} probabilities but {f.size} fold numbers")
        if f.size and (f.min() < 0 or f.max() >= self.k):
            raise ValueError(f"calibrated_oof: fold numbers outside 0..{self.k - 1}")
        out = np.empty_like(p)
        for i, T in enumerate(self.temperatures):
            m = f == i
            out[m] = apply_temperature(p[m], T)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"temperatures": [float(T) for T in self.temperatures],
                "threshold": float(self.threshold)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        """Inverse of ``to_dict``; ValueError when a value is missing or out of range."""
        if not isinstance(d, Mapping) or not isinstance(d.get("temperatures"), list):
            raise ValueError("calibration: expected {temperatures: [...], threshold: ...}")
        return cls(tuple(float(T) for T in d["temperatures"]), float(d["threshold"]))


def fit_calibration(y_oof: Sequence[int] | np.ndarray, p_oof: Sequence[float] | np.ndarray,
                    fold_oof: Sequence[int] | np.ndarray, k: int, *,
                    fit: bool = True) -> Calibration:
    """Fit what ``Calibration.combine`` applies, from out-of-fold rows only.

    ``fold_oof[j]`` is the fold whose model scored row j (the fold it validated in). Fold i's
    temperature is fitted on fold i's rows (1.0 when ``fit`` is False, or when those rows hold one
    class); the threshold maximises the weighted F1 of the calibrated OOF probabilities (see the
    module docstring for why that is the quantity predict thresholds).
    """
    y = np.asarray(y_oof, dtype=np.int64).ravel()
    p = np.asarray(p_oof, dtype=np.float64).ravel()
    f = np.asarray(fold_oof, dtype=np.int64).ravel()
    if not (y.shape == p.shape == f.shape):
        raise ValueError(f"fit_calibration: {y.size} labels, {p.size} probabilities, "
                         f"{f.size} fold numbers")
    temps = []
    for i in range(k):
        m = f == i
        if not m.any():
            raise ValueError(f"fit_calibration: fold {i} has no out-of-fold rows")
        temps.append(fit_temperature(y[m], p[m]) if fit else 1.0)
    cal = Calibration(tuple(temps), 0.5)
    return Calibration(cal.temperatures, choose_threshold(y, cal.calibrated_oof(p, f)))
