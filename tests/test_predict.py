"""``python -m leuk_ray.predict`` and ``predict_paths``: folders, corrupt images, errors, CSV."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from leuk_ray.artifact import load_artifact, save_artifact
from leuk_ray.config import load_config
from leuk_ray.data import CellDataset, read_image
from leuk_ray.errors import UserError
from leuk_ray.model import create_model
from leuk_ray.predict import find_images, predict_paths, write_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    cfg = load_config(smoke=True)
    states = []
    for i in range(2):
        torch.manual_seed(10 + i)
        states.append(create_model(cfg.model).state_dict())
    return save_artifact(tmp_path_factory.mktemp("art") / "ensemble", cfg=cfg, fold_states=states,
                         fold_scores=[{"fold": i, "val_f1": 0.5} for i in range(2)],
                         temperature=1.5, threshold=0.5, metrics={})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cells")
    rng = np.random.default_rng(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    cv2.imwrite(str(root / "a.png"), rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))
    cv2.imwrite(str(root / "b.bmp"), rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    cv2.imwrite(str(root / "sub" / "c.jpg"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    cv2.imwrite(str(root / "sub" / "deeper" / "d.png"),
                rng.integers(0, 256, (90, 90), dtype=np.uint8))            # grayscale
    cv2.imwrite(str(root / "sub" / "e.TIF"), rng.integers(0, 65535, (40, 40, 3), dtype=np.uint16))
    good = (root / "a.png").read_bytes()
    (root / "sub" / "bad.png").write_bytes(good[: len(good) // 2])            # truncated
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"junk")
    return root


GOOD = ["a.png", "b.bmp", "sub/c.jpg", "sub/deeper/d.png", "sub/e.TIF"]


def test_find_images_recurses_sorted_and_skips_non_images(images):
    found = find_images([images])
    rel = [Path(p).relative_to(images).as_posix() for p in found]
    assert rel == sorted(GOOD + ["sub/bad.png"])
    assert find_images([images / "a.png", images, images / "a.png"])[0] == str(images / "a.png")
    assert len(find_images([images / "a.png", images])) == len(found)


def test_find_images_errors(tmp_path):
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no image files found"):
        find_images([tmp_path / "empty"])
    with pytest.raises(UserError, match="no such file or folder"):
        find_images([tmp_path / "missing"])


def test_predict_paths_matches_the_ensemble_on_decoded_images(artifact, images):
    ens = load_artifact(artifact)
    seen = []
    rows, skipped = predict_paths(ens, [images], batch_size=2, on_skip=lambda p, w: seen.append(p))
    assert [Path(r.path).relative_to(images).as_posix() for r in rows] == sorted(GOOD)
    assert [p for p, _ in skipped] == [str(images / "sub" / "bad.png")] == seen
    assert "truncated PNG" in skipped[0][1]
    paths = [r.path for r in rows]
    decoded = np.stack([read_image(p, ens.image_size) for p in paths])
    expected, _ = ens.predict(CellDataset(paths, [-1] * len(paths), ens.image_size,
                                          images=decoded), batch_size=3)
    np.testing.assert_allclose([r.prob_all for r in rows], expected, rtol=1e-6, atol=1e-7)
    assert [r.pred for r in rows] == ["all" if p >= ens.threshold else "hem" for p in expected]
    tta_rows, _ = predict_paths(ens, [images / "a.png"], tta=True, batch_size=4)
    assert len(tta_rows) == 1 and 0.0 <= tta_rows[0].prob_all <= 1.0


def test_write_csv(tmp_path, artifact, images):
    rows, _ = predict_paths(load_artifact(artifact), [images / "a.png"])
    out = write_csv(rows, tmp_path / "new" / "p.csv")
    with open(out) as f:
        got = list(csv.DictReader(f))
    assert got[0]["path"] == rows[0].path and got[0]["pred"] in ("all", "hem")
    assert float(got[0]["prob_all"]) == pytest.approx(rows[0].prob_all, abs=1e-6)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "leuk_ray.predict", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_csv_and_reports_the_corrupt_image(artifact, images, tmp_path):
    out = tmp_path / "preds.csv"
    r = _cli("--model", str(artifact), "--out", str(out), "--batch-size", "4", "--device", "cpu",
             str(images), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "prob_all", "pred"]
    assert len(rows) == 1 + len(GOOD)
    assert all(row[2] in ("all", "hem") and 0.0 <= float(row[1]) <= 1.0 for row in rows[1:])
    skip_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("skipped ")]
    bad = images / "sub" / "bad.png"
    assert len(skip_lines) == 1 and skip_lines[0].startswith(f"skipped {bad}: ")
    assert str(out) in r.stdout and "skipped 1" in r.stdout


def test_cli_empty_folder_is_one_line_exit_2(artifact, tmp_path):
    (tmp_path / "empty").mkdir()
    r = _cli("--model", str(artifact), str(tmp_path / "empty"), cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "empty" in lines[0]
    assert not (tmp_path / "preds.csv").exists()


def test_cli_tampered_artifact_is_one_line_exit_2(artifact, images, tmp_path):
    import shutil
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    (art / "fold_1.pt").unlink()
    r = _cli("--model", str(art), str(images / "a.png"), cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fold_1.pt" in lines[0] and str(art) in lines[0]


def test_cli_help_shows_defaults(tmp_path):
    r = _cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    assert "default: 64" in r.stdout and "default: preds.csv" in r.stdout
    assert "default: auto" in r.stdout


# ------------------------------------------------------------- preprocessing from the manifest
@pytest.fixture(scope="module")
def lite_artifact(tmp_path_factory) -> Path:
    """A 1-fold random-init tf_efficientnet_lite0 (timm says mean = std = 0.5) at 64 px."""
    cfg = load_config(None, ["model.backbone=tf_efficientnet_lite0"], smoke=True)
    torch.manual_seed(0)
    state = create_model(cfg.model).state_dict()
    return save_artifact(tmp_path_factory.mktemp("lite") / "ensemble", cfg=cfg,
                         fold_states=[state], fold_scores=[{"fold": 0, "val_f1": 0.5}],
                         temperature=1.0, threshold=0.5, metrics={})


def _model_inputs(ens) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    ens.models[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    return seen


def test_artifact_keeps_the_backbones_preprocessing_and_predict_uses_it(lite_artifact, tmp_path):
    import json

    from leuk_ray.data.transforms import Preprocessing
    m = json.loads((lite_artifact / "manifest.json").read_text())
    assert m["preprocessing"] == {"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
                                  "interpolation": "bicubic", "color": "RGB"}
    ens = load_artifact(lite_artifact)
    assert ens.preprocessing == Preprocessing(64, (0.5,) * 3, (0.5,) * 3, "bicubic")
    cv2.imwrite(str(tmp_path / "black.png"), np.zeros((80, 80, 3), dtype=np.uint8))
    seen = _model_inputs(ens)
    predict_paths(ens, [tmp_path / "black.png"])
    assert len(seen) == 1 and seen[0].shape == (1, 3, 64, 64)
    torch.testing.assert_close(seen[0], torch.full_like(seen[0], -1.0))  # (0 - 0.5) / 0.5


def test_predict_reads_preprocessing_back_from_the_manifest(lite_artifact, tmp_path):
    """Mean, std and the resize all come from manifest.json (what training used), not from
    whatever the backbone would resolve to today."""
    import json
    import shutil

    from leuk_ray.data.transforms import Preprocessing, to_model_input
    art = Path(shutil.copytree(lite_artifact, tmp_path / "art"))
    m = json.loads((art / "manifest.json").read_text())
    m["preprocessing"].update(mean=[0.25, 0.5, 0.75], interpolation="nearest")
    (art / "manifest.json").write_text(json.dumps(m))
    img = tmp_path / "cell.png"
    cv2.imwrite(str(img), np.random.default_rng(1).integers(0, 256, (90, 90, 3), dtype=np.uint8))
    ens = load_artifact(art)
    prep = Preprocessing(64, (0.25, 0.5, 0.75), (0.5,) * 3, "nearest")
    assert ens.preprocessing == prep
    seen = _model_inputs(ens)
    predict_paths(ens, [img])
    nearest = torch.from_numpy(read_image(img, 64, "nearest"))[None]
    torch.testing.assert_close(seen[0], to_model_input(nearest, "cpu", prep=prep))
    bicubic = torch.from_numpy(read_image(img, 64, "bicubic"))[None]
    assert not torch.equal(nearest, bicubic)

    for bad in ({"mean": [0.5, 0.5]}, {"std": [0.5, 0.0, 0.5]}, {"interpolation": "hamming"},
                {"image_size": 32}):
        m2 = json.loads(json.dumps(m))
        m2["preprocessing"].update(bad)
        (art / "manifest.json").write_text(json.dumps(m2))
        with pytest.raises(UserError, match=r"manifest.json: preprocessing"):
            load_artifact(art)
