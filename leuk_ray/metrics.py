"""The one place where classification metrics are computed.

Labels: 1 = ALL (positive), 0 = HEM; rows labelled -1 (unknown) are ignored. ``prob_all`` is P(ALL);
the predicted class is ALL when prob_all >= threshold.

Written in numpy with scikit-learn's definitions (``f1_score(average="weighted",
zero_division=0)``, ``precision_recall_fscore_support``, ``roc_auc_score``; tests/test_metrics.py
checks them against scikit-learn): every fold worker computes these each epoch, and importing
``sklearn.metrics`` (which pulls scipy) cost each worker ~0.8 s of CPU before its first step.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ECE_BINS = 10


def labelled(what: str, y_true: Sequence[int] | np.ndarray, prob_all: Sequence[float] | np.ndarray,
             *aligned: Sequence[Any]) -> tuple[np.ndarray, ...]:
    """``(y, p, *aligned)`` as flat arrays with the unlabelled rows (label < 0, e.g. an unlabelled
    test folder) dropped: int labels, float probabilities, the ``aligned`` sequences (subjects,
    fold numbers) as object arrays. A ``ValueError`` naming ``what`` when the lengths differ, no
    row is labelled, or a probability is NaN or infinite."""
    y = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(prob_all, dtype=np.float64).ravel()
    extra = [np.asarray(list(a), dtype=object).ravel() for a in aligned]
    if any(len(a) != y.size for a in [p, *extra]):
        raise ValueError(f"{what}: {y.size} labels but " + ", ".join(
            [f"{p.size} probabilities"] + [f"{len(a)} aligned values" for a in extra]))
    keep = y >= 0
    if not keep.any():
        raise ValueError(f"{what}: no labelled rows")
    y, p = y[keep], p[keep]
    if not np.isfinite(p).all():
        raise ValueError(f"{what}: probabilities contain NaN or infinite values")
    return (y, p, *(a[keep] for a in extra))


def classification_metrics(y_true: Sequence[int] | np.ndarray,
                           prob_all: Sequence[float] | np.ndarray, threshold: float = 0.5,
                           subjects: Sequence[str] | None = None) -> dict:
    """Metrics of P(ALL) against labels, as plain Python values (JSON-ready).

    Keys: f1 (weighted over both classes, the C-NMC score), accuracy, auc (None when only one class
    is present), precision_all, recall_all, f1_all, precision_hem, recall_hem, f1_hem,
    sensitivity (= recall_all), specificity (= recall_hem), ece (``expected_calibration_error``:
    10 equal-width bins of P(ALL), the bins of the report's reliability diagram), n (labelled
    rows), per_subject_accuracy ({subject: accuracy} over known subjects when ``subjects`` is
    given, else {}).
    """
    if subjects is None:
        y, p = labelled("classification_metrics", y_true, prob_all)
    else:
        y, p, s = labelled("classification_metrics", y_true, prob_all,
                           [str(x) for x in subjects])
    pred = (p >= threshold).astype(np.int64)

    prec, rec, f1s, support = precision_recall_f1(y, pred)
    auc = roc_auc(y, p)
    out = {
        "f1": float((f1s * support).sum() / support.sum()),
        "accuracy": float((pred == y).mean()),
        "auc": auc,
        "precision_all": float(prec[1]), "recall_all": float(rec[1]), "f1_all": float(f1s[1]),
        "precision_hem": float(prec[0]), "recall_hem": float(rec[0]), "f1_hem": float(f1s[0]),
        "sensitivity": float(rec[1]), "specificity": float(rec[0]),
        "ece": expected_calibration_error(y, p),
        "n": int(y.size),
        "per_subject_accuracy": {},
    }
    if subjects is not None:
        correct = pred == y
        out["per_subject_accuracy"] = {
            str(subj): float(correct[s == subj].mean()) for subj in sorted(set(s)) if subj != ""}
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.maximum(den, 1), 0.0)


def f1_from_counts(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> np.ndarray:
    """F1 of a class from its true positives, predicted count and support (elementwise).

    F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (predicted + support): 0 when tp is 0, as scikit-learn's
    zero_division=0 gives, without going through an undefined precision or recall.
    """
    return _ratio(2 * tp, predicted + support)


def precision_recall_f1(y: np.ndarray, pred: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per class (index 0 = HEM, 1 = ALL): precision, recall, F1 and support; 0 where undefined."""
    tp = np.array([((pred == c) & (y == c)).sum() for c in (0, 1)], dtype=np.float64)
    predicted = np.array([(pred == c).sum() for c in (0, 1)], dtype=np.float64)
    support = np.array([(y == c).sum() for c in (0, 1)], dtype=np.float64)
    return (_ratio(tp, predicted), _ratio(tp, support), f1_from_counts(tp, predicted, support),
            support)


