"""Placing a trial's processes on the cluster: the resource bundles Ray reserves for a trial's
driver and fold workers, how many trials fit at once as their workers pack onto the nodes (the
autoscaler's node types included), and a clear error when a trial can never be placed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml

from leuk_ray.config import Config
from leuk_ray.errors import UserError

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
