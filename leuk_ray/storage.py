"""Where a run's files live: storage paths and URIs (local, NFS, s3://...), the checks before a
run (writable, free space, shared by every node that needs it) and ``RunFiles``, a run
directory's local mirror with push/pull to its storage.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import ray

from leuk_ray.config import Config
from leuk_ray.errors import UserError

# refuse to start a run with less free space than this (LEUK_RAY_MIN_FREE_MB overrides)
MIN_FREE_BYTES = 512 * 2**20

# pyarrow filesystem type_name -> the URI scheme users write (and pyarrow parses): a run found
# through Tune's filesystem must be the same run, with the same local mirror, as its URI
URI_SCHEMES = {"gcs": "gs"}


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_storage(path: str) -> str:
    """Absolute local path, or a URI (s3://, gs://, ...) with its scheme as ``canonical_uri``."""
    return canonical_uri(path) if is_uri(path) else str(Path(path).expanduser().resolve())


def canonical_uri(uri: str) -> str:
    """One spelling per filesystem (pyarrow reads gcs:// and gs:// alike): ``gs://``, so that one
    run has one URI and one local mirror however it was named."""
    scheme, sep, rest = uri.partition("://")
    return f"{URI_SCHEMES.get(scheme, scheme)}{sep}{rest}" if sep else uri



def check_storage(storage: str, *, min_free: int | None = None) -> None:
    """Fail before any training when the storage path cannot be written or is nearly full."""
    if min_free is None:
        env = os.environ.get("LEUK_RAY_MIN_FREE_MB")
        min_free = int(float(env) * 2**20) if env else MIN_FREE_BYTES
    if is_uri(storage):
        import pyarrow.fs as pafs

        try:
            fs, root = pafs.FileSystem.from_uri(storage)
            if isinstance(fs, pafs.LocalFileSystem):  # file://: a new folder, as for a path
                fs.create_dir(root, recursive=True)
            probe = f"{root.rstrip('/')}/.leuk_ray_probe_{uuid.uuid4().hex}"
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
            fs.delete_file(probe)
        except Exception as e:
            raise UserError(f"storage {storage}: cannot write there ({e}); check the URI and the "
                            "credentials of this machine") from None
        return
    p = Path(storage)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".leuk_ray_probe_{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"storage {storage}: cannot write there ({e.strerror or e}); choose another "
                        "--storage-path") from None
    free = shutil.disk_usage(p).free
    if free < min_free:
        raise UserError(f"storage {storage}: only {free / 2**20:.0f} MiB free (at least "
                        f"{min_free / 2**20:.0f} MiB needed for checkpoints); free space or choose "
                        "another --storage-path")


NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
              "fuse.s3fs", "fuse.mountpoint-s3", "fuse.gcsfuse", "fuse.juicefs", "9p", "virtiofs")


def filesystem_type(path: str) -> str:
    """The type of the mount holding ``path`` (from /proc/mounts; '' when unknown)."""
    p = Path(path).resolve()
    best, kind = "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (str(p) == mnt or str(p).startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
            best, kind = mnt, parts[2]
    return kind


@ray.remote(num_cpus=0)
def _sees(path: str) -> bool:
    return Path(path).exists()


