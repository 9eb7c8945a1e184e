"""Ray plumbing shared by search and final: connect, size trials to the cluster, check storage.

Nothing here starts a port on a public address: a local Ray binds its dashboard to 127.0.0.1.
"""
from __future__ import annotations

import fnmatch
import hashlib
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml

from leuk_ray import console
from leuk_ray.config import Config
from leuk_ray.errors import UserError

# refuse to start a run with less free space than this (LEUK_RAY_MIN_FREE_MB overrides)
MIN_FREE_BYTES = 512 * 2**20
# Ray Train starts a PreemptionWatcher actor (one more Python process, ~2 s of CPU) for every
# worker group, to notice cloud nodes being drained. A local Ray started here is one machine that
# no cloud will preempt, so the local instance runs without it (setdefault: the user's value wins).
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_storage(path: str) -> str:
    """Absolute local path, or a URI (s3://, gs://, ...) unchanged."""
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def connect(address: str | None = None, *, num_cpus: float | None = None) -> str:
    """Join a running cluster (``--address`` or ``RAY_ADDRESS``) or start a local Ray.

    Returns the dashboard URL ('' when the dashboard is not running).
    """
    if ray.is_initialized():
        return _dashboard_url()
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = console.ray_init_kwargs()  # which worker lines show: console.route_worker_output
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            # set before ray.init: the raylet, and so every worker it starts, inherits it
            os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
            ray.init(include_dashboard=True, dashboard_host="127.0.0.1", num_cpus=num_cpus,
                     **quiet)
        console.route_worker_output()
    except ConnectionError as e:
        raise UserError(f"could not connect to the Ray cluster at {address}: {e} (is it up? for a "
                        "cluster started with token auth set RAY_AUTH_MODE=token)") from None
    return _dashboard_url()


def _dashboard_url() -> str:
    try:
        url = ray.get_runtime_context().dashboard_url if hasattr(
            ray.get_runtime_context(), "dashboard_url") else ""
        url = url or ray._private.worker.global_worker.node.address_info.get("webui_url", "")
    except Exception:  # the dashboard is optional for the run itself
        url = ""
    if url and not url.startswith("http"):
        url = "http://" + url
    return url


# ---------------------------------------------------------------------- placing a trial's processes
MIB = 2**20
DRIVER_RESOURCE_SHARE = 0.01  # of ray.driver_resource, per trial driver
MAX_TRIALS = 1024  # counting stops here: more trials at once than this is no real bound
# the cluster launcher writes its config (node types and their resources) here on the head
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def worker_bundle(cfg: Config) -> dict[str, float]:
    """What Ray reserves for one fold worker."""
    out = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.gpus_per_worker > 0:
        out["GPU"] = cfg.ray.gpus_per_worker
    return out


def driver_bundle(cfg: Config) -> dict[str, float]:
    """What Ray reserves for one trial's driver; its Ray Train controller and synchronisation
    actor run beside it on the same node (0 CPU each), so ``ray.driver_memory_mb`` covers them."""
    r = cfg.ray
    out = {"CPU": r.driver_cpus}
    if r.driver_memory_mb > 0:
        out["memory"] = float(r.driver_memory_mb * MIB)
    if r.driver_resource:
        out[r.driver_resource] = DRIVER_RESOURCE_SHARE
    return out


