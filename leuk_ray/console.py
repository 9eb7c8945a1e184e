"""What reaches the console: leuk-ray's own lines by default, Ray's, Tune's and Optuna's with
``--verbose``.

A search or final run prints its story (one line per trial epoch, one per ended trial, a status
line from time to time, the summary last). Everything Ray, Tune and Optuna say stays in Ray's log
files (``/tmp/ray/session_latest/logs`` on each node): their startup banners and warnings, Tune's
configuration box, raylet warnings and the stack dumps of workers killed by ASHA. Of the fold
workers' lines only those marked as part of the story (``story``) reach the console. On a cluster the search is a Ray job, so this is also what the dashboard's job log
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
# Tune logs every failed trial's traceback at ERROR (tune_controller: "Trial task failed for
# trial ...") and "Trials did not complete" at the end (tune); the story already has a line per
# failed trial with its reason, and the traceback is in the trial's error.txt in the experiment
# folder. Tune's other errors (syncing, checkpoints) come from other loggers and still show.
SILENT_LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.tune")

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
    for name in SILENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if "optuna" in sys.modules:  # optuna resets its logger's level the first time it logs
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)


def verbose() -> bool:
    """Whether the libraries' own output is shown (``--verbose``, or ``setup`` never called)."""
    return _verbose is not False


def ray_init_kwargs() -> dict:
    """``ray.init`` settings for the console. Worker output is forwarded to the driver either way
    (``route_worker_output`` picks the lines shown); Ray's own driver logging only when verbose."""
    if verbose():
        return {"log_to_driver": True}
    return {"log_to_driver": True, "logging_level": logging.ERROR}


# A fold worker's line that belongs to the run's story (a fold resumed after a fault, a fold that
# stopped; in the final job every epoch) starts with this mark. The driver prints it without the
# mark and without Ray's "(RayTrainWorker pid=...)" prefix; every other worker line stays in Ray's
# log files (the marked ones are there too, greppable by the mark).
MARK = "[leuk-ray] "


def story(msg: str) -> None:
    """Print ``msg`` from a Ray worker so that the driver's console shows it (``MARK``).

    Written to the real stdout: Ray Train tees ``print`` through its logger (each line twice)."""
    print(MARK + msg, file=sys.__stdout__, flush=True)


def _unmark(line: str) -> str:
    return line[len(MARK):] if line.startswith(MARK) else line


# raylet messages Ray prints on the driver's console whatever log_to_driver says; these are
# expected on a busy node (one Python process per fold worker and Ray Train helper) and say
# nothing a user can act on. Every other raylet message (an OOM kill, a node lost) still shows.
RAYLET_NOISE = ("PYTHON worker processes have been started",)
WORKER_HANDLER = "ray_print_logs"  # the name ray.init gives its worker-output handler


def route_worker_output() -> None:
    """After ``ray.init``: show the workers' ``story`` lines (all their lines with ``--verbose``,
    marks removed) and drop ``RAYLET_NOISE`` from what Ray's error listener prints."""
    import ray._private.worker as rw
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    handlers = dict(dispatcher.handlers)
    original = handlers.get(WORKER_HANDLER)
    if original is not None and not getattr(original, "_leuk_ray", False):
        def worker_lines(data: dict) -> None:
            lines = data.get("lines", [])
            if verbose():
                original({**data, "lines": [_unmark(x) for x in lines]})
                return
            ours = [x[len(MARK):] for x in lines if x.startswith(MARK)]
            if ours:
                print("\n".join(ours), file=sys.stdout, flush=True)

        worker_lines._leuk_ray = True  # type: ignore[attr-defined]
        dispatcher.remove_handler(WORKER_HANDLER)
        dispatcher.add_handler(WORKER_HANDLER, worker_lines)

    printer_now = rw.print_to_stdstream
    if verbose() or getattr(printer_now, "_leuk_ray", False):
        return

    def printer(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet" and any(
                n in line for line in data.get("lines", []) for n in RAYLET_NOISE):
            return
        printer_now(data, ignore_prefix)

    printer._leuk_ray = True  # type: ignore[attr-defined]
    rw.print_to_stdstream = printer
