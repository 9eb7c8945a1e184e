"""``leuk_ray.export``: one ONNX graph of the ensemble, run with ONNX Runtime, against predict."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from leuk_ray.artifact import load_artifact  # noqa: E402
from leuk_ray.calibration import Calibration  # noqa: E402
from leuk_ray.data import read_image  # noqa: E402
from leuk_ray.export import CalibratedMean, export_onnx, run_onnx, verify  # noqa: E402
from leuk_ray.predict import predict_paths  # noqa: E402
from serving_helpers import cell_images, make_artifact  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("art") / "ensemble")


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> list[Path]:
    return cell_images(tmp_path_factory)


def test_calibrated_mean_is_calibration_combine():
    rng = np.random.default_rng(0)
    per_fold = rng.uniform(0, 1, (3, 200))
    per_fold[:, :4] = [[0.0, 1.0, 1e-9, 1 - 1e-9]] * 3           # clipped like apply_temperature
    cal = Calibration((1.7, 1.0, 0.45), 0.5)                        # T = 1: P unchanged
    got = CalibratedMean(cal)(torch.tensor(per_fold, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, cal.combine(per_fold), rtol=0, atol=1e-12)


def test_onnx_matches_predict_on_cell_images(artifact, cells, tmp_path):
    ens = load_artifact(artifact)
    path = export_onnx(ens, tmp_path / "model.onnx")
    rows, skipped = predict_paths(ens, cells, batch_size=8)
    assert not skipped and len(rows) == len(cells)
    # resizing stays outside the graph: the same decoder and interpolation as predict
    images = np.stack([read_image(p, ens.image_size, ens.preprocessing.interpolation)
                       for p in cells])
    got = run_onnx(path, images)
    assert got.shape == (len(cells),) and got.dtype == np.float32
    np.testing.assert_allclose(got, [r.prob_all for r in rows], rtol=0, atol=1e-4)
    # dynamic batch: one image, and an odd-sized batch, give the same numbers
    np.testing.assert_allclose(run_onnx(path, images[:1]), got[:1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(run_onnx(path, images[3:8]), got[3:8], rtol=0, atol=1e-6)
    # the calibration is inside: the per-fold temperatures make a difference here
    uncal = np.mean(_raw_per_fold(ens, images), axis=0)
    assert np.abs(uncal - got).max() > 1e-3


def _raw_per_fold(ens, images: np.ndarray) -> np.ndarray:
    from leuk_ray.data import CellDataset
    ds = CellDataset([""] * len(images), [-1] * len(images), ens.image_size, images=images)
    return ens.predict(ds)[1]


def test_metadata_and_input_signature(artifact, tmp_path):
    ens = load_artifact(artifact)
    model = onnx.load(str(export_onnx(ens, tmp_path / "m.onnx")))
    meta = {p.key: p.value for p in model.metadata_props}
    assert float(meta["threshold"]) == pytest.approx(0.42)
    assert json.loads(meta["class_names"]) == ["hem", "all"]
    assert int(meta["image_size"]) == ens.image_size == 64
    assert json.loads(meta["temperatures"]) == [1.7, 0.6]
    assert meta["interpolation"] == ens.preprocessing.interpolation
    assert len(meta["manifest_sha256"]) == 64
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and out.name == "prob_all"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 64, 64, 3]
    assert model.opset_import[0].version >= 17


def test_a_timm_efficientnet_with_its_own_normalisation_exports(tmp_path, cells):
    """tf_efficientnet_lite0 (timm: mean = std = 0.5, not ImageNet's), random init, 1 fold."""
    art = make_artifact(tmp_path / "lite", ["model.backbone=tf_efficientnet_lite0"], folds=1,
                    calibration=Calibration((1.3,), 0.5), tta_calibration=Calibration((1.0,), 0.5))
    ens = load_artifact(art)
    assert ens.preprocessing.mean == (0.5, 0.5, 0.5)
    path = export_onnx(ens, tmp_path / "lite.onnx")
    images = np.stack([read_image(p, 64, ens.preprocessing.interpolation) for p in cells[:6]])
    assert verify(path, ens, images) <= 1e-4


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "leuk_ray.export", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_a_verified_file(artifact, tmp_path):
    r = _cli("--model", str(artifact), "--out", str(tmp_path / "out" / "model.onnx"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert "ONNX Runtime matches predict" in r.stdout
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind


def test_cli_tampered_artifact_is_one_line_exit_2(artifact, tmp_path):
    art = Path(shutil.copytree(artifact, tmp_path / "art"))
    with open(art / "fold_0.pt", "ab") as f:
        f.write(b"x")
    r = _cli("--model", str(art), "--out", str(tmp_path / "m.onnx"), cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fold_0.pt" in lines[0] and "checksum" in lines[0]
    assert not (tmp_path / "m.onnx").exists()
