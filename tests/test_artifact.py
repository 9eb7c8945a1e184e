"""Ensemble artifact: atomic save, verified load, weights_only, the calibration predict applies.

(Calibration itself: tests/test_calibration.py; the report: tests/test_report.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from leuk_ray.artifact import (FORMAT, FORMAT_VERSION, build_ensemble, load_artifact,
                               read_manifest, save_artifact, sha256_file)
from leuk_ray.calibration import Calibration, apply_temperature
from leuk_ray.config import load_config
from leuk_ray.data import CellDataset
from leuk_ray.errors import UserError
from leuk_ray.model import create_model

N_FOLDS = 2
CAL = Calibration((1.7, 0.6), 0.42)          # a temperature per fold, as fit_calibration gives
TTA_CAL = Calibration((2.5, 0.8), 0.55)      # fitted on TTA outputs


@pytest.fixture(scope="module")
def cfg():
    return load_config(smoke=True)  # test_efficientnet, 64 px, no pretrained weights


@pytest.fixture(scope="module")
def states(cfg):
    out = []
    for i in range(N_FOLDS):
        torch.manual_seed(i)
        out.append(create_model(cfg.model).state_dict())
    return out


@pytest.fixture(scope="module")
def ds(cfg):
    rng = np.random.default_rng(0)
    n, s = 6, cfg.data.image_size
    images = rng.integers(0, 256, size=(n, s, s, 3), dtype=np.uint8)
    return CellDataset([f"img{i}.png" for i in range(n)], [0, 1] * (n // 2), s, images=images)


def _save(out: Path, cfg, states, **kw) -> Path:
    args = dict(cfg=cfg, fold_states=states,
                fold_scores=[{"fold": i, "val_f1": 0.8 + 0.01 * i, "best_epoch": 2}
                             for i in range(len(states))],
                calibration=CAL, tta_calibration=TTA_CAL, metrics={"ensemble": {"f1": 0.9}},
                model_info={"backbone": "test_efficientnet", "smoke_test": True})
    if "threshold" in kw or "temperature" in kw:  # the short form: one temperature, a threshold
        args["calibration"] = None
    args.update(kw)
    return save_artifact(out, **args)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, cfg, states) -> Path:
    return _save(tmp_path_factory.mktemp("art") / "ensemble", cfg, states)


def _copy(artifact: Path, tmp_path: Path) -> Path:
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def _rewrite_manifest(art: Path, **changes) -> None:
    m = json.loads((art / "manifest.json").read_text())
    m.update(changes)
    (art / "manifest.json").write_text(json.dumps(m))


# ------------------------------------------------------------------------------------ artifact
def test_round_trip_gives_identical_predictions(artifact, cfg, states, ds):
    before = build_ensemble(cfg, states, calibration=CAL, tta_calibration=TTA_CAL)
    p0, folds0 = before.predict(ds, batch_size=4)
    ens = load_artifact(artifact)
    p1, folds1 = ens.predict(ds, batch_size=4)
    assert folds1.shape == (N_FOLDS, len(ds))
    np.testing.assert_array_equal(folds0, folds1)
    np.testing.assert_array_equal(p0, p1)
    assert (ens.calibration, ens.tta_calibration) == (CAL, TTA_CAL)
    assert (ens.threshold, ens.image_size) == (0.42, 64)
    assert ens.class_names == ("hem", "all")
    assert ens.label(np.array([0.41, 0.42])) == ["hem", "all"]
    assert ens.label(np.array([0.5, 0.55]), tta=True) == ["hem", "all"]


def test_predict_applies_exactly_the_fitted_per_fold_calibration(artifact, ds):
    """Issue 13.3: each fold's P(ALL) scaled by its own temperature, then averaged (not one
    temperature on the mean); with TTA, the calibration fitted on TTA outputs."""
    ens = load_artifact(artifact)
    p, per_fold = ens.predict(ds, batch_size=4)
    expected = np.mean([apply_temperature(per_fold[i], T)
                        for i, T in enumerate(CAL.temperatures)], axis=0)
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    assert not np.allclose(p, apply_temperature(per_fold.mean(axis=0), 1.7))
    p_tta, per_fold_tta = ens.predict(ds, tta=True, batch_size=4)
    np.testing.assert_allclose(p_tta, TTA_CAL.combine(per_fold_tta), rtol=1e-12)


def test_tta_without_a_tta_calibration_is_refused(tmp_path, cfg, states, ds):
    out = _save(tmp_path / "ens", cfg, states, tta_calibration=None)
    ens = load_artifact(out)
    assert ens.tta_calibration is None
    ens.predict(ds, batch_size=4)
    with pytest.raises(UserError, match="without a TTA calibration.*without --tta"):
        ens.predict(ds, tta=True, batch_size=4)


def test_one_temperature_for_every_fold_is_the_short_form(tmp_path, cfg, states):
    out = _save(tmp_path / "ens", cfg, states, calibration=None, tta_calibration=None,
                temperature=1.5, threshold=0.3)
    ens = load_artifact(out)
    assert ens.calibration == ens.tta_calibration == Calibration((1.5, 1.5), 0.3)
    with pytest.raises(ValueError, match="calibration of 3 folds for 2 fold models"):
        _save(tmp_path / "bad", cfg, states, calibration=Calibration((1.0, 1.0, 1.0), 0.5))


def test_manifest_lists_everything(artifact):
    m = read_manifest(artifact)
    assert m["format"] == FORMAT and m["format_version"] == FORMAT_VERSION
    assert m["class_names"] == ["hem", "all"]
    assert m["preprocessing"]["image_size"] == 64 and m["preprocessing"]["color"] == "RGB"
    assert [f["file"] for f in m["folds"]] == ["fold_0.pt", "fold_1.pt"]
    assert m["folds"][1]["val_f1"] == pytest.approx(0.81)
    assert m["calibration"]["plain"] == {"temperatures": [1.7, 0.6], "threshold": 0.42}
    assert m["calibration"]["tta"] == {"temperatures": [2.5, 0.8], "threshold": 0.55}
    assert m["threshold"] == 0.42 and "temperature" not in m
    assert m["model"] == {"backbone": "test_efficientnet", "smoke_test": True}
    assert m["versions"]["leuk_ray"] not in ("", None)
    on_disk = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()}
    assert set(m["files"]) == on_disk - {"manifest.json"}
    assert all(m["files"][f] == sha256_file(artifact / f) for f in m["files"])
    assert json.loads((artifact / "metrics.json").read_text()) == {"ensemble": {"f1": 0.9}}
    assert not list(artifact.parent.glob(".*")), "no hidden partial/old dirs left behind"


def test_fold_files_are_plain_state_dicts(artifact, states):
    sd = torch.load(artifact / "fold_0.pt", weights_only=True)
    assert sd.keys() == states[0].keys()


def test_overwrite_swaps_in_the_new_artifact(tmp_path, cfg, states):
    out = _save(tmp_path / "ens", cfg, states, threshold=0.3)
    _save(out, cfg, states, threshold=0.6)
    assert load_artifact(out).threshold == 0.6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]
    with pytest.raises(UserError, match="already exists"):
        _save(out, cfg, states, overwrite=False)


def test_refuses_to_replace_a_directory_that_is_not_an_artifact(tmp_path, cfg, states):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an ensemble artifact"):
        _save(tmp_path / "mine", cfg, states)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_crash_while_saving_leaves_no_artifact(tmp_path, cfg, states):
    def crash(report_dir: Path) -> None:
        (report_dir / "report.md").write_text("half")
        raise RuntimeError("simulated crash")

    out = tmp_path / "ens"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _save(out, cfg, states, write_report=crash)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="artifact directory not found"):
        load_artifact(out)
    # An existing artifact survives a crashed overwrite untouched.
    _save(out, cfg, states, threshold=0.3)
    with pytest.raises(RuntimeError):
        _save(out, cfg, states, threshold=0.9, write_report=crash)
    assert load_artifact(out).threshold == 0.3


def test_unfinished_save_is_named_and_not_loadable(tmp_path, artifact):
    partial = tmp_path / ".ens.partial-dead"
    partial.mkdir()
    (partial / "fold_0.pt").write_bytes((artifact / "fold_0.pt").read_bytes())
    with pytest.raises(UserError, match=r"\.ens\.partial-dead"):
        load_artifact(tmp_path / "ens")
    with pytest.raises(UserError, match="manifest.json is missing"):
        load_artifact(partial)


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper, file, message", [
    (lambda a: _flip_byte(a / "fold_1.pt"), "fold_1.pt", "checksum mismatch"),
    (lambda a: (a / "metrics.json").write_text("{}"), "metrics.json", "checksum mismatch"),
    (lambda a: (a / "fold_0.pt").unlink(), "fold_0.pt", "is missing"),
    (lambda a: _rewrite_manifest(a, format_version=999), "manifest.json", "format_version 999"),
    (lambda a: _rewrite_manifest(a, format="something-else"), "manifest.json", "format"),
    (lambda a: (a / "manifest.json").unlink(), "manifest.json", "is missing"),
    (lambda a: (a / "manifest.json").write_text("{not json"), "manifest.json", "cannot be read"),
    (lambda a: _rewrite_manifest(a, folds=[{"file": "fold_0.pt"}, {"file": "fold_9.pt"}]),
     "fold_9.pt", "no checksummed weights file"),
    (lambda a: _rewrite_manifest(a, calibration={"plain": {"temperatures": [1.0],
                                                           "threshold": 0.5}}),
     "manifest.json", "calibration.plain has 1 temperatures for 2 folds"),
    (lambda a: _rewrite_manifest(a, calibration={"plain": {"temperatures": [1.0, 0.0],
                                                           "threshold": 0.5}}),
     "manifest.json", "calibration.plain is not valid"),
])
def test_tampered_artifact_is_refused(artifact, tmp_path, monkeypatch, tamper, file, message):
    art = _copy(artifact, tmp_path)
    tamper(art)
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {})
    with pytest.raises(UserError) as e:
        load_artifact(art)
    text = str(e.value)
    assert str(art) in text and file in text and message in text
    assert "\n" not in text
    assert loads == [], "nothing may be unpickled before the artifact is verified"


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_fold_file_with_pickled_code_is_refused(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    _Payload.marker = str(tmp_path / "code-ran")
    torch.save({"weight": _Payload()}, art / "fold_0.pt")
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["fold_0.pt"] = sha256_file(art / "fold_0.pt")  # a consistent but evil artifact
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"fold_0\.pt: refused to load.*weights_only"):
        load_artifact(art)
    assert not (tmp_path / "code-ran").exists()


def test_weights_that_do_not_fit_the_config_are_a_user_error(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    m["config"]["model"]["head"] = "keras"
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="do not match the model"):
        load_artifact(art)
