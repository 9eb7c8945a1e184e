"""Ensemble artifact (atomic save, verified load, weights_only), calibration and the report."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from leuk_ray.artifact import (FORMAT, FORMAT_VERSION, build_ensemble, load_artifact,
                               read_manifest, save_artifact, sha256_file)
from leuk_ray.calibration import (apply_temperature, calibrate_oof, choose_threshold,
                                  fit_temperature, weighted_f1_at)
from leuk_ray.config import load_config
from leuk_ray.data import CellDataset
from leuk_ray.errors import UserError
from leuk_ray.metrics import classification_metrics
from leuk_ray.model import create_model
from leuk_ray.report import PLOTS, write_report

N_FOLDS = 2


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
                temperature=1.7, threshold=0.42, metrics={"ensemble": {"f1": 0.9}})
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
    before = build_ensemble(cfg, states, temperature=1.7, threshold=0.42)
    p0, folds0 = before.predict(ds, batch_size=4)
    ens = load_artifact(artifact)
    p1, folds1 = ens.predict(ds, batch_size=4)
    assert folds1.shape == (N_FOLDS, len(ds))
    np.testing.assert_array_equal(folds0, folds1)
    np.testing.assert_array_equal(p0, p1)
    np.testing.assert_allclose(p1, apply_temperature(folds1.mean(axis=0), 1.7))
    assert (ens.temperature, ens.threshold, ens.image_size) == (1.7, 0.42, 64)
    assert ens.class_names == ("hem", "all")
    assert ens.label(np.array([0.41, 0.42])) == ["hem", "all"]


def test_manifest_lists_everything(artifact):
    m = read_manifest(artifact)
    assert m["format"] == FORMAT and m["format_version"] == FORMAT_VERSION
    assert m["class_names"] == ["hem", "all"]
    assert m["preprocessing"]["image_size"] == 64 and m["preprocessing"]["color"] == "RGB"
    assert [f["file"] for f in m["folds"]] == ["fold_0.pt", "fold_1.pt"]
    assert m["folds"][1]["val_f1"] == pytest.approx(0.81)
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


# --------------------------------------------------------------------------------- calibration
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


def test_calibration_api_takes_out_of_fold_data_only():
    for fn in (fit_temperature, choose_threshold):
        params = [n for n, q in inspect.signature(fn).parameters.items() if q.default is q.empty]
        assert params == ["y_true", "prob_all"]
    params = [n for n, q in inspect.signature(calibrate_oof).parameters.items()
              if q.default is q.empty]
    assert params == ["y_oof", "p_oof"]
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.4 * y + 0.6 * rng.random(200), 0.01, 0.99)
    T, t = calibrate_oof(y, p)
    assert t == choose_threshold(y, apply_temperature(p, T))
    assert calibrate_oof(y, p, fit=False)[0] == 1.0


# -------------------------------------------------------------------------------------- report
def _report(tmp_path: Path, y, p, **kw) -> Path:
    return write_report(tmp_path / "report", title="test report",
                        metrics=classification_metrics(y, p, 0.5, subjects=kw.get("subjects")),
                        y_true=y, prob_all=p, threshold=0.5, temperature=1.3,
                        fold_scores=[{"fold": 0, "val_f1": 0.8, "best_epoch": 3},
                                     {"fold": 1, "val_f1": 0.7, "best_epoch": 2}], **kw)


def test_report_files(tmp_path):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 50)
    p = np.clip(0.5 * y + 0.5 * rng.random(50), 0, 1)
    subjects = [f"S{i % 4}" for i in range(50)]
    m = classification_metrics(y, p)
    md = _report(tmp_path, y, p, subjects=subjects, comparison={"fold 0": m, "ensemble": m})
    text = md.read_text()
    for name in PLOTS:
        png = tmp_path / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
        assert f"({name})" in text
    for needle in ("weighted F1", "ROC-AUC", "sensitivity", "specificity", "calibration error",
                   "threshold", "temperature", "| S3 |", "| ensemble |", "| all |"):
        assert needle in text


def test_report_with_one_class_has_a_note_instead_of_a_roc(tmp_path):
    y, p = [1, 1, 1, 1], [0.9, 0.6, 0.3, 0.8]
    md = _report(tmp_path, y, p)
    assert "ROC curve and AUC are undefined" in md.read_text()
    assert (tmp_path / "report" / "roc.png").stat().st_size > 0


def test_report_inside_the_artifact_is_checksummed(tmp_path, cfg, states):
    y, p = [0, 1, 0, 1], [0.2, 0.7, 0.4, 0.9]
    out = _save(tmp_path / "ens", cfg, states,
                write_report=lambda d: write_report(
                    d, title="t", metrics=classification_metrics(y, p), y_true=y, prob_all=p,
                    threshold=0.5, fold_scores=[{"fold": 0}, {"fold": 1}]))
    files = read_manifest(out)["files"]
    assert {f"report/{n}" for n in PLOTS} | {"report/report.md"} <= set(files)
