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


# ------------------------------------------------------------ bootstrap over subjects (issue 13)
def test_bootstrap_ci_resamples_subjects_and_matches_a_direct_computation() -> None:
    from leuk_ray.metrics import bootstrap_ci

    rng = np.random.default_rng(5)
    subjects = np.array([f"s{i}" for i in rng.integers(0, 12, 240)])
    y = rng.integers(0, 2, 240)
    p = np.clip(0.35 * y + 0.65 * rng.random(240), 0, 1)
    ci = bootstrap_ci(y, p, 0.5, subjects, n_boot=60, seed=7)
    assert (ci["n_images"], ci["n_subjects"], ci["n_boot"], ci["level"]) == (240, 12, 60, 0.95)
    assert bootstrap_ci(y, p, 0.5, subjects, n_boot=60, seed=7) == ci   # seeded

    names = np.unique(subjects)
    draw = np.random.default_rng(7)
    ref: dict[str, list[float]] = {k: [] for k in ("f1", "accuracy", "auc")}
    for _ in range(60):
        rows = np.concatenate([np.flatnonzero(subjects == names[g])
                               for g in draw.integers(0, names.size, names.size)])
        pred = (p[rows] >= 0.5).astype(int)
        ref["f1"].append(f1_score(y[rows], pred, labels=[0, 1], average="weighted",
                                  zero_division=0))
        ref["accuracy"].append(accuracy_score(y[rows], pred))
        ref["auc"].append(roc_auc_score(y[rows], p[rows]))
    for k, v in ref.items():
        assert ci[k]["low"] == pytest.approx(np.quantile(v, 0.025), abs=1e-12), k
        assert ci[k]["high"] == pytest.approx(np.quantile(v, 0.975), abs=1e-12), k
        assert ci[k]["n_valid"] == 60


def test_bootstrap_ci_of_one_subject_has_no_width() -> None:
    """All images of a drawn subject come together: one subject gives one resample."""
    from leuk_ray.metrics import bootstrap_ci

    y = np.array([0, 1, 1, 0, 1, 0])
    p = np.array([0.2, 0.9, 0.4, 0.6, 0.7, 0.1])
    ci = bootstrap_ci(y, p, 0.5, ["a"] * 6, n_boot=50)
    m = classification_metrics(y, p, 0.5)
    for k in ("f1", "accuracy", "auc", "sensitivity", "specificity"):
        assert ci[k]["low"] == pytest.approx(m[k]) and ci[k]["high"] == pytest.approx(m[k])
    only_all = bootstrap_ci([1, 1], [0.7, 0.2], 0.5, ["a", "b"], n_boot=20)
    assert only_all["specificity"] == {"low": None, "high": None, "n_valid": 0}
    assert only_all["auc"]["n_valid"] == 0 and only_all["sensitivity"]["n_valid"] == 20


def test_labelled_rows_are_checked_and_kept_aligned():
    """One helper drops unlabelled rows for metrics, calibration, the bootstrap and the report."""
    from leuk_ray.metrics import labelled

    y, p, s = labelled("x", [1, -1, 0], [0.9, 0.5, 0.2], ["a", "b", "c"])
    assert y.tolist() == [1, 0] and p.tolist() == [0.9, 0.2] and s.tolist() == ["a", "c"]
    with pytest.raises(ValueError, match="x: 2 labels but 3 probabilities"):
        labelled("x", [1, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="x: no labelled rows"):
        labelled("x", [-1], [0.5])
    with pytest.raises(ValueError, match="x: probabilities contain NaN"):
        labelled("x", [1, 0], [0.5, float("nan")])
