"""What reaches the console: leuk-ray's own lines by default, Ray's, Tune's and Optuna's with
``--verbose``.

A search or final run prints its story (one line per trial epoch, one per ended trial, a status
line from time to time, the summary last). Everything Ray, Tune and Optuna say stays in Ray's log
files (``/tmp/ray/session_latest/logs`` on each node): their startup banners and warnings, Tune's
configuration box, the fold workers' own lines, raylet warnings and the stack dumps of workers
killed by ASHA. On a cluster the search is a Ray job, so this is also what the dashboard's job log
shows. Call ``setup`` before anything imports Ray's logging or starts Ray.
"""
from __future__ import annotations

import logging
import os
import sys

# Ray's colour prefix for the lines it forwards: off when the console is not a terminal
COLOR_ENV = "RAY_COLOR_PREFIX"
# Tune's newer console output prints its configuration box and TensorBoard hint at any verbosity;
# its older reporter is silent at verbose=0
TUNE_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"
QUIET_LOGGERS = ("ray", "optuna", "filelock")

_verbose: bool | None = None  # None: setup was not called (a library use): Ray as it comes


def setup(verbose: bool) -> None:
    """Route the libraries' console output for this process (and the Ray it starts)."""
    global _verbose
    _verbose = verbose
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every line with its own worker, when shown
    if not sys.stdout.isatty():
        os.environ.setdefault(COLOR_ENV, "0")
    if verbose:
        return
    os.environ.setdefault(TUNE_OUTPUT_ENV, "0")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "optuna" in sys.modules:  # optuna resets its logger's level the first time it logs
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)


def verbose() -> bool:
    """Whether the libraries' own output is shown (``--verbose``, or ``setup`` never called)."""
    return _verbose is not False


def ray_init_kwargs() -> dict:
    """``ray.init`` settings for the console: worker output forwarded only when verbose."""
    if verbose():
        return {"log_to_driver": True}
    return {"log_to_driver": False, "logging_level": logging.ERROR}


# raylet messages Ray prints on the driver's console whatever log_to_driver says; these are
# expected on a busy node (one Python process per fold worker and Ray Train helper) and say
# nothing a user can act on. Every other raylet message (an OOM kill, a node lost) still shows.
RAYLET_NOISE = ("PYTHON worker processes have been started",)


def filter_raylet_noise() -> None:
    """Drop ``RAYLET_NOISE`` from what Ray's error listener prints (after ``ray.init``)."""
    if verbose():
        return
    import ray._private.worker as rw

    original = rw.print_to_stdstream
    if getattr(original, "_leuk_ray_filtered", False):
        return

    def printer(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet" and any(
                n in line for line in data.get("lines", []) for n in RAYLET_NOISE):
            return
        original(data, ignore_prefix)

    printer._leuk_ray_filtered = True  # type: ignore[attr-defined]
    rw.print_to_stdstream = printer