def check_shared_storage(storage: str, cfg: Config) -> None:
    """On a multi-node cluster, results must go where every node can write and read them.

    A URI (s3://, gs://) is shared. A local path must be on a network filesystem (NFS, EFS,
    Lustre, ...) or declared shared with ``ray.shared_storage=true``, and every node must see it.
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1 or is_uri(storage):
        return
    fs = filesystem_type(storage)
    if not cfg.ray.shared_storage and fs not in NETWORK_FS:
        raise UserError(f"storage {storage} is a node-local path ({fs or 'unknown'} filesystem) "
                        f"on a {len(nodes)}-node cluster: use shared storage, e.g. --storage-path "
                        "s3://BUCKET/leuk_ray_results or an NFS path mounted on every node (set "
                        "ray.shared_storage=true if it is a shared mount)")
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = Path(storage) / f".leuk_ray_shared_{uuid.uuid4().hex}"
    marker.write_text("leuk-ray shared-storage probe")
    try:
        checks = [_sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(marker)) for n in nodes]
        seen = ray.get(checks, timeout=120)
    finally:
        marker.unlink(missing_ok=True)
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise UserError(f"storage {storage} is not visible from node(s) {', '.join(blind)}: mount "
                        "it at the same path on every node, or use s3://")


class RunFiles:
    """Where a run's own files (config.yaml, trials.csv, best_config.yaml, ...) live.

    Local or NFS storage: the experiment directory itself. A URI (s3://, gs://, ...): a local
    mirror (under ~/.cache/leuk_ray/runs) that ``push`` uploads to ``<storage>/<name>/`` and
    ``pull`` fills from there, so a driver on another machine can resume or read the results.
    """

    def __init__(self, storage: str, name: str) -> None:
        self.storage, self.name = canonical_uri(storage.rstrip("/")), name
        self.uri = f"{self.storage}/{name}"
        if is_uri(storage):
            slug = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
            base = Path(os.environ.get("LEUK_RAY_CACHE_DIR", "~/.cache/leuk_ray")).expanduser()
            self.local = base / "runs" / f"{name}-{slug}"
        else:
            self.local = Path(self.uri)
        self._filesystem = None  # set by from_fs: the pyarrow filesystem Tune resolved

    @classmethod
    def from_fs(cls, fs: Any, fs_path: str) -> RunFiles:
        """The run directory ``fs_path`` on a pyarrow filesystem, as Tune resolves it at run time
        (``trial.storage``: wherever ``Tuner.restore`` found the experiment, on this machine).

        A local filesystem (a local path or ``file://``) is the directory itself; any other
        (s3, gcs, ...) is used through ``fs`` itself, so its options (endpoint, region) are kept.
        """
        import pyarrow.fs as pafs

        if isinstance(fs, pafs.LocalFileSystem):
            return cls.from_path(fs_path)
        scheme = URI_SCHEMES.get(fs.type_name, fs.type_name)
        run = cls.from_path(f"{scheme}://{fs_path.rstrip('/')}")
        run._filesystem = (fs, fs_path.rstrip("/"))
        return run

    @classmethod
    def from_path(cls, path: str) -> RunFiles:
        """A run directory given as one path or URI (``--from s3://bucket/results/my-search``)."""
        path = path.rstrip("/")
        if is_uri(path):
            parent, _, name = path.rpartition("/")
            return cls(parent, name)
        p = Path(path).expanduser().absolute()
        return cls(str(p.parent), p.name)

    @property
    def remote(self) -> bool:
        return is_uri(self.storage)

    def _fs(self):
        if self._filesystem is not None:
            return self._filesystem
        import pyarrow.fs as pafs

        return pafs.FileSystem.from_uri(self.uri)

    def newest(self, pattern: str) -> str | None:
        """The last, in name order, of the files at the top of the run directory that match
        ``pattern`` (fnmatch; Tune's state files carry a sortable timestamp), or None."""
        if not self.remote:
            names = [q.name for q in self.local.glob(pattern) if q.is_file()]
        else:
            import pyarrow.fs as pafs

            fs, root = self._fs()
            try:
                infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
            except FileNotFoundError:
                return None
            names = [i.base_name for i in infos if i.type == pafs.FileType.File
                     and fnmatch.fnmatch(i.base_name, pattern)]
        return max(names) if names else None

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return (self.local / rel).exists()
        import pyarrow.fs as pafs

        fs, root = self._fs()
        return fs.get_file_info(f"{root}/{rel}").type != pafs.FileType.NotFound

    def push(self, *rels: str) -> None:
        """Upload these files (or every file below a folder) from the mirror; no-op when local."""
        if not self.remote:
            return
        fs, root = self._fs()
        for rel in rels:
            src = self.local / rel
            files = sorted(q for q in src.rglob("*") if q.is_file()) if src.is_dir() else \
                ([src] if src.exists() else [])
            # a folder's manifest.json goes last, so a reader never sees it before its files
            files.sort(key=lambda q: q.name == "manifest.json")
            for f in files:
                dest = f"{root}/{f.relative_to(self.local).as_posix()}"
                fs.create_dir(dest.rpartition("/")[0], recursive=True)
                with fs.open_output_stream(dest) as out:
                    out.write(f.read_bytes())

    def pull(self, *rels: str) -> list[str]:
        """Download these files when they exist remotely; returns the ones fetched."""
        if not self.remote:
            return [r for r in rels if (self.local / r).exists()]
        fs, root = self._fs()
        got = []
        for rel in rels:
            if not self.exists(rel):
                continue
            dest = self.local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{root}/{rel}") as src:
                dest.write_bytes(src.read())
            got.append(rel)
        return got
