"""The node-level cache of decoded images: one memory-mapped ``.npy`` per data set and image size.

    images, bad = image_cache(cfg.data, prepared)   # path -> (size, size, 3) uint8, or None
    train_ds, val_ds = fold_datasets(prepared, fold, cfg.data, images=images, bad=bad)

Every image of the CV set is decoded and resized once per node into
``<cache dir>/images/<key>.npy``, an (N, size, size, 3) uint8 array (``<cache dir>`` is
``$LEUK_RAY_CACHE_DIR`` or ``~/.cache/leuk_ray``). ``<key>`` is a digest of the sorted paths with
their size and mtime, the image size, the interpolation (the backbone's, see
``leuk_ray.data.transforms.preprocessing_for``) and ``DECODER_VERSION``: a changed file, another
size or interpolation or a new decoder makes a new file. A sidecar ``<key>.json`` lists the row
order (sorted paths) and the paths that could not be decoded (their rows stay black; callers drop
them).

Built once, by whoever comes first: it takes an exclusive ``fcntl.flock`` on ``<key>.lock``, decodes
into a temporary file with threads (OpenCV releases the GIL), fsyncs it, ``os.replace``s it into
place and writes the sidecar last (the sidecar is the "ready" mark). Everyone else waits on the lock
and then opens the file with ``np.load(mmap_mode="r")``; a later trial, the final job or
``python -m leuk_ray.train`` finds it ready and decodes nothing.

Why a memory-mapped file and not the Ray object store:
- One copy in RAM per node either way: the OS page cache holds the file once and every reader
  (fold workers of every trial, their DataLoader workers) maps the same pages, zero-copy, read-only
  -- the same property plasma gives ``ray.get`` of a numpy array on one node.
- It outlives any process. An object in the store belongs to the process that put it (a trial's
  driver or a worker): when that trial ends, the object goes, and the next trial decodes again unless
  a detached actor is kept alive to own it. The file survives trials, Ray restarts and runs without
  Ray (``leuk_ray.train``, predict), and the data layer stays free of ``ray`` (DESIGN.md's rule).
- The object store is sized at start-up (30% of RAM by default) and shared with Ray's own traffic
  (checkpoints, results); a multi-GiB image array there spills to disk or evicts other objects. The
  page cache gives back memory under pressure and refills from the local file.
- Measured on this 2-core machine (``bench/cache_store.py``, 300 real images at 300 px, 77 MiB;
  ``bench/RESULTS.md``): build the file 0.8 s (the decode, once per node, ever); open it and touch
  every page in a new process 4 ms. Object store: ``ray.put`` 297 ms (a copy into plasma, again for
  every new owner), a task's ``ray.get`` + touch 8 ms (zero-copy too) -- and a running Ray first.

Pickling: a plain ``np.memmap`` pickles its whole content (checked: 1,000,163 bytes for a 1 MB
memmap), so ``MappedArray`` pickles as its file name and ``CachedRows`` as that plus row numbers (a
64-image dataset at 300 px pickles to 14 kB, not 17 MB). DataLoader workers -- fork, spawn and
forkserver all checked -- and Ray tasks reopen the same file instead of copying it.

Bounded by ``data.cache_mb`` (the file's size). With ``data.cache = auto`` an over-budget data set is
decoded per item, every epoch; with ``on`` the file is built anyway (it is on disk; the page cache
keeps what fits). When the cache directory cannot be written (or lacks the space), every worker
decodes into its own memory as before. Each fallback prints one line saying why.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from leuk_ray.atomic import replacing
from leuk_ray.config import DataConfig
from leuk_ray.data.decode import DEFAULT_INTERPOLATION, ImageDecodeError, read_image
from leuk_ray.data.index import cache_dir

if TYPE_CHECKING:
    from leuk_ray.data.prepare import PreparedData

DECODER_VERSION = 2  # bump when read_image's output changes: old cache files are then not used
# 2: resized with the backbone's interpolation (bicubic for most), not always INTER_AREA
DECODE_COUNT = 0     # images decoded into caches by this process (tests check reuse with it)


def cache_bytes(n: int, size: int) -> int:
    """Memory of ``n`` decoded images at ``size`` px."""
    return n * size * size * 3


def fits_cache(n: int, size: int, cache_mb: int) -> bool:
    return cache_bytes(n, size) <= cache_mb * 2**20


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def image_cache_dir() -> Path:
    """Where node cache files live: ``$LEUK_RAY_CACHE_DIR/images`` or ``~/.cache/leuk_ray/images``."""
    return cache_dir() / "images"


# ------------------------------------------------------------------------------------ decoding
def decode_into(out: np.ndarray, paths: Sequence[str], size: int, threads: int | None = None,
                interpolation: str = DEFAULT_INTERPOLATION) -> list[str]:
    """Decode ``paths`` into the rows of ``out`` (N, size, size, 3); returns the undecodable paths
    (their rows are left as they were: zeros in a fresh array)."""
    global DECODE_COUNT
    bad: list[str] = []

    def one(i: int) -> None:
        try:
            out[i] = read_image(paths[i], size, interpolation)
        except ImageDecodeError:
            bad.append(paths[i])

    with ThreadPoolExecutor(max_workers=threads or default_threads()) as ex:
        list(ex.map(one, range(len(paths))))
    DECODE_COUNT += len(paths)
    return sorted(bad)


def decode_all(paths: Sequence[str], size: int, threads: int | None = None,
               interpolation: str = DEFAULT_INTERPOLATION) -> tuple[np.ndarray, list[str]]:
    """Decode ``paths`` to an (N, size, size, 3) uint8 array aligned with ``paths``.

    Undecodable files do not stop the build: their rows stay black and their paths are returned as
    the second element, so the caller drops them (see ``as_image_dict``).
    """
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    return out, decode_into(out, paths, size, threads, interpolation)


def as_image_dict(paths: Sequence[str], images: np.ndarray,
                  bad: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """path -> decoded image (views into ``images``), leaving out the undecodable ``bad`` paths."""
    skip = set(bad)
    return {p: images[i] for i, p in enumerate(paths) if p not in skip}


def decode_dict(paths: Sequence[str], size: int, threads: int | None = None,
                interpolation: str = DEFAULT_INTERPOLATION
                ) -> tuple[dict[str, np.ndarray], list[str]]:
    """``decode_all`` as the path -> image dict that ``fold_datasets`` takes, plus the bad paths."""
    images, bad = decode_all(paths, size, threads, interpolation)
    return as_image_dict(paths, images, bad), bad


# ------------------------------------------------------------------------- the mapped image set
class MappedArray:
    """A read-only ``np.load(mmap_mode="r")`` array that pickles as its file name.

    Unpickled in another process (a DataLoader worker, a Ray task) it maps the same file again, so
    the pages are shared through the OS page cache and nothing is copied.
    """

    def __init__(self, path: str | Path, array: np.ndarray | None = None) -> None:
        self.path = str(path)
        self._array = array

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):
        return self.array[i]

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path, self._array = state["path"], None


class CachedImages(Mapping):
    """path -> (size, size, 3) uint8 view of one row of ``store`` (a ``MappedArray`` or an
    in-memory array), leaving out the undecodable ``bad`` paths. Indexing never copies the array."""

    def __init__(self, store: MappedArray | np.ndarray, paths: Sequence[str],
                 bad: Sequence[str] = (), source: str = "memory") -> None:
        skip = set(bad)
        self.store = store
        self.row = {p: i for i, p in enumerate(paths) if p not in skip}
        self.source = source  # "node cache <file>" or "memory"

    def __getitem__(self, path: str) -> np.ndarray:
        return self.store[self.row[path]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.row)

    def __len__(self) -> int:
        return len(self.row)

    def rows(self, paths: Sequence[str]) -> CachedRows:
        """The images of ``paths`` as a sequence aligned with them (None where not cached)."""
        return CachedRows(self.store, [self.row.get(str(p), -1) for p in paths])


class CachedRows(Sequence):
    """``store`` rows in a given order: item i is ``store[rows[i]]``, or None for row -1 (decoded on
    demand by ``CellDataset``). Pickles as the store (its file name) and the row numbers."""

    def __init__(self, store: MappedArray | np.ndarray, rows: Sequence[int]) -> None:
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray | None:  # type: ignore[override]
        r = int(self.rows[i])
        return None if r < 0 else self.store[r]


# ------------------------------------------------------------------------------- the node cache
def cache_key(paths: Sequence[str], size: int,
              interpolation: str = DEFAULT_INTERPOLATION) -> str:
    """Digest of the sorted paths with size and mtime, the image size, the interpolation and the
    decoder version."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"leuk-ray images v{DECODER_VERSION} size {size} {interpolation}\n".encode())
    for p in sorted(paths):
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # blocks while another process builds
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _open_ready(npy: Path, meta: Path, size: int,
                interpolation: str) -> tuple[CachedImages, list[str]] | None:
    """The cache at ``npy`` if its sidecar says it is complete and the shapes agree, else None."""
    try:
        side = json.loads(meta.read_text())
        arr = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    paths, bad = side.get("paths", []), side.get("bad", [])
    if side.get("decoder_version") != DECODER_VERSION or arr.shape != (len(paths), size, size, 3) \
            or arr.dtype != np.uint8 or side.get("interpolation") != interpolation:
        return None
    return CachedImages(MappedArray(npy, arr), paths, bad, source=f"node cache {npy}"), list(bad)


