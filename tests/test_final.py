"""The final job end to end: artifact, calibration on OOF only, predict agrees.

Slow: starts a local Ray and trains the folds with a TorchTrainer. Machinery: runs on the synthetic
``ray_data`` tree (PNG, seed layout), so a fresh clone without ../shared runs it too.
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
from leuk_ray.calibration import Calibration, fit_calibration
from leuk_ray.metrics import classification_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_final_smoke_then_predict_reproduces_metrics(ray_data, tmp_path):
    art = tmp_path / "artifact"
    r = subprocess.run([sys.executable, "-m", "leuk_ray.final", "--smoke-test", "--data",
                        str(ray_data), "--out", str(art), "--set", "data.max_images=160",
                        "--num-cpus", "2"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"artifact: {art}" in r.stdout
    # issue 15: final's console is quiet too: its story (fold epochs, scores, outputs), no Ray,
    # Ray Train or Tune chatter, no colour codes (the output is not a terminal)
    out = r.stdout + r.stderr
    for noise in ("(RayTrainWorker", "(raylet)", "PlacementGroupCleaner", "\x1b[", "INFO",
                  "WARNING", "Traceback"):
        assert noise not in out, (noise, out[-3000:])
    assert "fold 0" in r.stdout and "epoch" in r.stdout  # the fold workers' story lines

    # a complete artifact: manifest last, every file checksummed, loadable
    manifest = read_manifest(art)
    assert manifest["format_version"] == 2 and len(manifest["folds"]) == 2
    for name in ("fold_0.pt", "fold_1.pt", "metrics.json", "oof.csv", "report/report.md",
                 "report/roc.png", "report/confusion.png", "report/folds.png",
                 "report/calibration.png"):
        assert name in manifest["files"], name
        assert (art / name).stat().st_size > 0
    assert not list(tmp_path.glob(".artifact.partial-*"))
    metrics = json.loads((art / "metrics.json").read_text())
    test = metrics["test"]
    test_paths = {str(p) for p in (ray_data / "test").rglob("*.png")}
    n_test = len(test_paths)  # 33
    assert test["n"] == n_test and len(test["folds"]) == 2 and "ensemble_tta" in test
    for key in ("f1", "accuracy", "auc", "sensitivity", "specificity", "ece",
                "per_subject_accuracy", "precision_all", "recall_hem"):
        assert key in test["ensemble"]

    # temperature and threshold come from the out-of-fold predictions alone
    with (art / "oof.csv").open() as f:
        oof = list(csv.DictReader(f))
    assert not test_paths & {row["path"] for row in oof}
    y_oof = np.array([int(x["label"]) for x in oof])
    fold_oof = np.array([int(x["fold"]) for x in oof])
    for kind, column in (("plain", "prob_all"), ("tta", "prob_all_tta")):
        cal = fit_calibration(y_oof, np.array([float(x[column]) for x in oof]), fold_oof, 2)
        saved = Calibration.from_dict(manifest["calibration"][kind])
        assert cal.temperatures == pytest.approx(saved.temperatures, rel=1e-4, abs=1e-4)
        assert cal.threshold == pytest.approx(saved.threshold, abs=1e-4)
    assert manifest["threshold"] == manifest["calibration"]["plain"]["threshold"]
    assert manifest["model"]["smoke_test"] is True and manifest["model"]["image_size"] == 64
    report = (art / "report" / "report.md").read_text()
    assert report.startswith("# SMOKE TEST MODEL") and "## Model" in report
    assert "95% CI (bootstrap over" in report and "out-of-fold (one model per image)" in report
    assert test["ci"]["ensemble"]["n_images"] == n_test

    # predict on the sample's test/ reproduces the ensemble numbers of metrics.json
    preds = tmp_path / "preds.csv"
    p = subprocess.run([sys.executable, "-m", "leuk_ray.predict", "--model", str(art), "--out",
                        str(preds), str(ray_data / "test")], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    with preds.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_test
    y = np.array([1 if Path(x["path"]).parent.name == "all" else 0 for x in rows])
    prob = np.array([float(x["prob_all"]) for x in rows])
    subjects = [Path(x["path"]).name.split("_")[1] for x in rows]
    again = classification_metrics(y, prob, manifest["threshold"], subjects=subjects)
    for key in ("f1", "accuracy", "auc", "sensitivity", "specificity"):
        assert again[key] == pytest.approx(test["ensemble"][key], abs=1e-6), key
    assert all(x["pred"] == ("all" if float(x["prob_all"]) >= manifest["threshold"] else "hem")
               for x in rows)
    # and with --tta, the ensemble + TTA numbers, by the threshold fitted on TTA outputs
    t = subprocess.run([sys.executable, "-m", "leuk_ray.predict", "--model", str(art), "--tta",
                        "--out", str(preds), str(ray_data / "test")], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert t.returncode == 0, t.stderr[-2000:]
    with preds.open() as f:
        rows = list(csv.DictReader(f))
    thr_tta = manifest["calibration"]["tta"]["threshold"]
    again = classification_metrics(y, np.array([float(x["prob_all"]) for x in rows]), thr_tta)
    for key in ("f1", "accuracy", "auc", "sensitivity", "specificity"):
        assert again[key] == pytest.approx(test["ensemble_tta"][key], abs=1e-6), key
    assert all(x["pred"] == ("all" if float(x["prob_all"]) >= thr_tta else "hem") for x in rows)
    ens = load_artifact(art)
    assert ens.threshold == manifest["threshold"] and len(ens.models) == 2


@pytest.mark.slow
def test_final_preset_compared_with_a_search_on_the_same_folds(ray_data, tmp_path):
    from leuk_ray.config import load_config, save_config

    search = tmp_path / "search"
    best = load_config(None, [f"data.root={ray_data}", "data.max_images=120", "train.epochs=2",
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


@pytest.mark.slow
def test_run_final_is_a_python_api_from_a_weights_file_with_a_corrupt_png(synth_root, tmp_path):
    """One final run, three checks (each a final of its own before; CI time):
    - issue 14 (shape): the final job callable from a notebook, returning what it measured and
      the calibration predict applies, typed; a mistake raises before Ray starts;
    - weights: started from a local weights file, the manifest names the file and its sha256, at
      the top and for every fold (as reported by the fold workers);
    - issue 13.4: one image that does not decode (within data.max_bad_fraction): final trains,
      calibrates on the rows the folds validated on and writes the artifact."""
    import ray
    from safetensors.torch import save_file
    from test_weights import _random_state

    from leuk_ray.config import load_config
    from leuk_ray.errors import UserError
    from leuk_ray.final import FinalResult, run_final
    from leuk_ray.weights import sha256_file

    bad = _corrupt_png(synth_root / "train" / "all" / "UID_101_99_1_all.png")
    weights = tmp_path / "w.safetensors"
    save_file(_random_state("test_efficientnet"), str(weights),
              metadata={"architecture": "test_efficientnet"})
    cfg = load_config(None, [f"data.root={synth_root}", "train.epochs=1", "final.tta=false",
                             f"model.pretrained_path={weights}", "data.image_size=32"], smoke=True)
    out = tmp_path / "art"
    try:
        res = run_final(cfg, str(out), num_cpus=2, smoke=True)
    finally:
        ray.shutdown()
    assert isinstance(res, FinalResult) and res.uri == str(out)
    assert isinstance(res.calibration, Calibration) and res.tta_calibration is None
    manifest = read_manifest(out)
    assert res.threshold == res.metrics["threshold"] == manifest["threshold"]
    assert {"oof", "test", "folds", "model"} <= set(res.metrics)
    with pytest.raises(UserError, match="already holds an ensemble artifact"):
        run_final(cfg, str(out))  # refused before data and Ray

    want = {"architecture": "test_efficientnet", "source": "file", "file": "w.safetensors",
            "sha256": sha256_file(weights)}
    assert manifest["weights"] == want
    assert [f["weights"] for f in manifest["folds"]] == [want] * len(manifest["folds"])

    with (out / "oof.csv").open() as f:
        oof = list(csv.DictReader(f))
    assert str(bad) not in {row["path"] for row in oof}
    n_train = len(list((synth_root / "train").rglob("*.bmp")))
    assert len(oof) == n_train
    assert manifest["model"]["train_images"] == n_train
    assert len(manifest["calibration"]["plain"]["temperatures"]) == 2


# ------------------------------------------------------------------ fast checks (no Ray started)
def test_run_name_hashes_only_what_determines_the_weights(synth_root):
    """Issue 14.9: rerunning final after a crash with another TTA/calibration setting, GPU share,
    cache budget or thread count must resume the same fold checkpoints; a training change must
    not. Issue 13: nor may other starting weights (another file's bytes at the same path)."""
    from leuk_ray.config import load_config
    from leuk_ray.data import prepare_data
    from leuk_ray.final import _run_name
    from leuk_ray.weights import WeightsInfo

    none = WeightsInfo("test_efficientnet", "none")
    cfg = load_config(None, [f"data.root={synth_root}"], smoke=True)
    prepared = prepare_data(cfg.data)
    name = _run_name(cfg, prepared, none)
    same = load_config(None, [f"data.root={synth_root}", "final.tta=false", "final.calibrate=false",
                              "ray.gpus_per_worker=0.5", "ray.cpus_per_worker=2",
                              "search.num_samples=3", "final.out=/elsewhere", "data.cache=off",
                              "data.cache_mb=64", "data.num_workers=0", "train.threads=1",
                              "train.device=cpu"], smoke=True)
    assert _run_name(same, prepared, none) == name
    for change in ("train.lr=0.001", "model.dropout=0.3", "data.image_size=32"):
        other = load_config(None, [f"data.root={synth_root}", change], smoke=True)
        assert _run_name(other, prepared, none) != name, change
    a = WeightsInfo("tf_efficientnet_lite0", "file", "w.safetensors", "a" * 64)
    b = WeightsInfo("tf_efficientnet_lite0", "file", "w.safetensors", "b" * 64)
    assert _run_name(cfg, prepared, a) != _run_name(cfg, prepared, b) != name


def test_smoke_test_caps_final_epochs(tmp_path):
    """Issue 13.9: final.epochs was applied after the smoke layer and undid its epoch cap."""
    from leuk_ray.config import SMOKE_CAPS
    from leuk_ray.final import build_parser, resolve_config

    args = build_parser().parse_args(["--data", str(tmp_path), "--set", "final.epochs=30",
                                      "--smoke-test"])
    cfg, _ = resolve_config(args)
    assert cfg.train.epochs == SMOKE_CAPS["train.epochs"]
    args = build_parser().parse_args(["--data", str(tmp_path), "--set", "final.epochs=3",
                                      "--smoke-test"])
    assert resolve_config(args)[0].train.epochs == 3                # a cap only shrinks
    args = build_parser().parse_args(["--data", str(tmp_path), "--set", "final.epochs=30"])
    assert resolve_config(args)[0].train.epochs == 30


def _art(dest: Path) -> Path:
    import torch

    from leuk_ray.artifact import save_artifact
    from leuk_ray.config import load_config
    from leuk_ray.model import create_model

    cfg = load_config(smoke=True)
    torch.manual_seed(0)
    states = [create_model(cfg.model).state_dict() for _ in range(2)]
    return save_artifact(dest, cfg=cfg, fold_states=states,
                         fold_scores=[{"fold": i, "val_f1": 0.5} for i in range(2)],
                         temperature=1.0, threshold=0.5, metrics={})


def test_final_refuses_an_existing_artifact_unless_overwrite(tmp_path):
    """Issue 14.11: final silently replaced an existing ensemble/; now it refuses before any
    work unless --overwrite, and never writes into a folder that is not an artifact."""
    from leuk_ray.errors import UserError
    from leuk_ray.final import check_target
    from leuk_ray.storage import RunFiles

    art = _art(tmp_path / "search" / "ensemble")
    with pytest.raises(UserError, match="already holds an ensemble artifact.*--overwrite"):
        check_target(RunFiles.from_path(str(art)), overwrite=False)
    check_target(RunFiles.from_path(str(art)), overwrite=True)
    check_target(RunFiles.from_path(str(tmp_path / "new")), overwrite=False)   # nothing there
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not an ensemble artifact"):
            check_target(RunFiles.from_path(str(tmp_path / "notes")), overwrite=overwrite)


# ------------------------------------------------ issue 13.4: the rows each fold validated on
def _fold_states(prepared, drop: set[str]) -> list[dict]:
    """Checkpoint-like fold states whose workers left the paths in ``drop`` out."""
    import torch

    from leuk_ray.fold_trainer import VAL_ROWS, ValidationRows

    states = []
    for i in range(prepared.n_folds):
        val = prepared.train[(prepared.train["fold"] == i) & ~prepared.train["path"].isin(drop)]
        rows = ValidationRows(tuple(val["path"]), tuple(int(v) for v in val["label"]),
                              tuple(val["subject"]))
        probs = torch.linspace(0.05, 0.95, len(rows), dtype=torch.float64)
        states.append({VAL_ROWS: rows.to_state(), "best_probs": probs})
    return states


def test_oof_uses_the_rows_each_fold_validated_on(synth_root):
    """A worker that dropped an undecodable image: final used to rebuild the fold's rows from
    the index and abort with "the data changed since training"."""
    import torch

    from leuk_ray.config import load_config
    from leuk_ray.data import prepare_data
    from leuk_ray.errors import UserError
    from leuk_ray.final import _oof

    cfg = load_config(None, [f"data.root={synth_root}"], smoke=True)
    prepared = prepare_data(cfg.data)
    dropped = str(prepared.train.loc[prepared.train["fold"] == 1, "path"].iloc[3])
    states = _fold_states(prepared, {dropped})
    # the checkpoint holds plain lists: it survives torch.load(weights_only=True)
    torch.save(states[0], synth_root / "state.pt")
    assert torch.load(synth_root / "state.pt", weights_only=True).keys() == states[0].keys()

    oof = _oof(prepared, states)
    assert len(oof) == len(prepared.train) - 1 and dropped not in set(oof.path)
    for i, st in enumerate(states):
        m = oof.fold == i
        assert list(oof.path[m]) == st["val_rows"]["path"]
        assert list(oof.label[m]) == st["val_rows"]["label"]
        assert list(oof.subject[m]) == st["val_rows"]["subject"]
        np.testing.assert_array_equal(oof.prob_all[m], st["best_probs"].numpy())
    labels = dict(zip(prepared.train["path"], prepared.train["label"]))
    assert all(labels[q] == y for q, y in zip(oof.path, oof.label))

    old = [{k: v for k, v in st.items() if k != "val_rows"} for st in states]
    with pytest.raises(UserError, match="does not record the rows it validated on"):
        _oof(prepared, old)
    moved = _fold_states(prepared, set())
    moved[0]["val_rows"]["path"][0] = "/elsewhere/UID_1_1_1_all.bmp"
    with pytest.raises(UserError, match="data changed since training"):
        _oof(prepared, moved)
    short = _fold_states(prepared, set())
    short[1]["best_probs"] = short[1]["best_probs"][:-1]
    with pytest.raises(UserError, match="validation probabilities"):
        _oof(prepared, short)


def _corrupt_png(path: Path) -> Path:
    """Passes the byte checks (PNG signature, IEND at the end) but does not decode."""
    rng = np.random.default_rng(0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
                     + b"\x00\x00\x00\x00IEND\xaeB`\x82")
    return path


@pytest.mark.slow
def test_final_scores_the_folds_in_ray_tasks_with_the_fold_workers_resources(ray_data):
    """Issue 14.9: the test-set evaluation (k models x 8 TTA views) and the out-of-fold TTA pass
    ran in the final job's driver (on a cluster: a CPU head node). Now one Ray task per fold, with
    a fold worker's resources, scores them with the artifact's model and predict's inference path;
    the driver gets the probabilities back, the same as Ensemble.predict gives in process."""
    import os

    import ray
    import torch
    from ray.util.state import list_tasks

    from leuk_ray.artifact import build_ensemble
    from leuk_ray.cluster import PREEMPTION_WATCHER_ENV, connect
    from leuk_ray.config import load_config
    from leuk_ray.data import prepare_data
    from leuk_ray.final import OutOfFold, _eval_dataset, _labelled_test, _rows, score_folds
    from leuk_ray.model import create_model

    cfg = load_config(None, [f"data.root={ray_data}", "ray.cpus_per_worker=0.5"], smoke=True)
    prepared = prepare_data(cfg.data)
    torch.manual_seed(0)
    states = [{"best_state": create_model(cfg.model).state_dict()} for _ in range(2)]
    tr = prepared.train
    oof = OutOfFold(path=tr["path"].to_numpy(object), label=tr["label"].to_numpy(np.int64),
                    subject=tr["subject"].to_numpy(object), fold=tr["fold"].to_numpy(np.int64),
                    prob_all=np.zeros(len(tr)))
    test = _labelled_test(prepared)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", PREEMPTION_WATCHER_ENV)}
    connect(num_cpus=2)
    try:
        scores = score_folds(cfg, states, oof, test)
        tasks = list_tasks(filters=[("name", "=", "leuk_ray.final.score_fold")], detail=True)
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert [s.fold for s in scores] == [0, 1] and {s.device for s in scores} == {"cpu"}
    assert len(tasks) == 2 and all(t.required_resources == {"CPU": 0.5} for t in tasks), tasks
    ens = build_ensemble(cfg, [s["best_state"] for s in states])  # what predict loads
    ds = _eval_dataset(test, ens.preprocessing)
    for tta, key in ((False, "test"), (True, "test_tta")):
        _, per_fold = ens.predict(ds, tta=tta, batch_size=cfg.train.batch_size)
        np.testing.assert_allclose(np.stack([getattr(s, key) for s in scores]), per_fold,
                                   atol=1e-5)
    for s in scores:
        m = oof.fold == s.fold
        rows = _eval_dataset(_rows(oof.path[m], oof.label[m], oof.subject[m]), ens.preprocessing)
        _, per_fold = ens.predict(rows, tta=True, batch_size=cfg.train.batch_size)
        np.testing.assert_allclose(s.oof_tta, per_fold[s.fold], atol=1e-5)
