"""The realistic tier learns: ImageNet-pretrained EfficientNet-Lite0 (``--preset lite0``, packaged
weights) fine-tuned on real C-NMC cells, scored on subjects it never saw.

Small enough for CI (the engine alone, no Ray: one subject-grouped fold, 128 px, a few epochs), and
about learning, so it uses real weights and real images (the tiny random-init smoke model stays in
the machinery tests). The same budget from random initialisation is trained beside it: the
pretrained backbone must be clearly better than chance AND than scratch, which is what the
ImageNet weights are for.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from leuk_ray.config import load_config
from leuk_ray.data import fold_datasets, prepare_data
from leuk_ray.data.transforms import preprocessing_for
from leuk_ray.engine import fit_fold

pytestmark = pytest.mark.slow

# All 1,200 training cells, 2 subject-grouped folds (fold 0: 605 train, 595 validation), 128 px,
# 3 epochs: ~2 min per model on 2 cores (an epoch ~33 s: 26 s training, 7 s validating; the first
# also decodes the PNGs, ~3 s). Measured 2026-12-07 (CPU): best validation AUC pretrained 0.715,
# scratch 0.623; pretrained per epoch 0.715/0.633/0.712. 2026-11-28 gave 0.765 and 0.672 (per epoch
# 0.584/0.640/0.765 vs 0.548/0.569/0.672); that day's code (90592b5) gives today's numbers here, so
# the change is the environment, not leuk-ray.
SIZES = ["data.max_images=0", "data.image_size=128", "train.epochs=3", "train.patience=3",
         "train.threads=2", "data.augment=light", "train.batch_size=32"]


def _fit(root: Path, *extra: str):
    cfg = load_config(None, [f"data.root={root}", *SIZES, *extra], preset="lite0")
    prepared = prepare_data(cfg.data)
    interpolation = preprocessing_for(cfg).interpolation
    train_ds, val_ds = fold_datasets(prepared, 0, cfg.data, interpolation=interpolation)
    assert not set(train_ds.subjects) & set(val_ds.subjects)  # scored on unseen subjects
    return fit_fold(cfg, train_ds, val_ds, log=lambda _line: None)


def test_pretrained_lite0_learns_real_cells_and_beats_scratch(cnmc_root: Path):
    pretrained = _fit(cnmc_root)
    scratch = _fit(cnmc_root, "model.pretrained=false", "model.pretrained_path=")
    auc_p = max(h["val_auc"] for h in pretrained.history)
    auc_s = max(h["val_auc"] for h in scratch.history)
    print(f"best validation AUC: pretrained {auc_p:.3f}, scratch {auc_s:.3f}")
    assert auc_p >= AUC_MIN, f"pretrained lite0 reached only AUC {auc_p:.3f} on unseen subjects"
    assert auc_p >= auc_s + AUC_MARGIN, (
        f"pretrained AUC {auc_p:.3f} is not clearly above scratch {auc_s:.3f}")


AUC_MIN = 0.70     # measured 0.715 (0.765 before); chance is 0.5
AUC_MARGIN = 0.03  # measured +0.092 (+0.093 before)
