"""A synthetic C-NMC-like demo set: segmented cells on black, learnable by a small CNN.

ALL (blast) cells: large, dark purple, irregular nucleus filling most of the cell. HEM (normal)
cells: smaller, rounder, lighter nucleus with more cytoplasm. Each subject has its own stain tint,
so subject-grouped folds matter here as they do on the real data.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np

from leuk_ray.errors import UserError

MARKER = ".leuk_ray_synth.json"
TRAIN_SUBJECTS = {1: [str(s) for s in range(101, 107)], 0: [f"H{s}" for s in range(101, 107)]}
TEST_SUBJECTS = {1: ["107", "108"], 0: ["H107", "H108"]}


def _blob(h: int, cx: float, cy: float, r: float, wobble: float, rng: np.random.Generator
          ) -> np.ndarray:
    """Boolean mask of a star-shaped blob: radius r * (1 + sum of random low harmonics)."""
    yy, xx = np.mgrid[0:h, 0:h].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    theta = np.arctan2(dy, dx)
    radius = np.ones_like(theta)
    for k in range(2, 7):
        radius += wobble * rng.uniform(0.2, 1.0) / (k - 1) ** 0.5 * np.cos(k * theta +
                                                                           rng.uniform(0, 2 * np.pi))
    return np.hypot(dx, dy) <= r * radius


def draw_cell(label: int, size: int, rng: np.random.Generator,
              tint: np.ndarray | None = None) -> np.ndarray:
    """One (size, size, 3) uint8 RGB cell; label 1 = ALL, 0 = HEM."""
    tint = np.zeros(3) if tint is None else tint
    cx, cy = size / 2 + rng.normal(0, 0.05 * size, 2)
    r_cell = size * rng.uniform(0.30, 0.40)
    if label == 1:
        ratio, wobble = rng.uniform(0.60, 0.82), rng.uniform(0.06, 0.18)
        nucleus_rgb = np.array([90, 45, 125]) + rng.normal(0, 12, 3)
    else:
        ratio, wobble = rng.uniform(0.42, 0.64), rng.uniform(0.0, 0.07)
        nucleus_rgb = np.array([135, 90, 165]) + rng.normal(0, 12, 3)
    cyto_rgb = np.array([205, 175, 215]) + rng.normal(0, 8, 3)
    cell = _blob(size, cx, cy, r_cell, 0.03, rng)
    ncx, ncy = np.array([cx, cy]) + rng.normal(0, 0.04 * r_cell, 2)
    nucleus = _blob(size, ncx, ncy, r_cell * ratio, wobble, rng) & cell
    img = np.zeros((size, size, 3), np.float32)
    img[cell] = cyto_rgb + tint
    img[nucleus] = nucleus_rgb + tint
    texture = cv2.GaussianBlur(rng.normal(0, 10, (size, size)).astype(np.float32), (0, 0), 1.5)
    img[cell] += texture[cell, None]
    img = cv2.GaussianBlur(img, (0, 0), 0.8)
    img[cell] += rng.normal(0, 4, (int(cell.sum()), 3))
    img[~cell] = 0
    return np.clip(img, 0, 255).astype(np.uint8)


def _plan(n: int) -> list[tuple[str, int, str]]:
    """(split, label, subject) for each of n images: ~1/6 test, classes balanced, subjects cycled."""
    n_test = max(4, n // 6)
    out = []
    for split, count, subjects in (("train", n - n_test, TRAIN_SUBJECTS), ("test", n_test,
                                                                           TEST_SUBJECTS)):
        for i in range(count):
            label = i % 2
            subs = subjects[label]
            out.append((split, label, subs[(i // 2) % len(subs)]))
    return out


def make_synthetic(out_dir: str | Path, n: int = 240, size: int = 128, seed: int = 0,
                   ext: str = ".bmp") -> Path:
    """Write ``n`` synthetic cells in the seed layout (train/ and test/, disjoint subjects).

    Idempotent: a folder this function filled with the same arguments is left as it is; one it
    filled with other arguments is rewritten; any other non-empty folder is refused.
    """
    if n < 16:
        raise UserError(f"synth --n {n}: too few images; use at least 16 (one per subject)")
    if size < 16:
        raise UserError(f"synth --size {size}: use at least 16 pixels")
    out = Path(out_dir).expanduser()
    params = {"n": n, "size": size, "seed": seed, "ext": ext, "version": 1}
    marker = out / MARKER
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            raise UserError(f"{out}: folder is not empty and was not written by synth; choose a new "
                            "or empty folder")
        if json.loads(marker.read_text()) == params:
            return out
        for d in ("train", "test"):
            shutil.rmtree(out / d, ignore_errors=True)
    rng = np.random.default_rng(seed)
    tints = {s: rng.normal(0, 12, 3) for subs in (TRAIN_SUBJECTS, TEST_SUBJECTS)
             for lab in (0, 1) for s in subs[lab]}
    counters: dict[str, int] = {}
    for split, label, subject in _plan(n):
        cls = "all" if label == 1 else "hem"
        d = out / split / cls
        d.mkdir(parents=True, exist_ok=True)
        counters[subject] = k = counters.get(subject, 0) + 1
        img = draw_cell(label, size, rng, tints[subject])
        name = f"UID_{subject}_{(k - 1) // 3 + 1}_{(k - 1) % 3 + 1}_{cls}{ext}"
        if not cv2.imwrite(str(d / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
            raise UserError(f"{d / name}: cannot write image")
    marker.write_text(json.dumps(params))
    return out


def demo_data(root: str | Path | None = None, seed: int = 0) -> Path:
    """The ``--demo`` data set of the commands: ``make_synthetic`` into ``root`` (default
    ``<tmp>/leuk_ray_demo_<seed>``) unless it is already there, written to a temporary folder
    first, so an interrupted run never leaves half a data set that a later one would take."""
    import os
    import tempfile

    root = Path(root) if root is not None else \
        Path(tempfile.gettempdir()) / f"leuk_ray_demo_{seed}"
    if (root / MARKER).is_file():  # written by make_synthetic: reused as it is (or refreshed)
        return make_synthetic(root, seed=seed)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"{root}: exists and is not a demo data set written by leuk-ray; move it "
                        "away or choose another folder")
    print(f"generating the synthetic demo set in {root} ...", flush=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp", dir=root.parent))
    try:
        make_synthetic(tmp, seed=seed)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
