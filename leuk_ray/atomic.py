"""Atomic file writes: a reader (another fold worker, a resumed search, a dashboard) sees the old
file or the new one, never half of one.

    with replacing(path) as tmp:      # a temporary file beside path
        torch.save(state, tmp)        # write it any way you like
    # renamed onto path when the block ended without an exception; removed otherwise
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` (hidden, unique per process and thread) to write to; it
    replaces ``path`` (``os.replace``: atomic within a filesystem) when the block ends without an
    exception, and is removed otherwise. ``fsync``: flush it to disk before the rename (a file
    other processes map or trust after a crash)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """``Path.write_text``, atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)
