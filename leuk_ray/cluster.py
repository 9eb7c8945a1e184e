"""Ray plumbing shared by search and final: connect, size trials to the cluster, check storage.

Nothing here starts a port on a public address: a local Ray binds its dashboard to 127.0.0.1.
"""
from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray

from leuk_ray.config import Config
from leuk_ray.errors import UserError

MIN_FREE_BYTES = 512 * 2**20  # refuse to start a run with less free space than this


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
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(include_dashboard=True, dashboard_host="127.0.0.1", num_cpus=num_cpus,
                     log_to_driver=True)
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


@dataclass
class TrialShape:
    """What one trial asks for, and how many fit on the cluster now."""
    cpus: float
    gpus: float
    fits: int


def trial_shape(cfg: Config, n_folds: int) -> TrialShape:
    r = cfg.ray
    cpus = n_folds * r.cpus_per_worker + r.driver_cpus
    gpus = n_folds * r.gpus_per_worker
    total = ray.cluster_resources()
    fits = math.floor(total.get("CPU", 0.0) / cpus + 1e-9)
    if gpus > 0:
        fits = min(fits, math.floor(total.get("GPU", 0.0) / gpus + 1e-9))
    if r.driver_resource:
        fits = min(fits, math.floor(total.get(r.driver_resource, 0.0) / 0.01 + 1e-9))
    return TrialShape(cpus=cpus, gpus=gpus, fits=fits)


def max_concurrent_trials(cfg: Config, n_folds: int) -> int:
    """Trials at once: the configured bound, or as many as the cluster holds (at least 1)."""
    shape = trial_shape(cfg, n_folds)
    if shape.fits == 0:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        msg = (f"one trial needs {shape.cpus:g} CPUs and {shape.gpus:g} GPUs ({n_folds} fold workers "
               f"x ray.cpus_per_worker={cfg.ray.cpus_per_worker:g}, "
               f"ray.gpus_per_worker={cfg.ray.gpus_per_worker:g}, plus the driver), but the "
               f"cluster has {ray.cluster_resources()}")
        if len(nodes) <= 1 and not os.environ.get("RAY_ADDRESS"):
            raise UserError(msg + ": lower ray.cpus_per_worker (fractions are allowed) or "
                            "ray.gpus_per_worker")
        print(f"warning: {msg}; waiting for the autoscaler to add nodes", flush=True)
        shape.fits = 1
    if cfg.search.max_concurrent:
        return min(cfg.search.max_concurrent, max(shape.fits, 1))
    return shape.fits


def check_storage(storage: str, *, min_free: int = MIN_FREE_BYTES) -> None:
    """Fail before any training when the storage path cannot be written or is nearly full."""
    if is_uri(storage):
        import pyarrow.fs as pafs

        try:
            fs, root = pafs.FileSystem.from_uri(storage)
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


@ray.remote(num_cpus=0)
def _sees(path: str) -> bool:
    return Path(path).exists()


def check_shared_storage(storage: str) -> None:
    """On a multi-node cluster a local storage path must be shared (NFS) by every node."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1 or is_uri(storage):
        return
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
        raise UserError(f"storage {storage} is a local path that node(s) {', '.join(blind)} cannot "
                        f"see, on a {len(nodes)}-node cluster: use shared storage, e.g. "
                        "--storage-path s3://BUCKET/leuk_ray or an NFS path mounted on every node")
