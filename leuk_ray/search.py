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
import json
import math
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from leuk_ray import cluster, console
from leuk_ray.cli import common_parser, config_from_args, run_main
from leuk_ray.config import Config, config_from_yaml_with_extras, save_config, set_value
from leuk_ray.curves import CurvesLogger
from leuk_ray.data import PreparedData, prepare_data
from leuk_ray.errors import UserError, user_error_in
from leuk_ray.fold_trainer import SCORE
from leuk_ray.search_space import SearchSpace, apply_params, load_space
from leuk_ray.study import (
    STUDY_FILE, PruneAwareOptunaSearch, asha_reason, make_sampler, open_storage, study_url,
    write_optuna_trials,
)
from leuk_ray.trial import trial_fn
from leuk_ray.weights import check_weights

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE_SPACE = "search_spaces/smoke.yaml"
# Not .json/.pkl: on restore Tune copies every .json/.pkl of the experiment into its staging dir and
# later uploads them back, which would overwrite these with the copies from restore time.
PRUNED_FILE = "pruned_trials.yaml"
ASHA_STATE_FILE = "asha_state.pickle"


# ------------------------------------------------------------------------ ASHA that survives resume
def experiment_files(trial: Any) -> cluster.RunFiles:
    """The experiment's own files where Tune has the experiment now.

    Resolved at run time from the trial's storage (Tune's ``StorageContext``, which
    ``Tuner.restore`` points at the directory it restored from), never from paths pickled when the
    search started: a search resumed on another machine, from a copied or moved experiment
    directory, or from s3:// writes beside its experiment, not where it first ran.
    """
    return cluster.RunFiles.from_fs(trial.storage.storage_filesystem,
                                    trial.storage.experiment_fs_path)


def _scalars(result: dict) -> dict[str, Any]:
    return {k: v for k, v in result.items()
            if v is None or isinstance(v, (bool, int, float, str))}


class FollowsExperiment:
    """Scheduler part: every trial runs where the experiment is now.

    ``Tuner.restore`` re-points the restored trials at the directory it restored from, but the
    trials the searcher proposes afterwards are made from the experiment spec saved with the
    searcher's state, whose storage is where the search first ran: after a move (another machine,
    a copied directory) they would write there. The first trial a scheduler sees is a restored one
    (Tune adds those while it resumes), so its storage is the current one; later trials that point
    elsewhere are re-pointed the way Tune re-points restored trials.
    """

    _here: Any = None  # the experiment's StorageContext now (run time only)

    def _follow(self, trial: Any) -> None:
        here, st = self._here, trial.storage
        if here is None:
            self._here = st
            return
        if (st.storage_fs_path, st.experiment_dir_name, type(st.storage_filesystem)) == (
                here.storage_fs_path, here.experiment_dir_name, type(here.storage_filesystem)):
            return
        new = copy.copy(st)
        new.storage_filesystem = here.storage_filesystem
        new.storage_fs_path = here.storage_fs_path
        new.experiment_dir_name = here.experiment_dir_name
        trial.set_storage(new)


class FollowingFIFO(FollowsExperiment, FIFOScheduler):
    """Tune's FIFO scheduler (``search.scheduler: fifo``) whose trials follow the experiment."""

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._follow(trial)
        super().on_trial_add(tune_controller, trial)


