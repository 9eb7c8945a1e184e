"""The final job end to end on the real sample: artifact, calibration on OOF only, predict agrees.

Slow: starts a local Ray and trains the folds with a TorchTrainer.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leuk_ray.artifact import load_artifact, read_manifest
from leuk_ray.calibration import calibrate_oof
from leuk_ray.metrics import classification_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_final_smoke_on_real_sample_then_predict_reproduces_metrics(cnmc_root, tmp_path):
    art = tmp_path / "artifact"
    r = subprocess.run([sys.executable, "-m", "leuk_ray.final", "--smoke-test", "--data",
                        str(cnmc_root), "--out", str(art), "--set", "data.max_images=160",
                        "--num-cpus", "2"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"artifact: {art}" in r.stdout

    # a complete artifact: manifest last, every file checksummed, loadable
    manifest = read_manifest(art)
    assert manifest["format_version"] == 1 and len(manifest["folds"]) == 2
    for name in ("fold_0.pt", "fold_1.pt", "metrics.json", "oof.csv", "report/report.md",
                 "report/roc.png", "report/confusion.png", "report/folds.png",
                 "report/calibration.png"):
        assert name in manifest["files"], name
        assert (art / name).stat().st_size > 0
    assert not list(tmp_path.glob(".artifact.partial-*"))
    metrics = json.loads((art / "metrics.json").read_text())
    test = metrics["test"]
    assert test["n"] == 53 and len(test["folds"]) == 2 and "ensemble_tta" in test
    for key in ("f1", "accuracy", "auc", "sensitivity", "specificity", "ece",
                "per_subject_accuracy", "precision_all", "recall_hem"):
        assert key in test["ensemble"]

    # temperature and threshold come from the out-of-fold predictions alone
    with (art / "oof.csv").open() as f:
        oof = list(csv.DictReader(f))
    test_paths = {str(p) for p in (cnmc_root / "test").rglob("*.png")}
    assert not test_paths & {row["path"] for row in oof}
    T, thr = calibrate_oof(np.array([int(x["label"]) for x in oof]),
                           np.array([float(x["prob_all"]) for x in oof]))
    assert T == pytest.approx(manifest["temperature"], rel=1e-4, abs=1e-4)
    assert thr == pytest.approx(manifest["threshold"], abs=1e-4)

    # predict on the sample's test/ reproduces the ensemble numbers of metrics.json
    preds = tmp_path / "preds.csv"
    p = subprocess.run([sys.executable, "-m", "leuk_ray.predict", "--model", str(art), "--out",
                        str(preds), str(cnmc_root / "test")], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    with preds.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 53
    y = np.array([1 if Path(x["path"]).parent.name == "all" else 0 for x in rows])
    prob = np.array([float(x["prob_all"]) for x in rows])
    subjects = [Path(x["path"]).name.split("_")[1] for x in rows]
    again = classification_metrics(y, prob, manifest["threshold"], subjects=subjects)
    for key in ("f1", "accuracy", "auc", "sensitivity", "specificity"):
        assert again[key] == pytest.approx(test["ensemble"][key], abs=1e-6), key
    assert all(x["pred"] == ("all" if float(x["prob_all"]) >= manifest["threshold"] else "hem")
               for x in rows)
    ens = load_artifact(art)
    assert ens.threshold == manifest["threshold"] and len(ens.models) == 2


@pytest.mark.slow
def test_final_preset_compared_with_a_search_on_the_same_folds(cnmc_root, tmp_path):
    from leuk_ray.config import load_config, save_config

    search = tmp_path / "search"
    best = load_config(None, [f"data.root={cnmc_root}", "data.max_images=120", "train.epochs=2",
                              "train.lr=0.003"], smoke=True)
    save_config(best, search / "best_config.yaml", extra={"cv_score": 0.5, "trial_id": "t0"})
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "leuk_ray.final", "--preset", "seed000",
                        "--smoke-test", "--compare", str(search), "--out", str(out), "--no-tta",
                        "--set", "train.epochs=2", "--num-cpus", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (out / "comparison.md").read_text()
    assert "| | seed000 | search |" in md and "test ensemble f1" in md
    for name in ("seed000", "search"):
        assert (out / name / "manifest.json").is_file()
    # the same folds: the out-of-fold rows of both ensembles are the same images in the same folds
    folds = {}
    for name in ("seed000", "search"):
        with (out / name / "oof.csv").open() as f:
            folds[name] = sorted((row["path"], row["fold"]) for row in csv.DictReader(f))
    assert folds["seed000"] == folds["search"]
    cmp = json.loads((out / "comparison.json").read_text())
    assert set(cmp) == {"seed000", "search"}
    assert cmp["seed000"]["folds"][0]["epochs"] <= 2
