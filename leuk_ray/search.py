"""``python -m leuk_ray.search``: Ray Tune + Optuna over fold-parallel Ray Train runs.

Each trial is a Tune function trainable that builds a ``TorchTrainer`` with one worker per fold
(``leuk_ray.fold_trainer``) and forwards rank 0's per-epoch report (all folds' metrics) to Tune
through ``TuneReportCallback``. The trial's score is ``mean_val_f1``: the mean over folds of each
fold's best validation weighted F1. Optuna (TPE, seeded) proposes trials, ASHA prunes weak ones on
the absolute epoch, and Optuna is told that ASHA-stopped trials were *pruned*, not complete.

Outputs under ``<storage-path>/<name>/``: Tune's experiment, ``trials.csv`` (updated as trials
end), ``best_config.yaml``, ``config.yaml`` (the base config), ``space.yaml``, ``folds.csv``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune

from leuk_ray import cluster, console
from leuk_ray.cli import common_parser, config_from_args, run_main
from leuk_ray.config import Config, config_from_yaml_with_extras, save_config, set_value
from leuk_ray.curves import CurvesLogger
from leuk_ray.data import PreparedData, prepare_data
from leuk_ray.data.synth import demo_data
from leuk_ray.errors import UserError, user_error_in
from leuk_ray.fold_trainer import SCORE
from leuk_ray.placement import driver_bundle, max_concurrent_trials
from leuk_ray.results import (DROPPED_STATUSES, SearchProgress, best_row, drop_fold_checkpoints,
                              result_row)
from leuk_ray.search_space import SearchSpace, apply_params, load_space
from leuk_ray.storage import RunFiles, check_shared_storage, check_storage, is_uri, resolve_storage
from leuk_ray.study import (STUDY_FILE, PruneAwareOptunaSearch, make_sampler, open_storage,
                            study_url, write_optuna_trials)
from leuk_ray.trial import trial_fn
from leuk_ray.tune_ext import PRUNED_FILE, FollowingFIFO, ResumableASHA, read_pruned
from leuk_ray.weights import check_weights

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE_SPACE = "search_spaces/smoke.yaml"
# ---------------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    p = common_parser("python -m leuk_ray.search",
                      "Search hyperparameters with Ray Tune + Optuna; each trial trains all folds "
                      "in parallel with Ray Train and is scored by its mean-over-folds validation "
                      "weighted F1.", out=False)
    p.add_argument("--space", default=None,
                   help="search-space YAML (default: search_spaces/default.yaml; smoke.yaml with "
                        "--smoke-test/--demo)")
    p.add_argument("--storage-path", default=None,
                   help="where searches are kept: a local dir, NFS, or s3://... "
                        "(default: search.storage_path, ~/leuk_ray_results)")
    p.add_argument("--name", default=None, help="search name (default: search-<date>-<time>)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="number of trials (default: search.num_samples; 4 with --smoke-test)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted search --name: finished trials are kept")
    p.add_argument("--demo", action="store_true",
                   help="generate the synthetic demo set and run a smoke-size search on it")
    p.add_argument("--num-cpus", type=float, default=None, help=argparse.SUPPRESS)
    return p


def _resolve_space_path(arg: str | None, cfg: Config, smoke: bool) -> Path:
    text = arg or (SMOKE_SPACE if smoke else cfg.search.space)
    p = Path(text).expanduser()
    if not p.is_file() and not p.is_absolute() and (REPO_ROOT / p).is_file():
        p = REPO_ROOT / p
    return p


def _folds_table(prepared: PreparedData) -> list[dict[str, Any]]:
    df = prepared.train
    return [{"path": r.path, "subject": r.subject, "label": int(r.label), "fold": int(r.fold)}
            for r in df.itertuples()]


def _write_folds(prepared: PreparedData, path: Path) -> None:
    rows = _folds_table(prepared)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "subject", "label", "fold"])
        w.writeheader()
        w.writerows(rows)


def _check_same_folds(prepared: PreparedData, path: Path) -> None:
    if not path.exists():
        return
    with path.open() as f:
        before = [(r["path"], int(r["fold"])) for r in csv.DictReader(f)]
    now = [(r["path"], r["fold"]) for r in _folds_table(prepared)]
    if sorted(before) != sorted(now):
        raise UserError(f"{path}: the data or its folds changed since this search started; resume "
                        "needs the same data (or start a new search with another --name)")


def _setup(cfg: Config, *, space: str | Path | None, storage_path: str | None, name: str | None,
           num_samples: int | None, resume: bool, smoke: bool
           ) -> tuple[Config, SearchSpace, RunFiles, int]:
    """Resolve config, space, storage and name; check the experiment's files (see run_search)."""
    if resume and not name:
        raise UserError("--resume needs --name NAME of the search to continue")
    if num_samples is not None and num_samples < 1:
        raise UserError(f"--num-samples {num_samples}: use a positive number of trials "
                        "(leave it out for search.num_samples)")
    cfg = copy.deepcopy(cfg)
    storage = resolve_storage(storage_path or cfg.search.storage_path)
    name = name or cfg.search.name or time.strftime("search-%Y%m%d-%H%M%S")
    files = RunFiles(storage, name)
    if resume:
        if not files.pull("config.yaml", "space.yaml"):
            raise UserError(f"{files.uri}: no search named '{name}' to resume there "
                            "(no config.yaml)")
        files.pull("folds.csv", STUDY_FILE)  # the scheduler and trials.csv find theirs at run time
        cfg, _ = config_from_yaml_with_extras(files.local / "config.yaml")
        space = load_space(files.local / "space.yaml", cfg)
        started = cfg.search.num_samples
        if num_samples is not None and num_samples != started:
            raise UserError(f"--num-samples {num_samples}: this search was started with "
                            f"{started}; a resumed search keeps its number of trials")
        return cfg, space, files, started
    if not cfg.data.root:
        raise UserError("no data: pass --data DIR (seed layout or the Kaggle C-NMC tree), or --demo")
    if not is_uri(cfg.data.root):  # best_config.yaml must work from any folder
        set_value(cfg, "data.root", str(Path(cfg.data.root).expanduser().resolve()),
                  where="--data")
    num_samples = num_samples if num_samples is not None else cfg.search.num_samples
    set_value(cfg, "search.num_samples", num_samples, where="--num-samples")
    set_value(cfg, "search.name", name, where="--name")
    set_value(cfg, "search.storage_path", storage, where="--storage-path")
    space_path = _resolve_space_path(str(space) if space else None, cfg, smoke)
    set_value(cfg, "search.space", str(space_path), where="--space")
    search_space = load_space(space_path, cfg)
    taken = files.exists("config.yaml") if files.remote else \
        files.local.exists() and any(files.local.iterdir())
    if taken:
        raise UserError(f"{files.uri} already exists: pass --resume to continue that search, or "
                        "another --name")
    check_storage(storage)
    if cfg.search.storage:  # a shared database: one study per search name
        names = optuna.get_all_study_names(open_storage(cfg.search.storage))
        if name in names:
            raise UserError(f"search.storage already holds a study named '{name}': pass --resume "
                            "to continue that search, or another --name")
    if cfg.search.reproducible:
        set_value(cfg, "search.max_concurrent", 1, where="search.reproducible")
        if cfg.train.deterministic == "auto":
            set_value(cfg, "train.deterministic", "true", where="search.reproducible")
    return cfg, search_space, files, num_samples


