"""The one place where classification metrics are computed (scikit-learn).

Labels: 1 = ALL (positive), 0 = HEM; rows labelled -1 (unknown) are ignored. ``prob_all`` is P(ALL);
the predicted class is ALL when prob_all >= threshold.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (accuracy_score, f1_score, precision_recall_fscore_support,
                             roc_auc_score)

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

    prec, rec, f1s, _ = precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    auc = float(roc_auc_score(y, p)) if np.unique(y).size == 2 else None
    if auc is not None and math.isnan(auc):
        auc = None
    out = {
        "f1": float(f1_score(y, pred, labels=[0, 1], average="weighted", zero_division=0)),
        "accuracy": float(accuracy_score(y, pred)),
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