def roc_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count one half); None unless both classes are present.

    The Mann-Whitney form: (sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg),
    with tied scores given their average rank, which equals the trapezoidal area of the ROC curve.
    """
    n_pos = int((y == 1).sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(p, kind="mergesort")
    sp = p[order]
    new = np.r_[True, sp[1:] != sp[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], sp.size]
    ranks = np.empty(sp.size, dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(new) - 1]  # average 1-based rank per tie
    auc = (ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return None if math.isnan(auc) else float(auc)


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width bins of P(ALL): bin b holds b/B <= p < (b+1)/B (the last one also p = 1)."""

    edges: np.ndarray          # (B + 1,) 0, 1/B, ..., 1
    count: np.ndarray          # (B,) rows per bin
    mean_prob: np.ndarray      # (B,) mean P(ALL) per bin (NaN where empty)
    frac_all: np.ndarray       # (B,) observed fraction of ALL per bin (NaN where empty)


def reliability_bins(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray,
                     bins: int = ECE_BINS) -> ReliabilityBins:
    """The one binning behind the ECE and the reliability diagram (labelled rows: y in {0, 1})."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    idx = np.clip(np.floor(p * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(idx, weights=p, minlength=bins) / count
        frac_all = np.bincount(idx, weights=y, minlength=bins) / count
    return ReliabilityBins(np.linspace(0.0, 1.0, bins + 1), count, mean_prob, frac_all)


def expected_calibration_error(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """ECE of P(ALL): sum_b |B_b|/n * |fraction ALL in b - mean P(ALL) in b| (``reliability_bins``).

    Independent of the decision threshold (the older confidence-of-the-predicted-class form binned
    by the threshold's decision and drew a different picture from the reliability diagram).
    """
    r = reliability_bins(y, p, bins)
    n = r.count.sum()
    if n == 0:
        return float("nan")
    m = r.count > 0
    return float((r.count[m] / n * np.abs(r.frac_all[m] - r.mean_prob[m])).sum())


# ------------------------------------------------------------------------------------ bootstrap
CI_METRICS = ("f1", "accuracy", "auc", "sensitivity", "specificity")


def _point_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float | None]:
    pred = (p >= threshold).astype(np.int64)
    _, rec, f1s, support = precision_recall_f1(y, pred)
    return {"f1": float((f1s * support).sum() / support.sum()),
            "accuracy": float((pred == y).mean()), "auc": roc_auc(y, p),
            "sensitivity": float(rec[1]), "specificity": float(rec[0])}


def bootstrap_ci(y_true: Sequence[int] | np.ndarray, prob_all: Sequence[float] | np.ndarray,
                 threshold: float, subjects: Sequence[str], *, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> dict:
    """Percentile confidence intervals of weighted F1, accuracy, AUC, sensitivity, specificity,
    bootstrapping over subjects (images of one subject are not independent).

    Each of ``n_boot`` resamples draws as many subjects as there are, with replacement, and takes
    all their images; a row without a subject ("") counts as its own subject. A metric undefined
    in a resample (AUC or sensitivity without an ALL image, ...) is left out of that metric's
    interval; ``n_valid`` says how many resamples each interval uses. Returns {"n_images",
    "n_subjects", "n_boot", "level", "seed", metric: {"low", "high", "n_valid"}}.
    """
    y, p, s = labelled("bootstrap_ci", y_true, prob_all, [str(x) for x in subjects])
    alone = np.array([f"(no subject) row {i}" for i in range(s.size)], dtype=object)
    s = np.where(s == "", alone, s)
    names, group = np.unique(s.astype(str), return_inverse=True)
    members = [np.flatnonzero(group == g) for g in range(names.size)]
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {m: [] for m in CI_METRICS}
    for _ in range(n_boot):
        rows = np.concatenate([members[g] for g in rng.integers(0, names.size, names.size)])
        yb, pb = y[rows], p[rows]
        m = _point_metrics(yb, pb, threshold)
        has = {0: bool((yb == 0).any()), 1: bool((yb == 1).any())}
        defined = {"f1": True, "accuracy": True, "auc": m["auc"] is not None,
                   "sensitivity": has[1], "specificity": has[0]}
        for k in CI_METRICS:
            if defined[k]:
                values[k].append(float(m[k]))
    a = (1.0 - level) / 2.0
    out: dict = {"n_images": int(y.size), "n_subjects": int(names.size), "n_boot": int(n_boot),
                 "level": float(level), "seed": int(seed)}
    for k in CI_METRICS:
        v = np.asarray(values[k])
        out[k] = {"low": float(np.quantile(v, a)) if v.size else None,
                  "high": float(np.quantile(v, 1.0 - a)) if v.size else None,
                  "n_valid": int(v.size)}
    return out
