"""``python -m leuk_ray.predict --model ARTIFACT_DIR [--tta] [--out preds.csv] PATH...``

Classifies cell images with a saved ensemble (no Ray needed): one CSV row ``path,prob_all,pred``
per image, pred ``all`` or ``hem`` by the artifact's threshold. Folders are searched recursively
for image files; an image that cannot be decoded is reported on stderr and skipped.

Images are resized and normalised as the manifest's ``preprocessing`` says (the backbone's, what
training used; ``Ensemble.preprocessing``). On CUDA the models run channels_last under
``torch.inference_mode``, with bf16 (fp16 where bf16 is not native) autocast when the artifact's
``train.amp`` is on (``leuk_ray.engine.inference_settings``); on CPU in fp32.

    rows, skipped = predict_paths(load_artifact(dir), ["cells/"], tta=False, batch_size=64)
    rows = predict_images(ensemble, names, images_uint8_nhwc)   # already decoded and resized
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from leuk_ray.artifact import Ensemble, load_artifact
from leuk_ray.atomic import replacing
from leuk_ray.cli import run_main
from leuk_ray.data import IMAGE_EXTS, CellDataset, ImageDecodeError, read_image
from leuk_ray.data.decode import is_image_name
from leuk_ray.data.transforms import Preprocessing
from leuk_ray.errors import UserError

CHUNK = 512          # images decoded and predicted at a time (bounds memory for huge inputs)


class Prediction(NamedTuple):
    path: str
    prob_all: float
    pred: str


def find_images(paths: Sequence[str | Path]) -> list[str]:
    """Files as given, folders searched recursively for image files (sorted); duplicates dropped."""
    found: list[str] = []
    for arg in paths:
        p = Path(arg).expanduser()
        if p.is_dir():
            hits = sorted(str(q) for q in p.rglob("*") if q.is_file() and is_image_name(q.name))
            if not hits:
                raise UserError(f"{p}: no image files found in this folder or below (looked for "
                                f"{', '.join(IMAGE_EXTS)}); pass a folder of cell images")
            found += hits
        elif p.is_file():
            found.append(str(p))
        else:
            raise UserError(f"{p}: no such file or folder")
    out = list(dict.fromkeys(found))
    if not out:
        raise UserError("no images to predict: pass image files or folders")
    return out


def _why(e: ImageDecodeError, path: str) -> str:
    msg = str(e)
    return msg[len(path) + 2:] if msg.startswith(f"{path}: ") else msg


def _decode(paths: Sequence[str], prep: Preprocessing,
            threads: int) -> tuple[list[int], np.ndarray, list[tuple[str, str]]]:
    """(indices of the good paths, their images (n, size, size, 3) resized as ``prep`` says,
    [(bad path, why)])."""
    size = prep.image_size
    images = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    errors: dict[int, str] = {}

    def one(i: int) -> None:
        try:
            images[i] = read_image(paths[i], size, prep.interpolation)
        except ImageDecodeError as e:
            errors[i] = _why(e, paths[i])

    with ThreadPoolExecutor(max_workers=threads) as ex:
        list(ex.map(one, range(len(paths))))
    good = [i for i in range(len(paths)) if i not in errors]
    return good, images[good], [(paths[i], errors[i]) for i in sorted(errors)]


def predict_images(ensemble: Ensemble, names: Sequence[str], images: np.ndarray, *,
                   tta: bool = False, batch_size: int = 64,
                   device: str | None = None) -> list[Prediction]:
    """One row per image of ``images``, (n, size, size, 3) uint8 RGB already decoded and resized
    as ``ensemble.preprocessing`` says (``read_image`` / ``decode_resized``): normalised on the
    device, each fold model's P(ALL), the calibration's per-fold temperature and mean
    (``Ensemble.predict``), labelled by its threshold. ``predict_paths`` and ``leuk_ray.serve``
    both predict through here."""
    if len(names) != len(images):
        raise ValueError(f"predict_images: {len(names)} names for {len(images)} images")
    if not len(names):
        return []
    prep = ensemble.preprocessing
    ds = CellDataset(list(names), [-1] * len(names), prep.image_size, images=images,
                     interpolation=prep.interpolation)
    probs, _ = ensemble.predict(ds, tta=tta, batch_size=batch_size, device=device)
    return [Prediction(n, float(p), lab)
            for n, p, lab in zip(names, probs, ensemble.label(probs, tta=tta))]


def predict_paths(ensemble: Ensemble, paths: Sequence[str | Path], *, tta: bool = False,
                  batch_size: int = 64, device: str | None = None,
                  on_skip: Callable[[str, str], object] | None = None,
                  progress: Callable[[int, int], object] | None = None
                  ) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Predict every image under ``paths``: (rows in input order, [(skipped path, why)]).

    ``on_skip(path, why)`` is called as each undecodable image is met and ``progress(done,
    total)`` after each chunk of images. Images are decoded, resized and normalised as the
    artifact's manifest says (``ensemble.preprocessing``: the backbone's, from training).
    """
    ensemble.calibration_for(tta)  # an artifact calibrated without TTA refuses --tta up front
    files = find_images(paths)
    prep = ensemble.preprocessing
    threads = max(1, min(8, os.cpu_count() or 1))
    rows: list[Prediction] = []
    skipped: list[tuple[str, str]] = []
    for start in range(0, len(files), CHUNK):
        chunk = files[start:start + CHUNK]
        good, images, bad = _decode(chunk, prep, threads)
        for path, why in bad:
            if on_skip is not None:
                on_skip(path, why)
        skipped += bad
        if good:
            rows += predict_images(ensemble, [chunk[i] for i in good], images, tta=tta,
                                   batch_size=batch_size, device=device)
        if progress is not None:
            progress(min(start + CHUNK, len(files)), len(files))
    return rows, skipped


