"""Joining Ray: a running cluster (``--address`` or ``RAY_ADDRESS``) or a local Ray.

Sizing trials to the cluster is ``leuk_ray.placement``; storage and run files ``leuk_ray.storage``.
Nothing here starts a port on a public address: a local Ray binds its dashboard to 127.0.0.1.
"""
from __future__ import annotations

import os

import ray

from leuk_ray import console
from leuk_ray.errors import UserError
# Searches started before storage and placement left this module pickled copies of leuk-ray's
# Tune callbacks into their tuner.pkl (by value, as classes of the `python -m` module) that call
# these through leuk_ray.cluster; kept here so that such searches still resume.
from leuk_ray.storage import RunFiles, is_uri, resolve_storage  # noqa: F401

# Ray Train starts a PreemptionWatcher actor (one more Python process, ~2 s of CPU) for every
# worker group, to notice cloud nodes being drained. A local Ray started here is one machine that
# no cloud will preempt, so the local instance runs without it (setdefault: the user's value wins).
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"



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