def _build(npy: Path, meta: Path, paths: list[str], size: int, threads: int | None,
           interpolation: str) -> None:
    """Decode into a temporary file beside ``npy``, fsync, rename; then the sidecar (the mark)."""
    with replacing(npy, fsync=True) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(paths), size, size, 3))
        bad = decode_into(arr, paths, size, threads, interpolation)
        arr.flush()
        del arr
    side = {"decoder_version": DECODER_VERSION, "image_size": size,
            "interpolation": interpolation, "paths": paths, "bad": bad,
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    with replacing(meta, fsync=True) as tmp:
        tmp.write_bytes(json.dumps(side).encode())


def node_cache(paths: Sequence[str], size: int, directory: str | Path | None = None,
               threads: int | None = None, interpolation: str = DEFAULT_INTERPOLATION
               ) -> tuple[CachedImages, list[str], bool]:
    """Open (or build, once per node) the memory-mapped cache of ``paths`` at ``size`` px, resized
    with ``interpolation``.

    Returns (images, bad paths, built: whether this call decoded). Raises OSError when the directory
    cannot be created or written, or has too little free space.
    """
    d = Path(directory) if directory is not None else image_cache_dir()
    order = sorted({str(p) for p in paths})
    key = cache_key(order, size, interpolation)
    npy, meta, lock = d / f"{key}.npy", d / f"{key}.json", d / f"{key}.lock"
    ready = _open_ready(npy, meta, size, interpolation)
    if ready is not None:
        return (*ready, False)
    d.mkdir(parents=True, exist_ok=True)
    with _exclusive(lock):
        ready = _open_ready(npy, meta, size, interpolation)  # built while we waited for the lock
        if ready is not None:
            return (*ready, False)
        need = cache_bytes(len(order), size) + 2**20
        free = shutil.disk_usage(d).free
        if free < need:
            raise OSError(errno.ENOSPC, f"{need / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB "
                          "free", str(d))
        _build(npy, meta, order, size, threads, interpolation)
    ready = _open_ready(npy, meta, size, interpolation)
    if ready is None:
        raise OSError(errno.EIO, "cache file unreadable right after writing it", str(npy))
    return (*ready, True)


def image_cache(d: DataConfig, prepared: PreparedData, interpolation: str = DEFAULT_INTERPOLATION
                ) -> tuple[CachedImages | None, list[str]]:
    """The decoded CV images for ``fold_datasets``, resized with ``interpolation`` (the backbone's:
    ``preprocessing_for(cfg).interpolation``) (data.cache: on, off, or auto = when the file
    fits data.cache_mb): the node's shared memory-mapped cache, or a per-process decode when the
    cache directory cannot be written, or None (decode per item) when off or over budget."""
    paths = prepared.train["path"].tolist()
    if d.cache == "off" or not paths:
        return None, []
    size, mb = d.image_size, cache_bytes(len(paths), d.image_size) / 2**20
    if not fits_cache(len(paths), size, d.cache_mb):
        if d.cache == "auto":
            print(f"image cache off: {len(paths)} images at {size} px need {mb:.0f} MiB, over "
                  f"data.cache_mb = {d.cache_mb}; decoding every image every epoch (raise "
                  "data.cache_mb or set data.cache=on)", flush=True)
            return None, []
        print(f"image cache: {mb:.0f} MiB is over data.cache_mb = {d.cache_mb}, built anyway "
              "(data.cache = on); the page cache keeps what fits in RAM", flush=True)
    t0 = time.perf_counter()
    try:
        images, bad, built = node_cache(paths, size, interpolation=interpolation)
    except OSError as e:
        where = e.filename or image_cache_dir()
        print(f"image cache: cannot use the node cache in {where} ({e.strerror or e}); decoding "
              f"{len(paths)} images into this process's memory instead (set LEUK_RAY_CACHE_DIR to "
              "a writable local disk)", flush=True)
        arr, bad = decode_all(paths, size, interpolation=interpolation)
        return CachedImages(arr, paths, bad), bad
    how = "decoded" if built else "opened"
    print(f"image cache: {how} {len(paths)} images ({mb:.0f} MiB, {images.source}) in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    return images, bad