def _create(files: RunFiles, cfg: Config, space: SearchSpace,
            prepared: PreparedData) -> None:
    """A new search's own files, written only once its config, space and data are good."""
    if files.remote:
        shutil.rmtree(files.local, ignore_errors=True)  # a stale mirror of an older search
    files.local.mkdir(parents=True, exist_ok=True)
    save_config(cfg, files.local / "config.yaml")
    shutil.copyfile(space.path, files.local / "space.yaml")
    _write_folds(prepared, files.local / "folds.csv")
    if prepared.warnings:
        (files.local / "warnings.txt").write_text("\n".join(prepared.warnings) + "\n")
    files.push("config.yaml", "space.yaml", "folds.csv", "warnings.txt")


def restored_concurrency(tuner: tune.Tuner) -> int | None:
    """How many trials at once a restored search runs: the bound its first run was given.

    ``Tuner.restore`` brings back the TuneConfig from tuner.pkl, and Tune then restores the
    searcher's ``ConcurrencyLimiter`` state with its ``max_concurrent``, so the first run's bound
    holds (it is not dropped) even on a cluster of another size; Ray 2.60 offers no way to
    change it on resume. None for a Ray Client tuner (not inspectable here)."""
    tune_config = getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None)
    return None if tune_config is None else tune_config.max_concurrent_trials


def _trainable(cfg: Config, prepared: PreparedData, folds_path: str) -> Any:
    fn = tune.with_parameters(trial_fn, base=cfg, prepared=prepared, folds_path=folds_path)
    # Tune reserves the trial driver only (its CPU share, memory for it and the Ray Train
    # controller beside it, ray.driver_resource); Ray Train reserves the fold workers itself when
    # the trial starts, so the concurrency bound (max_concurrent_trials) counts them
    return tune.with_resources(fn, driver_bundle(cfg))


