"""``python -m leuk_ray.dashboard SEARCH_DIR``: optuna-dashboard over a search's study, live.

Serves the study the search keeps (``study.db`` in its directory, or ``search.storage``) on
127.0.0.1 only unless ``--host`` says otherwise: the trial table with each trial's Tune id, status,
reason, epochs and per-fold F1 (user attributes), the learning curves (intermediate values, pruned
trials included), the optimisation history and parameter importances. It reads the database while
the search writes it. On a cluster, run it on the head node and forward the port over SSH, as for
Ray's dashboard (see README). A search on s3:// is shown as a snapshot taken at start.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from leuk_ray.cli import check_port_free, run_main
from leuk_ray.errors import UserError
from leuk_ray.storage import RunFiles, resolve_storage

LOOPBACK = "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m leuk_ray.dashboard",
        description="Follow a search live in optuna-dashboard (trial table, learning curves with "
                    "pruned trials, history, importances).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("search_dir", metavar="SEARCH_DIR", help="the search's directory (or s3://...)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.add_argument("--host", default=LOOPBACK,
                   help="address to bind; the dashboard has no authentication, so keep it on "
                        "loopback and use SSH port forwarding to reach it from elsewhere")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import bottle
        import optuna_dashboard
    except ImportError:
        raise UserError("optuna-dashboard is not installed: pip install -e \".[dashboard]\"") \
            from None
    from leuk_ray.search_report import load_search_study

    files = RunFiles.from_path(resolve_storage(args.search_dir))
    study, _ = load_search_study(files)
    check_port_free(args.host, args.port)
    storage = study._storage  # noqa: SLF001  (the same database the search writes)
    app = optuna_dashboard.wsgi(storage)
    where = "a snapshot of " if files.remote else ""
    if args.host != LOOPBACK:
        print(f"warning: listening on {args.host}: anyone who reaches this port sees the study "
              "(no authentication)", flush=True)
    print(f"optuna-dashboard for {where}search '{files.name}' ({len(study.trials)} trials so far): "
          f"http://{args.host}:{args.port}/dashboard/ (Ctrl-C stops it)", flush=True)
    try:
        bottle.run(app, host=args.host, port=args.port, quiet=True)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    run_main(main)