def _count(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of ``bundle`` fit in ``node``'s resources."""
    return min((math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0),
               default=0)


def _minus(node: dict[str, float], bundle: dict[str, float]) -> dict[str, float]:
    return {**node, **{k: node.get(k, 0.0) - v for k, v in bundle.items()}}


def _workers_fit(caps: list[int], k: int, t: int, strategy: str) -> bool:
    """Whether ``t`` groups of ``k`` fold workers fit nodes holding ``caps`` workers each."""
    if strategy == "STRICT_PACK":
        return sum(c // k for c in caps) >= t
    if strategy == "STRICT_SPREAD":  # each of a trial's workers on its own node
        return sum(min(c, t) for c in caps) >= k * t
    return sum(caps) >= k * t  # PACK / SPREAD are best effort: any nodes will do


def trials_that_fit(nodes: list[dict[str, float]], worker: dict[str, float], k: int,
                    strategy: str, driver: dict[str, float]) -> int:
    """How many trials (one driver and ``k`` fold workers each) the ``nodes`` hold at once.

    Counted as Ray places them: every fold worker is one placement-group bundle that must fit
    whole on one node (cluster totals are not enough: two nodes with 1 free CPU each do not hold a
    2-CPU worker), under ``ray.placement_strategy``. Drivers go first, each where it costs the
    fewest fold workers; an empty ``driver`` is one Ray does not place (the final job's).
    """
    def fits(t: int) -> bool:
        free = [dict(n) for n in nodes]
        for _ in range(t if driver else 0):
            room = [i for i, n in enumerate(free) if _count(n, driver) >= 1]
            if not room:
                return False
            i = min(room, key=lambda j: (_count(free[j], worker) -
                                         _count(_minus(free[j], driver), worker),
                                         -_count(free[j], driver)))
            free[i] = _minus(free[i], driver)
        return _workers_fit([_count(n, worker) for n in free], k, t, strategy)

    lo, hi = 0, min(MAX_TRIALS, sum(_count(n, worker) for n in nodes) // max(k, 1))
    while lo < hi:  # the largest t that fits (fewer trials always fit when more do)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


@dataclass
class Layout:
    """The cluster as placement sees it: its nodes now, the node types an autoscaler may add
    (empty when unknown) and whether it adds nodes at all."""
    nodes: list[dict[str, float]]
    node_types: list[dict[str, float]]
    autoscaling: bool


def cluster_layout(cfg: Config) -> Layout:
    nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes()
             if n.get("Alive")]
    types, scales = _autoscaler_node_types()
    if cfg.ray.autoscaling != "auto":
        scales = cfg.ray.autoscaling == "true"
    return Layout(nodes=nodes, node_types=types, autoscaling=scales)


def _autoscaler_node_types() -> tuple[list[dict[str, float]], bool]:
    """(node types an autoscaler can start, whether it scales), from what Ray publishes.

    Autoscaler v2 and KubeRay: the cluster config in the GCS (what Ray Data and Ray Train read).
    The cluster launcher (v1): its config on the head (a node type with max_workers above
    min_workers scales). Not the monitor's status: a fixed cluster runs a read-only autoscaler
    that reports too. Ray's helpers for this are private; anything unreadable counts as "no
    autoscaler known" (``ray.autoscaling=true`` says otherwise).
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:
        config = None
    if config is not None and config.node_group_configs:
        groups = [g for g in config.node_group_configs if g.resources and g.max_count != 0]
        return ([{k: float(v) for k, v in g.resources.items()} for g in groups],
                any(g.max_count == -1 or g.max_count > g.min_count for g in groups))
    try:
        boot = yaml.safe_load(BOOTSTRAP_CONFIG.expanduser().read_text()) or {}
    except (OSError, yaml.YAMLError):
        return [], False
    types: list[dict[str, float]] = []
    scales = False
    for t in (boot.get("available_node_types") or {}).values():
        if t.get("resources"):
            types.append({k: float(v) for k, v in t["resources"].items()})
        scales = scales or t.get("max_workers", 0) > t.get("min_workers", 0)
    return types, scales and boot.get("max_workers", 1) > 0


def _fmt(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v / MIB:.0f} MiB" if k == "memory" else f"{k}: {v:g}"
                           for k, v in bundle.items()) + "}"


def _why_not(nodes: list[dict[str, float]], worker: dict[str, float], k: int, strategy: str,
             driver: dict[str, float], where: str) -> str:
    """What keeps one trial off ``nodes`` (a node list or node types, named by ``where``)."""
    if not nodes:
        return f"{where} has no nodes"
    if not any(_count(n, worker) for n in nodes):
        short = [f"{key} {v:g} per worker, the most on one node is "
                 f"{max(n.get(key, 0.0) for n in nodes):g}"
                 for key, v in worker.items() if max(n.get(key, 0.0) for n in nodes) + 1e-9 < v]
        detail = "; ".join(short) or "no node has all of it together"
        return (f"no node of {where} holds one fold worker {_fmt(worker)} (ray.cpus_per_worker, "
                f"ray.gpus_per_worker): {detail}")
    if driver and not any(_count(n, driver) for n in nodes):
        short = [f"{'memory ' + f'{v / MIB:.0f} MiB' if key == 'memory' else f'{key} {v:g}'}"
                 for key, v in driver.items()
                 if max(n.get(key, 0.0) for n in nodes) + 1e-9 < v]
        return (f"no node of {where} holds a trial driver {_fmt(driver)} (ray.driver_cpus, "
                f"ray.driver_memory_mb, ray.driver_resource): short of "
                f"{', '.join(short) or 'all of it together'}")
    caps = [_count(n, worker) for n in nodes]
    if strategy == "STRICT_PACK":
        return (f"ray.placement_strategy=STRICT_PACK puts all {k} fold workers {_fmt(worker)} on "
                f"one node, and the most one node of {where} holds is {max(caps)}")
    if strategy == "STRICT_SPREAD":
        return (f"ray.placement_strategy=STRICT_SPREAD puts each of the {k} fold workers "
                f"{_fmt(worker)} on its own node, and {where} has "
                f"{sum(c > 0 for c in caps)} node(s) that hold one")
    with_driver = f" and a driver {_fmt(driver)}" if driver else ""
    return (f"a run needs {k} fold workers {_fmt(worker)}{with_driver}, but {where} holds "
            f"{sum(caps)} such workers at once (per node: {', '.join(map(str, caps))})")


def check_placement(cfg: Config, n_folds: int, *, driver: bool = True) -> int:
    """How many trials fit on the cluster at once; a ``UserError`` when one never can.

    ``driver``: each trial has a driver that Ray places (a search's trials); the final job's
    driver is the process that calls this, outside Ray's resources.

    On a fixed cluster a trial must fit the nodes there now, as Ray places it (each fold worker
    whole on one node). On an autoscaling cluster (``ray.autoscaling``, or detected) it must fit
    the node types the autoscaler can add, when those are known; a trial that does not fit the
    nodes up now is a warning, and 1 is returned.
    """
    layout = cluster_layout(cfg)
    worker = worker_bundle(cfg)
    strategy = cfg.ray.placement_strategy
    driver_ask = driver_bundle(cfg) if driver else {}
    fits = trials_that_fit(layout.nodes, worker, n_folds, strategy, driver_ask)
    if fits >= 1:
        return fits
    fix = ("lower ray.cpus_per_worker (fractions are allowed), ray.gpus_per_worker or "
           "ray.driver_memory_mb, choose another ray.placement_strategy, or add nodes")
    if not layout.autoscaling:
        why = _why_not(layout.nodes, worker, n_folds, strategy, driver_ask, "the cluster")
        raise UserError(f"{n_folds} fold workers cannot be placed on the cluster: {why}; {fix} "
                        "(set ray.autoscaling=true if it adds nodes on demand)")
    if layout.node_types:
        # the autoscaler adds whole nodes of these types: a fold worker must fit one of them,
        # and a strict strategy needs its group to fit as the types allow (many of each)
        many = [t for t in layout.node_types for _ in range(max(n_folds, 1))]
        if trials_that_fit(many + layout.nodes, worker, n_folds, strategy, driver_ask) < 1:
            why = _why_not(many + layout.nodes, worker, n_folds, strategy, driver_ask,
                           "the autoscaler's node types")
            raise UserError(f"{n_folds} fold workers cannot be placed even after autoscaling: "
                            f"{why}; {fix} of a bigger type")
    now = _why_not(layout.nodes, worker, n_folds, strategy, driver_ask, "the cluster now")
    print(f"warning: {now}; waiting up to "
          f"ray.worker_start_timeout_s={cfg.ray.worker_start_timeout_s:g}s "
          f"({cfg.ray.start_retries + 1} tries) for the autoscaler to add nodes", flush=True)
    return 1


def max_concurrent_trials(cfg: Config, n_folds: int) -> int:
    """Trials at once: as many as fit on the cluster (``check_placement``), at most
    ``search.max_concurrent``; on an autoscaling cluster ``search.max_concurrent`` itself."""
    fits = check_placement(cfg, n_folds)
    bound = cfg.search.max_concurrent
    if not bound:
        return fits
    if cluster_layout(cfg).autoscaling:
        return bound  # the autoscaler grows the cluster to fit what is asked
    if bound > fits:
        print(f"note: search.max_concurrent={bound}, but the cluster holds {fits} trial(s) at once "
              f"as their fold workers pack onto its nodes: running {fits}", flush=True)
    return min(bound, fits)


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
        self.storage, self.name = storage.rstrip("/"), name
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
        run = cls.from_path(f"{fs.type_name}://{fs_path.rstrip('/')}")
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