@dataclass
class SearchResult:
    """What ``run_search`` hands back (and what the command prints)."""

    uri: str                          # the search's directory (local path or URI)
    rows: list[dict[str, Any]]        # one typed row per trial, as in trials.csv
    num_samples: int
    best: dict[str, Any] | None       # the best completed row, or None
    best_config: Config | None        # its full resolved config (saved as best_config.yaml)
    space_keys: list[str] = field(default_factory=list)
    dashboard: str | None = None      # Ray's dashboard URL of a local Ray started here
    name: str = ""                    # the search's name and storage: --resume --name NAME
    storage: str = ""                 # --storage-path STORAGE continues it

    @property
    def interrupted(self) -> bool:
        """Fewer trials ended than were asked for (Ctrl+C, a lost driver): ``resume=True``."""
        ended = [r for r in self.rows if r["status"] in ("completed", "pruned", "failed")]
        return len(ended) < self.num_samples

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)


def run_search(cfg: Config, *, space: str | Path | None = None, storage_path: str | None = None,
               name: str | None = None, num_samples: int | None = None, resume: bool = False,
               address: str | None = None, num_cpus: float | None = None,
               smoke: bool = False) -> SearchResult:
    """Run (or with ``resume=True`` continue) a search; what ``python -m leuk_ray.search`` does.

    ``cfg`` is the base config (``load_config(...)``; ignored on resume, which reads the search's
    own ``config.yaml``); ``space`` the search-space YAML (default ``cfg.search.space``, or the
    smoke space with ``smoke``); ``storage_path``/``name``/``num_samples`` override the
    ``search.*`` keys. Prints the search's story (a line per trial epoch and per ended trial) as it
    goes. Raises ``UserError`` for a mistake, including one that every trial hit in its workers.
    """
    cfg, space_, files, num_samples = _setup(cfg, space=space, storage_path=storage_path,
                                             name=name, num_samples=num_samples, resume=resume,
                                             smoke=smoke)
    space = space_
    check_weights(cfg.model)  # backbone name and weights: fail before the data and Ray
    exp_dir, name = files.local, files.name
    print(f"search '{name}': {num_samples} trials over {', '.join(space.keys)}", flush=True)
    prepared = prepare_data(cfg.data)
    for w in prepared.warnings:
        print(f"warning: {w}", flush=True)
    print(f"data: {len(prepared.train)} images in {prepared.n_folds} folds "
          f"({'grouped by subject' if prepared.grouped_by_subject else 'IMAGE-LEVEL, not grouped'})",
          flush=True)
    dashboard = cluster.connect(address, num_cpus=num_cpus)
    check_shared_storage(files.storage, cfg)
    if resume:
        _check_same_folds(prepared, exp_dir / "folds.csv")
    else:
        _create(files, cfg, space, prepared)
    concurrent = max_concurrent_trials(cfg, prepared.n_folds)
    print(f"Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, "
          f"{ray.cluster_resources().get('GPU', 0):g} GPUs; up to {concurrent} trials at once"
          + (f"; dashboard {dashboard}" if dashboard else ""), flush=True)

    trainable = _trainable(cfg, prepared, f"{files.uri}/folds")
    if resume:
        PruneAwareOptunaSearch.resume_url = study_url(cfg, files)
        tuner = tune.Tuner.restore(files.uri, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        kept = restored_concurrency(tuner)
        note = (f"; it keeps the bound it started with, {kept} trials at once (this cluster "
                f"holds {concurrent})" if kept not in (None, concurrent) else "")
        print(f"resuming {files.uri}{note}", flush=True)
    else:
        searcher = PruneAwareOptunaSearch(
            space=space.optuna_space(), metric=SCORE, mode="max",
            points_to_evaluate=space.optuna_points() or None,
            sampler=make_sampler(cfg.search.seed), study_name=name,
            storage_url=study_url(cfg, files))
        scheduler = (ResumableASHA(time_attr="epoch", max_t=cfg.train.epochs,
                                   grace_period=min(cfg.search.grace_period, cfg.train.epochs),
                                   reduction_factor=cfg.search.reduction_factor)
                     if cfg.search.scheduler == "asha" else FollowingFIFO())
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(metric=SCORE, mode="max", search_alg=searcher,
                                        scheduler=scheduler, num_samples=num_samples,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=name, storage_path=files.storage,
                                      callbacks=[SearchProgress(space.keys, cfg.train.epochs,
                                                                num_samples), CurvesLogger()],
                                      # a trial whose driver was lost (its node, an OOM kill)
                                      # restarts and resumes its folds' checkpoints; a trial that
                                      # failed for good fails again at once (trial.FAILED_FILE)
                                      failure_config=tune.FailureConfig(
                                          max_failures=cfg.ray.trial_max_failures),
                                      verbose=0),
        )
    # a restored tuner keeps the scheduler and callbacks it was created with (ResumableASHA,
    # SearchProgress, which keeps trials.csv current); they find the experiment at run time. The
    # summary and the best config come from Tune's typed results
    results = tuner.fit()
    files.pull(PRUNED_FILE)
    pruned = read_pruned(exp_dir)
    rows = [result_row(r, space.keys, pruned) for r in results]
    if write_optuna_trials(files, cfg):
        files.push("optuna_trials.csv")
        from leuk_ray.search_report import write_report

        write_report(files)
    best = best_row(rows)
    for row in rows:  # every trial has stopped: no fold worker writes there any more
        if row["status"] in DROPPED_STATUSES:
            drop_fold_checkpoints(f"{files.uri}/folds", row["trial_id"])
    result = SearchResult(files.uri, rows, num_samples, best, None, list(space.keys), dashboard,
                          files.name, files.storage)
    if result.interrupted:
        return result
    if best is None:
        mistakes = [user_error_in(r.error) for r in results if r.error is not None]
        # every trial stopped on the user's mistake (none pruned, none failed otherwise): say it
        if mistakes and all(mistakes) and len(mistakes) == len(rows):
            first = str(mistakes[0]).strip().splitlines()[0]
            raise UserError(f"every trial failed ({len(mistakes)}; reasons in "
                            f"{files.uri}/trials.csv), the first with: {first}")
        return result
    result.best_config = apply_params(cfg, {k: best[k] for k in space.keys})
    folds = [float(best[f"fold_{i}_val_f1"]) for i in range(int(best["folds"]))]
    save_config(result.best_config, exp_dir / "best_config.yaml", extra={
        "cv_score": float(best["mean_val_f1"]), "cv_fold_scores": folds,
        "trial_id": best["trial_id"], "search_dir": files.uri})
    files.push("best_config.yaml")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(args.verbose)
    if args.demo:
        args.smoke_test = True
    cfg = config_from_args(args)
    if args.demo and not cfg.data.root and not args.resume:
        set_value(cfg, "data.root", str(demo_data(seed=cfg.data.seed)), where="--demo")
    res = run_search(cfg, space=args.space, storage_path=args.storage_path, name=args.name,
                     num_samples=args.num_samples, resume=args.resume, address=args.address,
                     num_cpus=args.num_cpus, smoke=args.smoke_test)
    uri, rows, best = res.uri, res.rows, res.best
    print(f"\n{len(rows)} trials: " + ", ".join(
        f"{res.count(s)} {s}" for s in ("completed", "pruned", "failed")))
    if res.interrupted:
        ended = sum(r["status"] in ("completed", "pruned", "failed") for r in rows)
        print(f"search interrupted: {ended} of {res.num_samples} trials ended; continue it with: "
              f"python -m leuk_ray.search --resume --name {res.name} --storage-path {res.storage}",
              flush=True)
        return 130
    if best is None:
        print(f"no trial completed; see {uri}/trials.csv", flush=True)
        return 1
    folds = [float(best[f"fold_{i}_val_f1"]) for i in range(int(best["folds"]))]
    print(f"best trial {best['trial_id']}: mean F1 {best['mean_val_f1']:.4f} "
          f"(folds {', '.join(f'{x:.4f}' for x in folds)})")
    print("  " + ", ".join(f"{k}={best[k]:.4g}" if isinstance(best[k], float) else f"{k}={best[k]}"
                           for k in res.space_keys))
    print(f"results:     {uri}")
    print(f"trials:      {uri}/trials.csv")
    print(f"best config: {uri}/best_config.yaml")
    if res.dashboard:
        print(f"dashboard:   {res.dashboard} (Jobs and Actors pages; runs as long as this Ray "
              "does)")
    print(f"report:      {uri}/search_report.md")
    if is_uri(uri):
        print(f"curves:      TensorBoard files in each trial folder under {uri} (copy them "
              "here, then tensorboard --logdir DIR)")
    else:
        print(f"curves:      tensorboard --logdir {uri}")
    print(f"live view:   python -m leuk_ray.dashboard {uri}")
    print(f"next:        python -m leuk_ray.final --from {uri}")
    return 0


if __name__ == "__main__":
    run_main(main)
