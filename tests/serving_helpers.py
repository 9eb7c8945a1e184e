"""Helpers shared by the export and serve tests: a small artifact, cell images, bad uploads."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import pytest
import torch

from leuk_ray.artifact import save_artifact
from leuk_ray.calibration import Calibration
from leuk_ray.config import load_config
from leuk_ray.data import read_image
from leuk_ray.model import create_model

CNMC = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnmc"
CAL = Calibration((1.7, 0.6), 0.42)          # a temperature per fold, as fit_calibration gives
TTA_CAL = Calibration((2.5, 0.8), 0.55)      # fitted on TTA outputs


def make_artifact(out: Path, overrides: list[str] | None = None, folds: int = 2,
                  calibration: Calibration = CAL,
                  tta_calibration: Calibration | None = TTA_CAL) -> Path:
    """A random-init smoke-size ensemble (timm's test_efficientnet at 64 px unless ``overrides``
    say otherwise) with per-fold temperatures; no Ray, no training."""
    cfg = load_config(None, overrides or [], smoke=True)
    states = []
    for i in range(folds):
        torch.manual_seed(10 + i)
        states.append(create_model(cfg.model).state_dict())
    return save_artifact(out, cfg=cfg, fold_states=states,
                         fold_scores=[{"fold": i, "val_f1": 0.5} for i in range(folds)],
                         calibration=calibration, tta_calibration=tta_calibration, metrics={})


def cell_images(tmp_path_factory: pytest.TempPathFactory, n: int = 24) -> list[Path]:
    """Real C-NMC cells (both classes, test split) when ../shared/data/cnmc is there, else
    synthetic ones (a fresh clone, or LEUK_RAY_NO_SHARED=1)."""
    if (CNMC / "test").is_dir() and os.environ.get("LEUK_RAY_NO_SHARED") != "1":
        found: list[Path] = []
        for cls in ("all", "hem"):
            found += sorted((CNMC / "test" / cls).iterdir())[: n // 2]
        return found
    from leuk_ray.data.synth import make_synthetic
    root = make_synthetic(tmp_path_factory.mktemp("cells") / "data", n=max(n, 16), size=120,
                          seed=7)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix == ".bmp")[:n]


def junk_uploads(cell: Path) -> dict[str, bytes]:
    """Uploads that are not usable images: text, empty, a truncated PNG and a truncated BMP."""
    img = read_image(cell, 100)  # small: under the limits of the serve tests
    png = cv2.imencode(".png", img)[1].tobytes()
    bmp = cv2.imencode(".bmp", img)[1].tobytes()
    return {"notes.txt": b"this is not an image", "empty.bmp": b"",
            "cut.png": png[: len(png) // 2], "cut.bmp": bmp[: len(bmp) // 2]}
