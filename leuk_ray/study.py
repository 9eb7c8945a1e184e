"""The search's Optuna study: where it lives, how it is opened, and the Tune searcher that feeds it.

``study.db`` (SQLite) in the search directory, or ``search.storage`` (any RDB URL Optuna takes),
holds every trial as Optuna sees it; ``python -m leuk_ray.dashboard`` and ``search_report`` read
it. Kept apart from ``leuk_ray.search`` (the command, run as ``__main__``): Tune pickles the
searcher into the experiment, and a class pickled from ``__main__`` travels by value, a frozen copy
that a resumed search could not re-point (``PruneAwareOptunaSearch.resume_url``).
"""
from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from leuk_ray.config import Config
from leuk_ray.errors import UserError
from leuk_ray.storage import RunFiles

STUDY_FILE = "study.db"


def study_path(files: RunFiles) -> Path:
    """``study.db`` where the search's trials keep their files at run time (``experiment_files``):
    the run directory itself for a local path and for file:// (a local filesystem to Tune, so its
    trials write there, not to the driver's mirror); the driver's mirror for s3:// and the like,
    uploaded as trials end."""
    if files.uri.startswith("file://"):
        return Path(files.uri[len("file://"):]) / STUDY_FILE
    return files.local / STUDY_FILE


def study_url(cfg: Config, files: RunFiles) -> str:
    """Where the search's Optuna study lives: ``search.storage``, else ``study_path``."""
    return cfg.search.storage or f"sqlite:///{study_path(files)}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at ``url``; a missing driver or an unreachable database is one line."""
    from sqlalchemy.engine import make_url

    shown = make_url(url).render_as_string(hide_password=True)
    kwargs = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}  # a dashboard may be reading it
        db = make_url(url).database
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)  # the mirror of an s3:// search
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except ImportError as e:
        raise UserError(f"search.storage = {shown}: {e} (install the database driver, e.g. "
                        "pip install psycopg2-binary for PostgreSQL)") from None
    except Exception as e:  # sqlalchemy's OperationalError and friends
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"search.storage = {shown}: cannot open the study database: {first}") \
            from None


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about trials that did not finish, and keeps its
    study in a database that a dashboard can read while the search runs.

    Stock OptunaSearch records an ASHA-stopped trial as COMPLETE with its early score, so TPE
    would learn from truncated results as if they were final. Here a trial whose last report does
    not say ``trial_finished`` (stopped by ASHA, or by a non-finite loss) is told PRUNED; Optuna
    then ranks it by its last intermediate value, below the finished ones, and a trial that raised
    is told FAIL (stock OptunaSearch tells COMPLETE when the failed trial had reported).
    Intermediate values are reported at the absolute epoch (``training_iteration`` restarts at 1
    after a restore). Each Optuna trial carries user attributes: ``tune_trial_id``, ``epochs``,
    ``mean_val_f1``, ``fold_val_f1`` (list), and at its end ``status`` and ``reason`` as in
    trials.csv.

    The study lives at ``storage_url`` (``study.db`` in the search directory by default). Tune
    pickles this searcher with the experiment; ``resume_url``, when set before ``Tuner.restore``,
    re-points the restored study at where the search is now (a moved or copied directory).
    """

    resume_url: str | None = None  # set by the search command before Tuner.restore

    def __init__(self, *args: Any, storage_url: str | None = None, **kwargs: Any) -> None:
        if storage_url:
            kwargs["storage"] = open_storage(storage_url)
        super().__init__(*args, **kwargs)
        self._storage_url = storage_url

    def _setup_study(self, mode: Any) -> None:
        super()._setup_study(mode)
        if self._metric and not self._ot_study.metric_names:  # "mean_val_f1", not "Objective 0"
            with warnings.catch_warnings():  # set_metric_names is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names([self._metric])

    # Tune pickles this searcher twice: whole, inside tuner.pkl, and through save() into its
    # searcher-state file. Neither holds the study (it is in its database) nor a connection to it:
    # unpickling reopens the study where the search is now (resume_url), so a moved directory,
    # whose old study.db path no longer exists, resumes.
    _DB_ONLY = ("_storage", "_ot_study", "_ot_trials")

    def __getstate__(self) -> dict:
        if not getattr(self, "_storage_url", None) or getattr(self, "_ot_study", None) is None:
            return dict(self.__dict__)  # an in-memory study (or none yet) is pickled whole
        state = {k: v for k, v in self.__dict__.items() if k not in self._DB_ONLY}
        state["_ot_trial_numbers"] = {tid: t.number for tid, t in self._ot_trials.items()}
        state["_ot_sampler"] = self._ot_study.sampler
        return state

    def __setstate__(self, state: dict, *, latest: bool = False) -> None:
        state = dict(state)
        numbers = state.pop("_ot_trial_numbers", None)
        sampler = state.pop("_ot_sampler", None)
        self.__dict__.update(state)
        if numbers is not None:
            self._reopen(numbers, sampler, latest=latest)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        """The searcher-state file Tune saved last (tuner.pkl's copy dates from the start)."""
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f), latest=True)

    def _reopen(self, numbers: dict[str, int], sampler: Any, *, latest: bool) -> None:
        """Load the study at ``resume_url`` (else where it was) and re-link Tune's trials to it.

        The study is written as trials are proposed and end, this searcher's state only with
        Tune's experiment checkpoint (at most every 10 s). A driver killed in between leaves
        (a) trials the study already ended: they stay as told, even when Tune reruns one to find
        its folds finished; (b) trials proposed after the last checkpoint, which Tune never
        recorded: they are marked FAIL (reason "lost") and their parameters queued again, so the
        resumed search runs them next (a ``first:`` point of the space is not skipped). Only the
        ``latest`` state (Tune's searcher-state file) can tell (b); tuner.pkl's is from the start.
        """
        url = type(self).resume_url or self._storage_url
        missing = url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists()
        try:
            if missing:  # not an empty study.db made by opening it
                raise KeyError(url)
            storage = open_storage(url)
            study = optuna.load_study(study_name=self._study_name, storage=storage,
                                      sampler=sampler, pruner=optuna.pruners.NopPruner())
        except KeyError:
            raise UserError(f"resume: no study '{self._study_name}' in {url} (was {STUDY_FILE} "
                            "left behind when the search directory was copied? copy it too, or "
                            "set search.storage to where the study is)") from None
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        self._ot_trials = {tid: optuna.Trial(study, by_number[n]._trial_id)  # noqa: SLF001
                           for tid, n in numbers.items() if n in by_number}
        self._completed_trials.update(tid for tid, n in numbers.items()
                                      if n in by_number and by_number[n].state.is_finished())
        known = set(numbers.values())
        running = optuna.trial.TrialState.RUNNING
        for t in by_number.values() if latest else ():
            if t.state == running and t.number not in known:
                study.enqueue_trial(t.params, user_attrs={"requeued_from": t.number})
                trial_id = t._trial_id  # noqa: SLF001
                storage.set_trial_user_attr(trial_id, "status", "lost")
                storage.set_trial_user_attr(trial_id, "reason", "proposed just before the search "
                                            "driver stopped, never run; proposed again")
                storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        self._storage, self._ot_study, self._storage_url = storage, study, url

    def suggest(self, trial_id: str) -> dict | None:
        new = trial_id not in self._ot_trials
        params = super().suggest(trial_id)
        if new and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value = result.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        ot, step = self._ot_trials[trial_id], int(result.get("epoch", 0))
        reported = self.__dict__.setdefault("_reported", {})  # trial id -> last epoch reported
        if reported.get(trial_id) == step:
            return
        reported[trial_id] = step
        ot.report(float(value), step)
        ot.set_user_attr("epochs", step)
        ot.set_user_attr("mean_val_f1", float(value))
        ot.set_user_attr("fold_val_f1", [result.get(f"fold_{i}_val_f1")
                                         for i in range(int(result.get("folds", 0)))])

    def _end(self, trial_id: str, state: Any, status: str, reason: str,
             value: float | None = None) -> None:
        ot = self._ot_trials[trial_id]
        try:
            ot.set_user_attr("status", status)
            ot.set_user_attr("reason", reason)
            self._ot_study.tell(ot, value, state=state)
        finally:
            self._completed_trials.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        states = optuna.trial.TrialState
        if error:
            self._end(trial_id, states.FAIL, "failed", "the trial raised (see trials.csv)")
            return
        if result and not result.get("pruned_reason") and result.get("trial_finished", False) and \
                math.isfinite(float(result.get(self.metric, float("nan")))):
            self.on_trial_result(trial_id, result)
            self._end(trial_id, states.COMPLETE, "completed", "", float(result[self.metric]))
            return
        if result:
            self.on_trial_result(trial_id, result)  # the last result comes only with completion
        reason = (result or {}).get("pruned_reason") or asha_reason((result or {}).get("epoch"))
        self._end(trial_id, states.PRUNED, "pruned", str(reason))


