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

import numpy as np

ECE_BINS = 10


def classification_metrics(y_true: Sequence[int] | np.ndarray,
                           prob_all: Sequence[float] | np.ndarray, threshold: float = 0.5,
                           subjects: Sequence[str] | None = None) -> dict:
    """Metrics of P(ALL) against labels, as plain Python values (JSON-ready).

    Keys: f1 (weighted over both classes, the C-NMC score), accuracy, auc (None when only one class
    is present), precision_all, recall_all, f1_all, precision_hem, recall_hem, f1_hem,
    sensitivity (= recall_all), specificity (= recall_hem), ece (10 equal-width bins over the
    confidence of the predicted class), n (labelled rows), per_subject_accuracy ({subject: accuracy}
    over known subjects when ``subjects`` is given, else {}).
    """
    y = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(prob_all, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"classification_metrics: {y.size} labels but {p.size} probabilities")
    if subjects is not None and len(subjects) != y.size:
        raise ValueError(f"classification_metrics: {y.size} labels but {len(subjects)} subjects")
    keep = y >= 0
    y, p = y[keep], p[keep]
    if y.size == 0:
        raise ValueError("classification_metrics: no labelled rows")
    if not np.isfinite(p).all():
        raise ValueError("classification_metrics: prob_all contains NaN or infinite values")
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
        "ece": expected_calibration_error(y, p, pred),
        "n": int(y.size),
        "per_subject_accuracy": {},
    }
    if subjects is not None:
        s = np.asarray([str(x) for x in subjects], dtype=object)[keep]
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


def expected_calibration_error(y: np.ndarray, p: np.ndarray, pred: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """ECE over the confidence of the predicted class: sum_b |B|/n * |accuracy_b - confidence_b|."""
    conf = np.where(pred == 1, p, 1.0 - p)
    correct = (pred == y).astype(np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)  # bins (k/b, (k+1)/b]
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)
