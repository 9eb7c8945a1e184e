"""Where a fold worker writes each epoch's checkpoint file before Ray copies it to storage.

``ray.train.report(..., delete_local_checkpoint_after_upload=True)`` deletes a fold's local copy
once it is stored, but a worker killed or stopped while its copy is in flight (a lost worker, an
ASHA stop, a failed trial) never gets there: the file stays in the node's temp dir, ~130 MiB per
fold for an EfficientNet-B3, one per stopped fold worker, for as long as the node lives.

So each copy lives in ``<tempdir>/leuk_ray_staging/fold<i>_<host>_<pid>_<random>``, named by the
worker process that owns it, and every fold worker that starts (and a search or final job that
ends) first removes the copies of processes on its node that no longer exist. A live process's
copies are never touched (its upload thread may be reading them); a directory whose process id
was reused by another process is kept (a leak, never a lost checkpoint).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

STAGING = "leuk_ray_staging"
_NAME = re.compile(r"^fold\d+_(?P<host>[^_]+)_(?P<pid>\d+)_.+$")  # see new_staging_dir


def staging_root() -> Path:
    """This node's staging folder: ``leuk_ray_staging`` in Python's temp dir (``$TMPDIR``)."""
    return Path(tempfile.gettempdir()) / STAGING


def _host() -> str:
    # an underscore-free host name keeps the directory name unambiguous
    return socket.gethostname().replace("_", "-") or "host"


def new_staging_dir(fold: int) -> Path:
    """A fresh directory for one checkpoint of ``fold``, owned by this process."""
    root = staging_root()
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"fold{fold}_{_host()}_{os.getpid()}_", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale_staging(root: Path | None = None) -> list[Path]:
    """Remove the staged checkpoints of this host's processes that have exited; returns them.

    Copies owned by live processes, by other hosts (a temp dir shared between containers) and
    anything not named by ``new_staging_dir`` are left alone. Never raises: a copy that cannot be
    removed now is tried again by the next sweep.
    """
    root = root or staging_root()
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except OSError:  # no staging folder yet
        return removed
    host = _host()
    for d in entries:
        m = _NAME.match(d.name)
        if not m or m["host"] != host or not d.is_dir() or _alive(int(m["pid"])):
            continue
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
    return removed