def asha_reason(epoch: Any) -> str:
    """The reason trials.csv and the study give for a trial ASHA stopped."""
    return f"ASHA stopped it at epoch {epoch} (below its rung's cutoff)"


def make_sampler(seed: int) -> optuna.samplers.TPESampler:
    """Optuna's TPE sampler, seeded, with the constant liar on.

    Several trials run at once: with ``constant_liar`` Optuna treats the running trials as bad
    results while it samples, so concurrent trials are not proposed next to each other. Passed
    explicitly: its default has changed between Optuna versions (False before 5.0, True since), and
    the behaviour of a parallel search should not depend on which one is installed.
    """
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def write_optuna_trials(files: RunFiles, cfg: Config) -> bool:
    """``optuna_trials.csv`` in the run's (local) files: the study as Optuna holds it, each trial's
    state (COMPLETE, PRUNED or FAIL), value, parameters and user attributes. False when the
    study has no trial (none was ever proposed)."""
    try:
        study = optuna.load_study(study_name=files.name, storage=open_storage(study_url(cfg, files)))
    except KeyError:  # no such study: a search from before studies were kept
        return False
    if not study.trials:
        return False
    files.local.mkdir(parents=True, exist_ok=True)  # a file:// mirror holds no study.db
    study.trials_dataframe().to_csv(files.local / "optuna_trials.csv", index=False)
    return True
