"""leuk_ray.metrics is numpy written to scikit-learn's definitions: check them against scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, f1_score, precision_recall_fscore_support,
                             roc_auc_score)

from leuk_ray.metrics import classification_metrics


def _cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(40):
        n = int(rng.integers(2, 300))
        y = rng.integers(0, 2, n)
        if i % 4 == 0:  # coarse scores: many ties, some across the classes
            p = rng.integers(0, 5, n) / 4.0
        elif i % 4 == 1:  # informative scores
            p = np.clip(0.5 * y + rng.normal(0.25, 0.2, n), 0.0, 1.0)
        else:
            p = rng.random(n)
        cases.append((f"random{i}", y, p))
    cases += [
        ("all predicted ALL", np.array([0, 1, 1, 0]), np.array([0.9, 0.8, 0.7, 0.6])),
        ("none predicted ALL", np.array([0, 1, 1, 0]), np.array([0.1, 0.2, 0.3, 0.4])),
        ("only ALL labelled", np.array([1, 1, 1]), np.array([0.2, 0.7, 0.9])),
        ("only HEM labelled", np.array([0, 0]), np.array([0.2, 0.7])),
        ("one score for all", np.array([0, 1, 0, 1, 1]), np.full(5, 0.5)),
        ("perfect", np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])),
        ("inverted", np.array([0, 0, 1, 1]), np.array([0.9, 0.8, 0.2, 0.1])),
    ]
    return cases


@pytest.mark.parametrize("name,y,p", _cases(), ids=[c[0] for c in _cases()])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_metrics_match_scikit_learn(name: str, y: np.ndarray, p: np.ndarray, threshold: float) -> None:
    m = classification_metrics(y, p, threshold=threshold)
    pred = (p >= threshold).astype(int)
    prec, rec, f1s, _ = precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    assert m["f1"] == pytest.approx(
        f1_score(y, pred, labels=[0, 1], average="weighted", zero_division=0), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert [m["precision_hem"], m["precision_all"]] == pytest.approx(list(prec), abs=1e-12)
    assert [m["recall_hem"], m["recall_all"]] == pytest.approx(list(rec), abs=1e-12)
    assert [m["f1_hem"], m["f1_all"]] == pytest.approx(list(f1s), abs=1e-12)
    if np.unique(y).size == 2:
        assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    else:
        assert m["auc"] is None


def test_unknown_labels_are_left_out() -> None:
    y = np.array([1, -1, 0, 1, -1, 0])
    p = np.array([0.9, 0.1, 0.2, 0.4, 0.8, 0.7])
    keep = y >= 0
    assert classification_metrics(y, p) == classification_metrics(y[keep], p[keep])
