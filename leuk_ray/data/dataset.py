"""The torch Dataset of cell images (uint8 HWC tensors; layout and normalisation on the device)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from leuk_ray.config import DataConfig
from leuk_ray.data.cache import CachedImages
from leuk_ray.data.decode import DEFAULT_INTERPOLATION, read_image
from leuk_ray.data.prepare import PreparedData, fold_frames
from leuk_ray.data.transforms import eval_transform, train_transform


class CellDataset(torch.utils.data.Dataset):
    """Images with labels; decoded per item, or taken from pre-decoded ``images``.

    ``images`` is an (N, size, size, 3) uint8 array or a sequence of such arrays aligned with
    ``paths`` (e.g. ``CachedRows``, rows of the node's memory-mapped cache); a ``None`` entry is
    decoded on demand, resized with ``interpolation`` (the backbone's, ``preprocessing_for(cfg)``).
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], size: int, transform=None,
                 subjects: Sequence[str] | None = None,
                 images: np.ndarray | Sequence[np.ndarray | None] | None = None,
                 interpolation: str = DEFAULT_INTERPOLATION) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.subjects = [str(s) for s in subjects] if subjects is not None else [""] * len(self.paths)
        if not len(self.labels) == len(self.paths) == len(self.subjects):
            raise ValueError("paths, labels and subjects must have the same length")
        if images is not None and len(images) != len(self.paths):
            raise ValueError(f"images has {len(images)} entries for {len(self.paths)} paths")
        self.size = size
        self.interpolation = interpolation
        self.transform = transform
        self.images = images
        self._seeded_worker: int | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def _reseed(self) -> None:
        # A seeded Compose is copied into every DataLoader worker: give each worker (and each
        # epoch, as torch draws a new base seed) its own stream, still reproducible from torch's seed.
        info = torch.utils.data.get_worker_info()
        if info is None or self._seeded_worker == info.seed:
            return
        self._seeded_worker = info.seed
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(info.seed % 2**32)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i] if self.images is not None else None
        if img is None:
            img = read_image(self.paths[i], self.size, self.interpolation)
        if self.transform is not None:
            self._reseed()
            img = self.transform(image=img)["image"]
        # HWC as it is: no per-image CHW copy on the CPU (to_model_input permutes on the device).
        # Rows of the read-only memory-mapped cache are copied (a writable tensor for collate).
        return torch.from_numpy(np.require(img, np.uint8, ["C", "W"])), int(self.labels[i])


def frame_dataset(df: pd.DataFrame, size: int, transform=None,
                  images: Mapping[str, np.ndarray] | None = None,
                  interpolation: str = DEFAULT_INTERPOLATION) -> CellDataset:
    """A CellDataset over the rows of an index/fold frame (path, label, subject).

    ``images`` from ``image_cache`` (a ``CachedImages``) is kept as row numbers into its shared
    array, so neither building nor pickling the dataset copies the images."""
    if isinstance(images, CachedImages):
        cached = images.rows(df["path"].tolist())
    else:
        cached = [images.get(p) for p in df["path"]] if images is not None else None
    return CellDataset(df["path"].tolist(), df["label"].tolist(), size, transform,
                       subjects=df["subject"].tolist(), images=cached, interpolation=interpolation)


def fold_datasets(p: PreparedData, fold: int, dcfg: DataConfig,
                  images: Mapping[str, np.ndarray] | None = None,
                  bad: Sequence[str] = (), seed: int | None = None,
                  interpolation: str = DEFAULT_INTERPOLATION
                  ) -> tuple[CellDataset, CellDataset]:
    """(train with ``train_transform(dcfg.augment)``, val with ``eval_transform``) of ``fold``.

    ``images`` maps path -> decoded (size, size, 3) image (a dict, or the ``CachedImages`` of
    ``image_cache``: the node's memory-mapped cache); paths missing from it are decoded per item
    with ``interpolation`` (the backbone's, ``preprocessing_for(cfg).interpolation``, as given to
    ``image_cache``). Rows in ``bad`` (undecodable, from ``decode_all``) are dropped, with a note
    in ``p.warnings``.
    """
    train, val = fold_frames(p, fold)
    if bad:
        skip = set(bad)
        n = int(train["path"].isin(skip).sum() + val["path"].isin(skip).sum())
        train, val = train[~train["path"].isin(skip)], val[~val["path"].isin(skip)]
        note = (f"{len(skip)} undecodable image(s) left out of training and validation, e.g. "
                f"{', '.join(sorted(skip)[:3])}")
        if n and note not in p.warnings:
            p.warnings.append(note)
    size, interp = dcfg.image_size, interpolation
    return (frame_dataset(train, size, train_transform(dcfg.augment, size, seed, interp), images,
                          interp),
            frame_dataset(val, size, eval_transform(size, interp), images, interp))
