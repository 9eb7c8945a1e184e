"""Helpers shared by the serving benchmarks: a random-init ensemble artifact and cell images."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from _common import DATA, ROOT

sys.path.insert(0, str(ROOT))
from leuk_ray.artifact import save_artifact  # noqa: E402
from leuk_ray.calibration import Calibration  # noqa: E402
from leuk_ray.config import load_config  # noqa: E402
from leuk_ray.model import create_model  # noqa: E402


def bench_artifact(out: Path, backbone: str, size: int, folds: int) -> Path:
    """``folds`` random-init ``backbone`` models at ``size`` px with per-fold temperatures (the
    speed of an ensemble does not depend on its weights). Reused when already there."""
    if (out / "manifest.json").is_file():
        return out
    cfg = load_config(None, [f"model.backbone={backbone}", "model.pretrained=false",
                             f"data.image_size={size}", f"data.folds={folds}"])
    states = []
    for i in range(folds):
        torch.manual_seed(i)
        states.append(create_model(cfg.model).state_dict())
    temps = tuple(1.0 + 0.25 * i for i in range(folds))
    return save_artifact(out, cfg=cfg, fold_states=states,
                         fold_scores=[{"fold": i, "val_f1": 0.5} for i in range(folds)],
                         calibration=Calibration(temps, 0.5),
                         tta_calibration=Calibration(temps, 0.5), metrics={})


def cell_paths(n: int) -> list[Path]:
    """The first ``n`` images of the real C-NMC sample (train then test), sorted."""
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: the real C-NMC sample is needed")
    paths = sorted(p for p in DATA.rglob("*") if p.suffix.lower() in (".bmp", ".png", ".jpg"))
    if len(paths) < n:
        raise SystemExit(f"{DATA}: {len(paths)} images, fewer than --n {n}")
    return paths[:n]
