"""From a DataConfig to audited CV folds and a held-out test set (``prepare_data``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from leuk_ray.config import DataConfig
from leuk_ray.data.index import IndexResult, build_index
from leuk_ray.data.splits import (audit_split, holdout_assign, holdout_warning, kfold_assign,
                                  link_groups, official_assign)
from leuk_ray.errors import UserError

TEST_SPLITS = ("test", "prelim")


@dataclass
class PreparedData:
    layout: str
    train: pd.DataFrame          # CV rows; column `fold` = the fold in which the row is validation
                                 # (holdout: val rows fold 0, train rows fold -1)
    test: pd.DataFrame | None    # labelled held-out test rows (seed test/, Kaggle prelim, holdout test)
    n_folds: int                 # k (holdout: 1)
    warnings: list[str] = field(default_factory=list)  # also written into each run's outputs
    grouped_by_subject: bool = True
    root: str = ""
    bad_files: list[tuple[str, str]] = field(default_factory=list)


def sample_images(df: pd.DataFrame, max_images: int, seed: int) -> pd.DataFrame:
    """A seeded sample of about ``max_images`` rows, proportional per (label, subject), keeping at
    least one image of every subject."""
    if max_images <= 0 or len(df) <= max_images:
        return df
    cells = df.groupby(["label", "subject"], sort=True).indices
    keys = list(cells)
    sizes = np.array([len(cells[k]) for k in keys])
    exact = sizes * max_images / len(df)
    quota = np.maximum(1, np.floor(exact)).astype(int)
    spare = max_images - quota.sum()
    if spare > 0:  # largest remainders first, never above a cell's size
        for i in np.argsort(-(exact - np.floor(exact)), kind="stable")[:spare]:
            quota[i] = min(sizes[i], quota[i] + 1)
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.choice(cells[k], size=q, replace=False) for k, q in zip(keys, quota)])
    return df.iloc[np.sort(keep)].reset_index(drop=True)


def split_frames(ix: IndexResult, dcfg: DataConfig) -> PreparedData:
    """Assign folds (no leakage audit; see ``prepare_data``)."""
    df = ix.df
    warnings = list(ix.warnings)
    labelled = df[df["label"] >= 0]
    is_test = labelled["split"].isin(TEST_SPLITS)
    pool = labelled[~is_test].reset_index(drop=True)
    test = labelled[is_test].reset_index(drop=True)
    labels = set(pool["label"])
    if labels != {0, 1}:
        have = "ALL" if 1 in labels else "HEM" if 0 in labels else "no"
        skipped = (f"; {len(ix.bad_files)} unusable file(s) were skipped, e.g. "
                   f"{ix.bad_files[0][0]} ({ix.bad_files[0][1]})") if ix.bad_files else ""
        raise UserError(f"{ix.root}: the training images are all of one class ({have} only, "
                        f"{len(pool)} image(s)); both ALL and HEM are needed{skipped}")
    if dcfg.max_images and len(pool) > dcfg.max_images:
        pool = sample_images(pool, dcfg.max_images, dcfg.seed)
        n_subj = pool["subject"].nunique()
        if len(pool) > dcfg.max_images:
            warnings.append(f"data.max_images = {dcfg.max_images}: kept {len(pool)} images to keep "
                            f"one image of each of the {n_subj} subjects")
    no_subject = int((pool["subject"] == "").sum())
    grouped = no_subject < len(pool)
    if not grouped:
        warnings.append(f"WARNING: no subject id could be parsed from any of the {len(pool)} training "
                        "file names (C-NMC names look like UID_11_10_1_all.bmp): folds are split "
                        "image by image, so images of one patient can sit in train and validation "
                        "and the scores are optimistic")
    elif no_subject:
        warnings.append(f"WARNING: {no_subject} of {len(pool)} training images have no subject id "
                        "in their name; each is treated as its own subject")
    pool = pool.assign(group=link_groups(pool, by_subject=grouped))
    n_folds = dcfg.folds
    if dcfg.split == "kfold":
        pool["fold"] = kfold_assign(pool, dcfg.folds, dcfg.seed, grouped=grouped)
    elif dcfg.split == "official":
        pool["fold"], moved = official_assign(pool, ix.layout, ix.root, grouped=grouped)
        warnings += moved
        n_folds = 3
    elif dcfg.split == "holdout":
        part = holdout_assign(pool, list(dcfg.holdout), dcfg.seed, grouped=grouped)
        off = holdout_warning(part, list(dcfg.holdout), grouped)
        if off:
            warnings.append(off)
        carved = pool[part == 2].drop(columns="group").assign(split="holdout_test")
        test = pd.concat([carved, test], ignore_index=True)
        pool = pool[part < 2].reset_index(drop=True)
        pool["fold"] = np.where(part[part < 2] == 1, 0, -1)
        n_folds = 1
    else:
        raise UserError(f"data.split = {dcfg.split!r}: use kfold, official or holdout")
    for f in range(n_folds):
        val_labels = set(pool.loc[pool["fold"] == f, "label"])
        if val_labels != {0, 1}:
            warnings.append(f"fold {f}: the validation rows hold only "
                            f"{'ALL' if 1 in val_labels else 'HEM'} images (too few subjects); "
                            "its AUC is undefined")
    return PreparedData(ix.layout, pool, test if len(test) else None, n_folds, warnings, grouped,
                        ix.root, ix.bad_files)


def fold_frames(p: PreparedData, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows, validation rows) of ``fold``."""
    if not 0 <= fold < p.n_folds:
        raise ValueError(f"fold {fold} out of range 0..{p.n_folds - 1}")
    is_val = (p.train["fold"] == fold).to_numpy()
    return p.train[~is_val].reset_index(drop=True), p.train[is_val].reset_index(drop=True)


def audit_prepared(p: PreparedData) -> None:
    """Refuse any fold, and the test set, sharing a subject or an image content with training."""
    for f in range(p.n_folds):
        tr, va = fold_frames(p, f)
        audit_split(tr, va, f"{p.root}: fold {f} (train vs validation)")
    if p.test is not None:
        audit_split(p.train, p.test, f"{p.root}: test set vs training/validation images")


def prepare_data(dcfg: DataConfig) -> PreparedData:
    """Index ``dcfg.root``, sample (``max_images``), split (kfold/official/holdout) and audit."""
    ix = build_index(dcfg.root, max_bad_fraction=dcfg.max_bad_fraction)
    p = split_frames(ix, dcfg)
    audit_prepared(p)
    return p
