"""Where a fold worker writes each epoch's checkpoint file before Ray copies it to storage.

``ray.train.report(..., delete_local_checkpoint_after_upload=True)`` deletes a fold's local copy
once it is stored, but a worker killed or stopped while its copy is in flight (a lost worker, an
ASHA stop, a failed trial: Ray Train kills the worker's process, upload thread included) never
gets there: the file stays in the node's temp dir, ~128 MiB per fold for an EfficientNet-B3, one
per stopped fold worker, for as long as the node lives.

So each copy lives in ``<tempdir>/leuk_ray_staging_<uid>/fold<i>_<host>_<pid>_<random>``: one
folder per user (mode 0700), and in it a directory named by the worker process that owns it.
Every fold worker that starts first removes the copies of processes on its host that no longer
exist. A live process's copies are never touched (its upload thread may be reading them); the
host part also names the process-id namespace, so containers that share a temp dir and a host
name but not their process ids (a Kubernetes pod) leave each other's copies alone; a directory
whose process id was reused by another process is kept (a leak, never a lost checkpoint).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

STAGING = "leuk_ray_staging"
_NAME = re.compile(r"^fold\d+_(?P<host>[^_]+)_(?P<pid>\d+)_.+$")  # see new_staging_dir


def staging_root() -> Path:
    """This user's staging folder on this node, in Python's temp dir (``$TMPDIR``)."""
    return Path(tempfile.gettempdir()) / f"{STAGING}_{os.getuid()}"


def _host() -> str:
    """This host and process-id namespace, without underscores (the name's separator)."""
    try:
        ns = f"-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc (not Linux)
        ns = ""
    return (socket.gethostname() or "host").replace("_", "-") + ns


def _owned(root: Path) -> bool:
    """``root`` is a directory of this user, not a symlink (raises OSError when it is missing)."""
    st = root.lstat()
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


_warned: set[Path] = set()  # folders already warned about (once per process, not every epoch)


def _own_root() -> Path | None:
    """The staging folder, made if needed; None when it is not a directory this user owns (a
    symlink or another user's folder under that name): then nothing is staged or swept there."""
    root = staging_root()
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        if _owned(root):
            return root
        why = "not a folder of this user"
    except OSError as e:
        why = str(e)
    if root not in _warned:
        _warned.add(root)
        log.warning("cannot keep fold checkpoints in %s (%s): using the temp dir", root, why)
    return None


def new_staging_dir(fold: int) -> Path:
    """A fresh directory for one checkpoint of ``fold``, owned by this process."""
    root = _own_root()
    if root is None:  # unswept, as before the staging folder existed
        return Path(tempfile.mkdtemp(prefix=f"leuk_ray_fold{fold}_"))
    return Path(tempfile.mkdtemp(prefix=f"fold{fold}_{_host()}_{os.getpid()}_", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale_staging() -> list[Path]:
    """Remove the staged checkpoints of this host's processes that have exited; returns them.

    Copies owned by live processes, by other hosts or process-id namespaces, and anything not
    named by ``new_staging_dir`` are left alone. Never raises: a copy that cannot be removed now
    is tried again by the next sweep.
    """
    removed: list[Path] = []
    root = staging_root()
    try:
        if not _owned(root):
            return removed
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
