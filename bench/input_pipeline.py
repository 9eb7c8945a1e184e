"""Input pipeline, images/s on ONE core: seed-000 style vs leuk-ray's, same augmentations.

Runs on the CPU at small size: the first 300 training images of the real C-NMC sample
(../shared/data/cnmc, 450x450), 300 px, train_transform("seed000") in both pipelines.

- seed style: every sample decoded from disk (cv2, the 450x450 file), resized to 300 px,
  albumentations on uint8, then A.Normalize (float on the CPU) and a CHW float tensor.
  Timed on the sample's PNGs and on the same images saved as BMP (seed 000's format).
- leuk-ray: the image from the node's memory-mapped cache (leuk_ray.data.cache.node_cache, built
  beforehand, not timed), the same albumentations on uint8, an HWC uint8 tensor (CellDataset).
  Normalisation happens on the device (to_model_input); its CPU cost is reported separately.

    python bench/input_pipeline.py [--data DIR] [--n 300] [--size 300] [--passes 5]
Last line: the ratio leuk-ray / seed style (BMP), images/s per core.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from leuk_ray.data.cache import node_cache  # noqa: E402
from leuk_ray.data.dataset import CellDataset  # noqa: E402
from leuk_ray.data.transforms import (resolve_preprocessing, to_model_input,  # noqa: E402
                                      train_transform)


def rates(fns: dict, n: int, passes: int) -> dict[str, float]:
    """Images/s of each pipeline, best of ``passes``; the pipelines take turns within every pass,
    so a noisy neighbour slows them alike instead of skewing the ratios."""
    best = dict.fromkeys(fns, 0.0)
    for _ in range(passes):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for i in range(n):
                fn(i)
            best[name] = max(best[name], n / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cnmc"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--size", type=int, default=300)
    ap.add_argument("--passes", type=int, default=5)
    a = ap.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    files = sorted(str(p) for p in Path(a.data, "train").rglob("*") if p.suffix.lower() in
                   (".png", ".bmp", ".jpg", ".tif"))[:a.n]
    n, size = len(files), a.size
    shape = cv2.imread(files[0]).shape
    print(f"CPU benchmark, one core (OMP/cv2/torch threads = 1), small size: {n} real C-NMC "
          f"images ({shape[1]}x{shape[0]}) from {a.data}, {size} px, augment seed000, "
          f"best of {a.passes} passes")
    tmp = Path(tempfile.mkdtemp(prefix="leuk_bench_"))
    bmps = []
    for i, f in enumerate(files):
        b = tmp / f"{i:04d}.bmp"
        cv2.imwrite(str(b), cv2.imread(f, cv2.IMREAD_COLOR))
        bmps.append(str(b))

    aug = train_transform("seed000", size, seed=0)
    norm = A.Normalize()  # ImageNet mean/std, float32, on the CPU (seed 000)
    # seed 000's own ops, for reference: its rot90/flips where leuk-ray draws the same group with D4
    seed_aug = A.Compose([A.RandomRotate90(p=1.0), A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5),
                          *aug.transforms[1:]], seed=0)

    def seed_style(paths, augment=aug):
        def one(i):
            img = cv2.cvtColor(cv2.imread(paths[i], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
            img = augment(image=img)["image"]
            img = norm(image=img)["image"]
            return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return one

    t0 = time.perf_counter()
    images, bad, built = node_cache(files, size, directory=tmp / "cache", threads=1)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again, _, _ = node_cache(files, size, directory=tmp / "cache")
    open_s = time.perf_counter() - t0
    ds = CellDataset(files, [0] * n, size, train_transform("seed000", size, seed=0),
                     images=images.rows(files))

    def decode_only(i):
        img = cv2.cvtColor(cv2.imread(bmps[i], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)

    r = rates({
        "seed_png": seed_style(files), "seed_bmp": seed_style(bmps),
        "seed_own": seed_style(bmps, seed_aug), "ours": lambda i: ds[i],
        "aug_only": lambda i: aug(image=images[files[i]])["image"], "dec": decode_only,
        "float_norm": lambda i: norm(image=images[files[i]])["image"],
    }, n, a.passes)
    seed_png, seed_bmp, seed_own, ours = r["seed_png"], r["seed_bmp"], r["seed_own"], r["ours"]
    aug_only, dec, float_norm = r["aug_only"], r["dec"], r["float_norm"]
    batch = torch.stack([ds[i][0] for i in range(32)])
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        to_model_input(batch, "cpu", prep=resolve_preprocessing("efficientnet_b3", size))
    dev_norm = reps * 32 / (time.perf_counter() - t0)

    print(f"node cache: built in {build_s:.2f}s (decode + resize + write, 1 thread, "
          f"{n * size * size * 3 / 2**20:.0f} MiB), reopened in {open_s * 1000:.1f} ms")
    print(f"seed style, PNG files:  {seed_png:7.0f} images/s per core")
    print(f"seed style, BMP files:  {seed_bmp:7.0f} images/s per core")
    print(f"seed style, BMP, seed 000's own rot90+flips: {seed_own:7.0f} images/s per core")
    print(f"leuk-ray (cache+uint8): {ours:7.0f} images/s per core")
    print(f"  parts: augmentations alone {aug_only:.0f}/s; decode+resize BMP alone {dec:.0f}/s; "
          f"A.Normalize alone {float_norm:.0f}/s; "
          f"to_model_input on CPU tensors (what the GPU does instead) {dev_norm:.0f}/s")
    print(f"  vs PNG seed style: {ours / seed_png:.2f}x; vs BMP seed style with seed 000's own "
          f"rot90+flips: {ours / seed_own:.2f}x")
    print(f"input pipeline ratio (leuk-ray / seed style BMP, images/s per core): "
          f"{ours / seed_bmp:.2f}x")


if __name__ == "__main__":
    main()
