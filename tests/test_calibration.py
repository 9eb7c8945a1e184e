"""Calibration from out-of-fold data only: a temperature per fold, one threshold, one combine."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from leuk_ray.calibration import (Calibration, apply_temperature, choose_threshold,
                                  fit_calibration, fit_temperature, weighted_f1_at)
from leuk_ray.metrics import classification_metrics, expected_calibration_error


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _cells(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """True logits z and labels drawn from sigmoid(z)."""
    z = rng.normal(0.3, 2.0, n)
    return z, (rng.random(n) < _sigmoid(z)).astype(int)


# --------------------------------------------------------------------------- temperature, threshold
def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, 40000)
    y = (rng.random(z.size) < 1.0 / (1.0 + np.exp(-z))).astype(int)
    overconfident = 1.0 / (1.0 + np.exp(-2.5 * z))        # true temperature 2.5
    assert fit_temperature(y, overconfident) == pytest.approx(2.5, rel=0.1)
    underconfident = 1.0 / (1.0 + np.exp(-0.5 * z))       # true temperature 0.5
    assert fit_temperature(y, underconfident) == pytest.approx(0.5, rel=0.1)
    calibrated = apply_temperature(overconfident, fit_temperature(y, overconfident))
    np.testing.assert_allclose(calibrated, 1.0 / (1.0 + np.exp(-z)), atol=0.03)


def test_temperature_edge_cases():
    assert fit_temperature([1, 1, 1], [0.9, 0.8, 0.99]) == 1.0
    p = np.array([0.0, 0.2, 0.5, 0.7, 1.0])
    out = apply_temperature(p, 3.0)
    assert out[2] == pytest.approx(0.5) and np.all(np.diff(out) > 0) and np.isfinite(out).all()
    np.testing.assert_array_equal(apply_temperature(p, 1.0), p)
    T = fit_temperature([0, 1, -1, 1], [0.1, 0.8, 0.99, 0.7])  # label -1 is ignored
    assert 0.05 <= T <= 20.0


def test_threshold_maximises_weighted_f1():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.6, 0.65, 0.7, 0.8, 0.9]
    t = choose_threshold(y, p)
    assert t == pytest.approx(0.625)
    assert classification_metrics(y, p, threshold=t)["f1"] == 1.0
    assert classification_metrics(y, p, threshold=0.5)["f1"] < 1.0


def test_threshold_ties_go_to_the_candidate_closest_to_half():
    # thresholds 0.2 and 0.5 (and 0.625) all give weighted F1 0.733...
    y, p = [0, 1, 0, 1], [0.1, 0.3, 0.35, 0.9]
    assert classification_metrics(y, p, threshold=0.2)["f1"] == \
        pytest.approx(classification_metrics(y, p, threshold=0.5)["f1"])
    assert choose_threshold(y, p) == 0.5


def test_vectorised_weighted_f1_agrees_with_metrics():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1).round(2)
    ts = np.array([0.0, 0.1, 0.33, 0.5, 0.505, 0.8, 1.0, 1.01])
    ours = weighted_f1_at(y, p, ts)
    ref = [classification_metrics(y, p, threshold=t)["f1"] for t in ts]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    t = choose_threshold(y, p)
    u = np.unique(p)
    best = max(classification_metrics(y, p, threshold=c)["f1"]
               for c in np.r_[0.5, (u[:-1] + u[1:]) / 2])
    assert classification_metrics(y, p, threshold=t)["f1"] == pytest.approx(best)


# ------------------------------------------------------------------------------- Calibration
def test_calibration_api_takes_out_of_fold_data_only():
    for fn in (fit_temperature, choose_threshold):
        params = [n for n, q in inspect.signature(fn).parameters.items() if q.default is q.empty]
        assert params == ["y_true", "prob_all"]
    params = [n for n, q in inspect.signature(fit_calibration).parameters.items()
              if q.default is q.empty]
    assert params == ["y_oof", "p_oof", "fold_oof", "k"]
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.4 * y + 0.6 * rng.random(200), 0.01, 0.99)
    f = np.arange(200) % 2
    cal = fit_calibration(y, p, f, 2)
    for i in range(2):
        assert cal.temperatures[i] == fit_temperature(y[f == i], p[f == i])
    assert cal.threshold == choose_threshold(y, cal.calibrated_oof(p, f))
    assert fit_calibration(y, p, f, 2, fit=False).temperatures == (1.0, 1.0)
    with pytest.raises(ValueError, match="fold 2 has no out-of-fold rows"):
        fit_calibration(y, p, f, 3)


def test_combine_is_the_mean_of_each_fold_scaled_by_its_own_temperature():
    cal = Calibration((2.0, 0.5, 1.0), 0.4)
    per_fold = np.array([[0.9, 0.2, 0.5], [0.6, 0.45, 0.99], [0.3, 0.3, 0.7]])
    expected = np.mean([_sigmoid(np.log(p / (1 - p)) / T)
                        for p, T in zip(per_fold, cal.temperatures)], axis=0)
    np.testing.assert_allclose(cal.combine(per_fold), expected, rtol=1e-12)
    np.testing.assert_allclose(cal.calibrated_oof([0.9, 0.6, 0.3], [0, 1, 2]),
                               [apply_temperature(0.9, 2.0), apply_temperature(0.6, 0.5), 0.3])
    with pytest.raises(ValueError, match="shape"):
        cal.combine(per_fold[:2])
    assert Calibration.from_dict(cal.to_dict()) == cal
    for bad in ({"temperatures": [], "threshold": 0.5}, {"temperatures": [1.0, -2.0],
                                                          "threshold": 0.5},
                {"temperatures": [1.0], "threshold": 1.5}, {"threshold": 0.5}):
        with pytest.raises(ValueError):
            Calibration.from_dict(bad)


def test_folds_of_different_confidence_old_pooled_scheme_versus_per_fold():
    """Issue 13.3. Fold 0's model is overconfident (logits x3), fold 1's underconfident (x0.4).
    The old scheme (one temperature on the pooled OOF, applied to the logit of the mean fold
    probability) leaves both the OOF and the deployed ensemble badly calibrated and picks another
    threshold; per-fold temperatures, combined as predict combines them, are calibrated."""
    rng = np.random.default_rng(0)
    n = 4000
    z0, y0 = _cells(rng, n)
    z1, y1 = _cells(rng, n)
    y = np.r_[y0, y1]
    p = np.r_[_sigmoid(3.0 * z0), _sigmoid(0.4 * z1)]
    fold = np.r_[np.zeros(n, int), np.ones(n, int)]

    cal = fit_calibration(y, p, fold, 2)
    assert cal.temperatures[0] == pytest.approx(3.0, rel=0.1)
    assert cal.temperatures[1] == pytest.approx(0.4, rel=0.1)
    T_old = fit_temperature(y, p)                                  # the old calibrate_oof
    thr_old = choose_threshold(y, apply_temperature(p, T_old))
    assert 0.6 < T_old < 2.9 and abs(thr_old - cal.threshold) > 0.01

    assert expected_calibration_error(y, cal.calibrated_oof(p, fold)) < 0.02
    assert expected_calibration_error(y, apply_temperature(p, T_old)) > 0.08

    # deployed: both fold models score the same new images
    zt, yt = _cells(rng, 50000)
    per_fold = np.stack([_sigmoid(3.0 * zt), _sigmoid(0.4 * zt)])
    new = cal.combine(per_fold)
    old = apply_temperature(per_fold.mean(axis=0), T_old)
    assert expected_calibration_error(yt, new) < 0.02
    assert expected_calibration_error(yt, old) > 0.08
    nll = lambda q: -np.mean(np.where(yt == 1, np.log(q), np.log1p(-q)))  # noqa: E731
    assert nll(new) < nll(old) - 0.03
    assert nll(new) == pytest.approx(nll(_sigmoid(zt)), abs=0.01)   # as good as the truth
