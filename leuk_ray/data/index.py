"""The image index: one row per usable image (path, label, subject, split, hash), bad files set aside.

``hash`` is a digest of the decoded RGB uint8 pixels and their shape, not of the file's bytes, so a
copy re-encoded (BMP -> PNG, another compression level) or re-saved with other metadata is found as
the same content. Decoding also finds files that pass the byte checks but do not decode. Every image
is decoded once (threads; OpenCV and hashlib release the GIL); the digests are kept in a small
per-root cache file keyed by (path, size, mtime_ns) under ``$LEUK_RAY_CACHE_DIR`` or
``~/.cache/leuk_ray``, so re-indexing 100k files costs a ``stat`` each. The data folder itself is
never written (it may be read-only).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from leuk_ray.atomic import replacing
from leuk_ray.data.decode import decode_bytes, read_bytes
from leuk_ray.data.layouts import scan
from leuk_ray.data.subjects import parse_name
from leuk_ray.errors import UserError

COLUMNS = ("path", "label", "subject", "split", "hash")
_CACHE_VERSION = 2  # 2: pixel digests (1 hashed the file bytes)


@dataclass
class IndexResult:
    df: pd.DataFrame                 # columns COLUMNS, one row per usable image, sorted by path
    layout: str                      # "seed" or "kaggle"
    warnings: list[str] = field(default_factory=list)
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    root: str = ""


def cache_dir() -> Path:
    return Path(os.environ.get("LEUK_RAY_CACHE_DIR") or Path.home() / ".cache" / "leuk_ray")


def _cache_file(root: Path) -> Path:
    key = hashlib.blake2b(str(root.resolve()).encode(), digest_size=8).hexdigest()
    return cache_dir() / f"index-{key}.json"


def _load_cache(f: Path) -> dict[str, list]:
    try:
        d = json.loads(f.read_text())
        return d["files"] if d.get("version") == _CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _save_cache(f: Path, files: dict[str, list]) -> None:
    """Best effort, atomic: a cache that cannot be written only costs time next run."""
    try:
        with replacing(f) as tmp, tmp.open("w") as fh:
            json.dump({"version": _CACHE_VERSION, "files": files}, fh, separators=(",", ":"))
    except OSError:
        pass


def pixel_digest(img: np.ndarray) -> str:
    """blake2b-128 hex digest of a decoded RGB uint8 image and its shape."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"rgb8 {'x'.join(map(str, img.shape))}\n".encode())
    h.update(np.ascontiguousarray(img).data)
    return h.hexdigest()


def hash_image(path: str) -> tuple[str, str | None]:
    """(``pixel_digest`` of the decoded file, None), or ("", why the file is not a usable image)."""
    img, reason = decode_bytes(read_bytes(path))
    return ("", reason) if img is None else (pixel_digest(img), None)


def _stat_hash(path: str, cached: dict[str, list]) -> tuple[str, list | str]:
    """(path, [size, mtime_ns, digest, reason]) or (path, error text)."""
    try:
        st = os.stat(path)
        hit = cached.get(path)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return path, hit
        digest, reason = hash_image(path)
        return path, [st.st_size, st.st_mtime_ns, digest, reason]
    except OSError as e:
        return path, f"unreadable ({e.strerror or e})"


def build_index(root: str | Path, *, max_bad_fraction: float = 0.01,
                threads: int | None = None) -> IndexResult:
    """Scan ``root``, hash every image's pixels (cached), set bad files aside and return the index.

    Raises ``UserError`` for a missing/unknown layout, bad labels CSV, or when more than
    ``max_bad_fraction`` of the files are unusable (empty, not an image, truncated, undecodable).
    """
    s = scan(root)
    cfile = _cache_file(s.root)
    cached = _load_cache(cfile)
    paths = [e.path for e in s.entries]
    blocks = [paths[i:i + 64] for i in range(0, len(paths), 64)]
    with ThreadPoolExecutor(max_workers=threads or min(16, 2 * (os.cpu_count() or 1))) as ex:
        results = dict(r for block in ex.map(lambda b: [_stat_hash(p, cached) for p in b], blocks)
                       for r in block)
    fresh = {p: v for p, v in results.items() if isinstance(v, list)}
    if fresh != {p: cached.get(p) for p in fresh}:
        _save_cache(cfile, fresh)

    warnings = list(s.warnings)
    rows, bad = [], []
    mismatched = []
    for e in s.entries:
        v = results[e.path]
        reason = v if isinstance(v, str) else v[3]
        if reason:
            bad.append((e.path, reason))
            continue
        parsed = parse_name(e.name)
        if parsed and e.label >= 0 and parsed[1] != e.label:
            mismatched.append(e.path)
        rows.append((e.path, e.label, parsed[0] if parsed else "", e.split, v[2]))
    if bad:
        shown = "; ".join(f"{p}: {r}" for p, r in bad[:5])
        msg = (f"{s.root}: {len(bad)} of {len(paths)} image file(s) are unusable and were skipped: "
               f"{shown}{' ...' if len(bad) > 5 else ''}")
        if len(bad) > max_bad_fraction * len(paths):
            raise UserError(f"{msg}; that is more than data.max_bad_fraction = {max_bad_fraction} "
                            "of the files: repair or remove them, or raise data.max_bad_fraction")
        warnings.append(msg)
    if mismatched:
        warnings.append(f"{len(mismatched)} file(s) whose C-NMC name says the other class than "
                        f"their folder/label (the folder/label was used), e.g. "
                        f"{', '.join(mismatched[:3])}")
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["label"] = df["label"].astype("int64")
    df = df.sort_values("path", kind="stable").reset_index(drop=True)
    return IndexResult(df, s.layout, warnings, bad, str(s.root))
