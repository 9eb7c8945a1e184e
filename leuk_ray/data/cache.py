"""Decode many images at once (threads; OpenCV releases the GIL) into one uint8 array."""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from typing import TYPE_CHECKING

from leuk_ray.config import DataConfig
from leuk_ray.data.decode import ImageDecodeError, read_image

if TYPE_CHECKING:
    from leuk_ray.data.prepare import PreparedData


def cache_bytes(n: int, size: int) -> int:
    """Memory of ``n`` decoded images at ``size`` px."""
    return n * size * size * 3


def fits_cache(n: int, size: int, cache_mb: int) -> bool:
    return cache_bytes(n, size) <= cache_mb * 2**20


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def decode_all(paths: Sequence[str], size: int,
               threads: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Decode ``paths`` to an (N, size, size, 3) uint8 array aligned with ``paths``.

    Undecodable files do not stop the build: their rows stay black and their paths are returned as
    the second element, so the caller drops them (see ``as_image_dict``).
    """
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    bad: list[str] = []

    def one(i: int) -> None:
        try:
            out[i] = read_image(paths[i], size)
        except ImageDecodeError:
            bad.append(paths[i])

    with ThreadPoolExecutor(max_workers=threads or default_threads()) as ex:
        list(ex.map(one, range(len(paths))))
    return out, sorted(bad)


def as_image_dict(paths: Sequence[str], images: np.ndarray,
                  bad: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """path -> decoded image (views into ``images``), leaving out the undecodable ``bad`` paths."""
    skip = set(bad)
    return {p: images[i] for i, p in enumerate(paths) if p not in skip}


def decode_dict(paths: Sequence[str], size: int,
                threads: int | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """``decode_all`` as the path -> image dict that ``fold_datasets`` takes, plus the bad paths."""
    images, bad = decode_all(paths, size, threads)
    return as_image_dict(paths, images, bad), bad


def image_cache(d: DataConfig, prepared: PreparedData) -> tuple[dict | None, list[str]]:
    """Decode every CV image once (data.cache: on, off, or auto = when it fits data.cache_mb)."""
    paths = prepared.train["path"].tolist()
    if d.cache == "off" or (d.cache == "auto" and not fits_cache(len(paths), d.image_size,
                                                                 d.cache_mb)):
        return None, []
    t0 = time.perf_counter()
    images, bad = decode_dict(paths, d.image_size)
    print(f"decoded {len(paths)} images into the cache in {time.perf_counter() - t0:.1f}s",
          flush=True)
    return images, bad