class ResumableASHA(FollowsExperiment, ASHAScheduler):
    """ASHA whose rungs survive an interrupted search, and which records whom it pruned.

    Tune restores trials and the searcher on ``--resume`` but not the scheduler's state, so the
    rung cutoffs earned by finished trials would be forgotten and a resumed weak trial would run to
    the end. This scheduler saves its state (``asha_state.pickle``) and the trials it stopped
    (``pruned_trials.yaml``: trial id -> epoch) into the experiment directory after every decision,
    before the decision takes effect, and reloads them on first use. Where that directory is comes
    from the trials at run time (``experiment_files``), so the state follows the experiment.

    A trial it stopped stays stopped. Tune saves its own trial states at most every few seconds,
    so a search interrupted just after a STOP can find that trial unfinished on resume; such a
    trial is ended again before it is started (with the result ASHA stopped it on), and if it
    still reports, it is told STOP at once.
    """

    # run-time bindings: never saved with the state nor taken from a saved state (which older
    # versions wrote with the first machine's paths in _files/_state_dir)
    _RUNTIME = ("_files", "_loaded", "_state_dir", "_here")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._files: cluster.RunFiles | None = None
        self._loaded = False
        self.pruned: dict[str, int] = {}
        self.pruned_results: dict[str, dict[str, Any]] = {}  # trial id -> the result it stopped on

    def save(self, checkpoint_path: str) -> None:
        state = {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        for k in self._RUNTIME:
            state.pop(k, None)
        self.__dict__.update(state)

    def _bind(self, trial: Any) -> cluster.RunFiles:
        """On first use: find the experiment (from ``trial``) and load the state saved there."""
        if not self._loaded or self._files is None:
            self._files = experiment_files(trial)
            self.__dict__.setdefault("pruned_results", {})  # a scheduler pickled by an older version
            if self._files.pull(ASHA_STATE_FILE):
                self.restore(str(self._files.local / ASHA_STATE_FILE))
            self._loaded = True
        return self._files

    def _save(self) -> None:
        files = self._files
        assert files is not None, "ResumableASHA saved before it saw a trial"
        files.local.mkdir(parents=True, exist_ok=True)
        state, pruned = files.local / ASHA_STATE_FILE, files.local / PRUNED_FILE
        tmp = state.with_suffix(".tmp")
        self.save(str(tmp))
        os.replace(tmp, state)
        tmp = pruned.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.pruned))  # JSON is YAML
        os.replace(tmp, pruned)
        files.push(ASHA_STATE_FILE, PRUNED_FILE)  # s3://...: uploaded before the STOP is returned

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._follow(trial)
        self._bind(trial)
        super().on_trial_add(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        for trial in tune_controller.get_trials():
            if trial.status in (Trial.PENDING, Trial.PAUSED) and trial.trial_id in self.pruned:
                self._end_pruned(tune_controller, trial)
        return super().choose_trial_to_run(tune_controller)

    def _end_pruned(self, tune_controller: Any, trial: Any) -> None:
        """A trial this scheduler had stopped, restored unfinished: end it without running it."""
        last = self.pruned_results.get(trial.trial_id)
        if last and int(trial.last_result.get(self._time_attr) or 0) < int(
                last.get(self._time_attr) or 0):
            trial.update_last_result(dict(last))  # what trials.csv and the results then show
        print(f"[trial {trial.trial_id}] was stopped by ASHA at epoch "
              f"{self.pruned[trial.trial_id]} before the interruption: not resumed", flush=True)
        tune_controller.stop_trial(trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._bind(trial)
        if trial.trial_id in self.pruned:  # stopped before: it does not come back
            return self.STOP
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and not result.get("trial_finished", False):
            self.pruned[trial.trial_id] = int(result.get(self._time_attr, 0))
            self.pruned_results[trial.trial_id] = _scalars(result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._bind(trial)
        if trial.trial_id in self.pruned:  # recorded when stopped; a later result is not ranked
            self._trial_info.pop(trial.trial_id, None)
        elif trial.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._trial_info.pop(trial.trial_id, None)


def read_pruned(exp_dir: Path) -> dict[str, int]:
    p = exp_dir / PRUNED_FILE
    return yaml.safe_load(p.read_text()) or {} if p.exists() else {}


# --------------------------------------------------------------------------- trials.csv, progress
def trial_row(trial: Any, space_keys: list[str], ended: str = "",
              pruned: dict[str, int] | None = None) -> dict[str, Any]:
    """One row of trials.csv from a Tune Trial.

    ``ended`` is 'completed'/'failed' for the trial Tune is ending right now (its status is not
    final yet); ``pruned`` maps the trials ASHA stopped to the epoch it stopped them at.
    """
    status = {"TERMINATED": "ended", "ERROR": "failed", "RUNNING": "running",
              "PENDING": "pending", "PAUSED": "paused"}.get(trial.status, trial.status.lower())
    if ended and status in ("running", "pending", "paused"):
        status = "failed" if ended == "failed" else "ended"
    error = trial.get_error() if status == "failed" else None
    return _row(trial.trial_id, status, error, trial.config, trial.last_result or {}, space_keys,
                pruned)


def result_row(result: Any, space_keys: list[str],
               pruned: dict[str, int] | None = None) -> dict[str, Any]:
    """The same row from a ``ray.tune.Result`` of the ``ResultGrid`` that ``Tuner.fit`` returns.

    Values keep their types (a searched boolean stays a bool): the best config is built from these
    rows, never from trials.csv's text. A trial that never reported has no id or metrics; it
    counts as interrupted.
    """
    res = dict(result.metrics or {})
    status = "failed" if result.error is not None else "ended"
    return _row(str(res.get("trial_id", "")), status, result.error, result.config, res,
                space_keys, pruned)


def _row(trial_id: str, status: str, error: Any, config: dict | None, res: dict,
         space_keys: list[str], pruned: dict[str, int] | None) -> dict[str, Any]:
    reason = ""
    if status == "failed":
        reason = (str(error).strip().splitlines() or ["error"])[-1][:300] if error else "error"
    elif status == "ended":
        if res.get("pruned_reason"):
            status, reason = "pruned", str(res["pruned_reason"])
        elif res.get("trial_finished"):
            status = "completed"
        elif trial_id in (pruned or {}):
            status = "pruned"
            reason = asha_reason(pruned[trial_id])
        else:
            status = "interrupted"  # stopped by Ctrl+C or a lost driver: --resume reruns it
    flat = _flatten(config or {})
    row: dict[str, Any] = {"trial_id": trial_id, "status": status, "reason": reason}
    row.update({k: flat.get(k) for k in space_keys})
    row.update({
        "mean_val_f1": res.get(SCORE),
        "mean_val_f1_last": res.get("mean_val_f1_last"),
        "epochs": res.get("epoch"),
        "folds": res.get("folds"),
    })
    for i in range(int(res.get("folds") or 0)):
        row[f"fold_{i}_val_f1"] = res.get(f"fold_{i}_val_f1")
        row[f"fold_{i}_best_epoch"] = res.get(f"fold_{i}_best_epoch")
    return row


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key.replace("/", ".")] = v
    return out


def write_trials_csv(trials: list, space_keys: list[str], path: Path,
                     ended: dict[str, str] | None = None) -> list[dict[str, Any]]:
    ended = ended or {}
    pruned = read_pruned(path.parent)
    rows = [trial_row(t, space_keys, ended.get(t.trial_id, ""), pruned) for t in trials]
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    path.parent.mkdir(parents=True, exist_ok=True)  # the mirror of an s3:// experiment
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    return rows


# ------------------------------------------------------------------------------ fold checkpoints
# What a search keeps under folds/<trial id> (Ray Train's run of that trial): while a trial runs,
# its latest checkpoint (each training fold's model, optimiser and schedule; see make_trainer).
# A completed trial's last checkpoint holds only its folds' metrics (finished folds keep no
# weights in a search: final retrains the best config), so it stays: a resumed search that
# restarts a trial whose end Tune had not recorded finds it finished and trains nothing. A pruned
# or failed trial is never resumed: its folds/<trial id> is deleted DROP_AFTER_S after it ended
# (its fold workers are gone by then), and whatever is left when the search ends.
DROP_AFTER_S = 30.0
DROPPED_STATUSES = ("pruned", "failed")


def drop_fold_checkpoints(folds_uri: str, trial_id: str) -> None:
    """Delete ``<folds_uri>/<trial_id>``, a trial's fold checkpoints (local, NFS or s3://...)."""
    target = f"{folds_uri.rstrip('/')}/{trial_id}"
    if not trial_id:
        return
    if not cluster.is_uri(target):
        shutil.rmtree(target, ignore_errors=True)
        return
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(target)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


class SearchProgress(tune.Callback):
    """Prints one line per trial epoch, keeps ``trials.csv`` current as trials end, and deletes
    the fold checkpoints of pruned and failed trials (see ``DROP_AFTER_S``)."""

    STATUS_EVERY_S = 120.0  # a status line at least this often while trials run

    def __init__(self, space_keys: list[str], max_epochs: int, num_samples: int = 0) -> None:
        self.space_keys, self.max_epochs, self.num_samples = space_keys, max_epochs, num_samples
        self.last_status = time.time()
        # where the experiment is: bound at run time from the trials (see experiment_files), as
        # this object is pickled into the experiment and restored by Tuner.restore elsewhere
        self.files: cluster.RunFiles | None = None
        self.exp_dir: Path | None = None
        self.ended: dict[str, str] = {}  # trial id -> completed/failed, as Tune tells us
        self.to_drop: dict[str, float] = {}  # pruned/failed trial id -> when it ended

    def drop_ended(self, min_age_s: float = DROP_AFTER_S) -> None:
        """Delete the fold checkpoints of the pruned/failed trials that ended min_age_s ago."""
        now = time.time()
        for tid, when in list(self.to_drop.items()):
            if now - when >= min_age_s:
                drop_fold_checkpoints(f"{self.files.uri}/folds", tid)
                del self.to_drop[tid]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        self._bind(trial)
        if self.to_drop:
            self.drop_ended()
        folds = " ".join(f"{result.get(f'fold_{i}_val_f1', float('nan')):.3f}"
                         for i in range(int(result.get("folds", 0))))
        print(f"[trial {trial.trial_id}] epoch {result.get('epoch')}/{self.max_epochs} "
              f"mean F1 {result.get(SCORE, float('nan')):.4f} (folds {folds})", flush=True)
        if time.time() - getattr(self, "last_status", 0.0) >= self.STATUS_EVERY_S:
            self.print_status(trials)

    def print_status(self, trials: list) -> None:
        """One line: how many trials run, ended how, and the best so far."""
        self.last_status = time.time()
        pruned = read_pruned(self.exp_dir) if self.exp_dir else {}
        rows = [trial_row(t, self.space_keys, self.ended.get(t.trial_id, ""), pruned)
                for t in trials]
        counts = {k: sum(r["status"] == k for r in rows)
                  for k in ("running", "completed", "pruned", "failed")}
        waiting = max(getattr(self, "num_samples", 0) - len(rows), 0) + \
            sum(r["status"] in ("pending", "paused") for r in rows)
        best = _best(rows)
        text = ", ".join(f"{v} {k}" for k, v in counts.items()) + f", {waiting} to come"
        if best:
            text += f"; best {best['mean_val_f1']:.4f} (trial {best['trial_id']})"
        print(f"status: {text}", flush=True)

    def _bind(self, trial: Any) -> cluster.RunFiles:
        self.files = experiment_files(trial)
        self.exp_dir = self.files.local
        return self.files

    def _end(self, trials: list, trial: Any, how: str) -> None:
        self._bind(trial)
        self.ended[trial.trial_id] = how
        row = trial_row(trial, self.space_keys, how, read_pruned(self.exp_dir))
        score = row["mean_val_f1"]
        text = f"{score:.4f}" if isinstance(score, float) else "-"
        why = f": {row['reason']}" if row["reason"] else ""
        print(f"[trial {trial.trial_id}] {row['status']} after {row['epochs']} epochs, mean F1 "
              f"{text}{why}", flush=True)
        write_trials_csv(trials, self.space_keys, self.exp_dir / "trials.csv", self.ended)
        self.files.push("trials.csv", STUDY_FILE)
        self.print_status(trials)
        if row["status"] in DROPPED_STATUSES:
            self.to_drop[trial.trial_id] = time.time()
        self.drop_ended()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trials, trial, "completed")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trials, trial, "failed")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if not trials:
            return
        self._bind(trials[0])
        write_trials_csv(trials, self.space_keys, self.exp_dir / "trials.csv", self.ended)
        self.files.push("trials.csv", STUDY_FILE)


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