def write_csv(rows: Sequence[Prediction], out: str | Path) -> Path:
    """Write ``path,prob_all,pred`` atomically (temporary file, then rename)."""
    p = Path(out).expanduser()
    with replacing(p) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(Prediction._fields)
        for r in rows:
            w.writerow([r.path, f"{r.prob_all:.6f}", r.pred])
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m leuk_ray.predict", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Classify cell images (ALL vs HEM) with an ensemble artifact written by "
                    "leuk_ray.final; writes one CSV row path,prob_all,pred per image.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files or folders (searched recursively)")
    p.add_argument("--model", required=True, metavar="ARTIFACT_DIR",
                   help="ensemble artifact directory (holds manifest.json)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average over the 8 rotations/flips")
    p.add_argument("--out", default="preds.csv", metavar="CSV", help="output CSV file")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per batch")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run the models")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: use a positive number of images")
    start = time.perf_counter()
    ensemble = load_artifact(args.model, device=args.device)

    def on_skip(path: str, why: str) -> None:
        print(f"skipped {path}: {why}", file=sys.stderr, flush=True)

    def progress(done: int, total: int) -> None:
        if total > CHUNK:
            print(f"predicted {done}/{total} images ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)

    rows, skipped = predict_paths(ensemble, args.paths, tta=args.tta, batch_size=args.batch_size,
                                  on_skip=on_skip, progress=progress)
    if not rows:
        raise UserError(f"none of the {len(skipped)} image(s) could be decoded; no CSV written")
    out = write_csv(rows, args.out)
    n_all = sum(r.pred == "all" for r in rows)
    print(f"wrote {out}: {len(rows)} image(s) ({n_all} all, {len(rows) - n_all} hem; threshold "
          f"{ensemble.calibration_for(args.tta).threshold:.4f}, {len(ensemble.models)} fold "
          f"models on {ensemble.device}"
          f"{', TTA' if args.tta else ''}); skipped {len(skipped)} undecodable image(s)")
    return 0


if __name__ == "__main__":
    run_main(main)