def _demo_data(seed: int) -> str:
    from leuk_ray.data.synth import make_synthetic

    root = Path(tempfile.gettempdir()) / f"leuk_ray_demo_{seed}"
    if not (root / "train").is_dir():
        print(f"generating the synthetic demo set in {root} ...", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix="leuk_ray_demo_tmp_"))
        make_synthetic(tmp, seed=seed)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return str(root)


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


def _setup(args: argparse.Namespace) -> tuple[Config, SearchSpace, cluster.RunFiles, int]:
    """Resolve config, space, storage and name; create or check the experiment's files."""
    if args.demo:
        args.smoke_test = True
    if args.resume and not args.name:
        raise UserError("--resume needs --name NAME of the search to continue")
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples {args.num_samples}: use a positive number of trials "
                        "(leave it out for search.num_samples)")
    cfg = config_from_args(args)
    storage = cluster.resolve_storage(args.storage_path or cfg.search.storage_path)
    name = args.name or cfg.search.name or time.strftime("search-%Y%m%d-%H%M%S")
    files = cluster.RunFiles(storage, name)
    if args.resume:
        if not files.pull("config.yaml", "space.yaml"):
            raise UserError(f"{files.uri}: no search named '{name}' to resume there "
                            "(no config.yaml)")
        files.pull("folds.csv", STUDY_FILE)  # the scheduler and trials.csv find theirs at run time
        cfg, _ = config_from_yaml_with_extras(files.local / "config.yaml")
        space = load_space(files.local / "space.yaml", cfg)
        num_samples = cfg.search.num_samples
        if args.num_samples is not None and args.num_samples != num_samples:
            raise UserError(f"--num-samples {args.num_samples}: this search was started with "
                            f"{num_samples}; a resumed search keeps its number of trials")
        return cfg, space, files, num_samples
    if args.demo and not cfg.data.root:
        set_value(cfg, "data.root", _demo_data(cfg.data.seed), where="--demo")
    if not cfg.data.root:
        raise UserError("no data: pass --data DIR (seed layout or the Kaggle C-NMC tree), or --demo")
    if not cluster.is_uri(cfg.data.root):  # best_config.yaml must work from any folder
        set_value(cfg, "data.root", str(Path(cfg.data.root).expanduser().resolve()),
                  where="--data")
    num_samples = args.num_samples if args.num_samples is not None else cfg.search.num_samples
    set_value(cfg, "search.num_samples", num_samples, where="--num-samples")
    set_value(cfg, "search.name", name, where="--name")
    set_value(cfg, "search.storage_path", storage, where="--storage-path")
    space_path = _resolve_space_path(args.space, cfg, args.smoke_test)
    set_value(cfg, "search.space", str(space_path), where="--space")
    space = load_space(space_path, cfg)
    taken = files.exists("config.yaml") if files.remote else \
        files.local.exists() and any(files.local.iterdir())
    if taken:
        raise UserError(f"{files.uri} already exists: pass --resume to continue that search, or "
                        "another --name")
    cluster.check_storage(storage)
    if cfg.search.storage:  # a shared database: one study per search name
        names = optuna.get_all_study_names(open_storage(cfg.search.storage))
        if name in names:
            raise UserError(f"search.storage already holds a study named '{name}': pass --resume "
                            "to continue that search, or another --name")
    if cfg.search.reproducible:
        set_value(cfg, "search.max_concurrent", 1, where="search.reproducible")
        if cfg.train.deterministic == "auto":
            set_value(cfg, "train.deterministic", "true", where="search.reproducible")
    return cfg, space, files, num_samples


def _create(files: cluster.RunFiles, cfg: Config, space: SearchSpace,
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


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    done = [r for r in rows if r["status"] == "completed"
            and isinstance(r["mean_val_f1"], (int, float)) and math.isfinite(r["mean_val_f1"])]
    return max(done, key=lambda r: r["mean_val_f1"]) if done else None


def _trainable(cfg: Config, prepared: PreparedData, folds_path: str) -> Any:
    fn = tune.with_parameters(trial_fn, base=cfg, prepared=prepared, folds_path=folds_path)
    # Tune reserves the trial driver only (its CPU share, memory for it and the Ray Train
    # controller beside it, ray.driver_resource); Ray Train reserves the fold workers itself when
    # the trial starts, so the concurrency bound (cluster.max_concurrent_trials) counts them
    return tune.with_resources(fn, cluster.driver_bundle(cfg))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(args.verbose)
    cfg, space, files, num_samples = _setup(args)
    check_weights(cfg.model)  # backbone name and weights: fail before the data and Ray
    exp_dir, name = files.local, files.name
    print(f"search '{name}': {num_samples} trials over {', '.join(space.keys)}", flush=True)
    prepared = prepare_data(cfg.data)
    for w in prepared.warnings:
        print(f"warning: {w}", flush=True)
    print(f"data: {len(prepared.train)} images in {prepared.n_folds} folds "
          f"({'grouped by subject' if prepared.grouped_by_subject else 'IMAGE-LEVEL, not grouped'})",
          flush=True)
    dashboard = cluster.connect(args.address, num_cpus=args.num_cpus)
    cluster.check_shared_storage(files.storage, cfg)
    if args.resume:
        _check_same_folds(prepared, exp_dir / "folds.csv")
    else:
        _create(files, cfg, space, prepared)
    concurrent = cluster.max_concurrent_trials(cfg, prepared.n_folds)
    print(f"Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, "
          f"{ray.cluster_resources().get('GPU', 0):g} GPUs; up to {concurrent} trials at once"
          + (f"; dashboard {dashboard}" if dashboard else ""), flush=True)

    trainable = _trainable(cfg, prepared, f"{files.uri}/folds")
    if args.resume:
        PruneAwareOptunaSearch.resume_url = study_url(cfg, files)
        tuner = tune.Tuner.restore(files.uri, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        print(f"resuming {files.uri}", flush=True)
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
    best = _best(rows)
    for row in rows:  # every trial has stopped: no fold worker writes there any more
        if row["status"] in DROPPED_STATUSES:
            drop_fold_checkpoints(f"{files.uri}/folds", row["trial_id"])
    print(f"\n{len(rows)} trials: " + ", ".join(
        f"{sum(r['status'] == s for r in rows)} {s}" for s in ("completed", "pruned", "failed")))
    unfinished = [r for r in rows if r["status"] not in ("completed", "pruned", "failed")]
    if unfinished or len(rows) < num_samples:
        print(f"search interrupted: {len(rows) - len(unfinished)} of {num_samples} trials ended; "
              f"continue it with: python -m leuk_ray.search --resume --name {name} "
              f"--storage-path {files.storage}", flush=True)
        return 130
    if best is None:
        mistakes = [user_error_in(r.error) for r in results if r.error is not None]
        if mistakes and all(mistakes):  # every trial stopped on the user's mistake: say it once
            first = str(mistakes[0]).strip().splitlines()[0]
            raise UserError(f"every trial failed ({len(mistakes)}; reasons in "
                            f"{files.uri}/trials.csv), the first with: {first}")
        print(f"no trial completed; see {files.uri}/trials.csv", flush=True)
        return 1
    best_cfg = apply_params(cfg, {k: best[k] for k in space.keys})
    folds = [float(best[f"fold_{i}_val_f1"]) for i in range(int(best["folds"]))]
    save_config(best_cfg, exp_dir / "best_config.yaml", extra={
        "cv_score": float(best["mean_val_f1"]), "cv_fold_scores": folds,
        "trial_id": best["trial_id"], "search_dir": files.uri})
    files.push("best_config.yaml")
    print(f"best trial {best['trial_id']}: mean F1 {best['mean_val_f1']:.4f} "
          f"(folds {', '.join(f'{x:.4f}' for x in folds)})")
    print("  " + ", ".join(f"{k}={best[k]:.4g}" if isinstance(best[k], float) else f"{k}={best[k]}"
                           for k in space.keys))
    print(f"results:     {files.uri}")
    print(f"trials:      {files.uri}/trials.csv")
    print(f"best config: {files.uri}/best_config.yaml")
    if dashboard:
        print(f"dashboard:   {dashboard} (Jobs and Actors pages; runs as long as this Ray does)")
    print(f"report:      {files.uri}/search_report.md")
    if files.remote:
        print(f"curves:      TensorBoard files in each trial folder under {files.uri} (copy them "
              "here, then tensorboard --logdir DIR)")
    else:
        print(f"curves:      tensorboard --logdir {files.uri}")
    print(f"live view:   python -m leuk_ray.dashboard {files.uri}")
    print(f"next:        python -m leuk_ray.final --from {files.uri}")
    return 0


if __name__ == "__main__":
    run_main(main)
