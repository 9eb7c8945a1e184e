"""Tune extensions a search needs and Tune lacks: a scheduler whose trials follow the experiment
(a resumed search runs where the experiment is now, not where it first ran) and ASHA whose rungs
and pruned trials survive ``--resume``.

Kept out of ``leuk_ray.search``: Tune pickles its scheduler into the experiment (tuner.pkl), and a
class defined in the ``python -m`` module is ``__main__``'s, which cloudpickle copies by value; from
here it is pickled by reference, so a resumed search runs the installed code.
"""
from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import yaml
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from leuk_ray.atomic import replacing, write_text
from leuk_ray.storage import RunFiles

# Not .json/.pkl: on restore Tune copies every .json/.pkl of the experiment into its staging dir and
# later uploads them back, which would overwrite these with the copies from restore time.
PRUNED_FILE = "pruned_trials.yaml"
ASHA_STATE_FILE = "asha_state.pickle"


# ------------------------------------------------------------------------ ASHA that survives resume
def experiment_files(trial: Any) -> RunFiles:
    """The experiment's own files where Tune has the experiment now.

    Resolved at run time from the trial's storage (Tune's ``StorageContext``, which
    ``Tuner.restore`` points at the directory it restored from), never from paths pickled when the
    search started: a search resumed on another machine, from a copied or moved experiment
    directory, or from s3:// writes beside its experiment, not where it first ran.
    """
    return RunFiles.from_fs(trial.storage.storage_filesystem,
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
        self._files: RunFiles | None = None
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

    def _bind(self, trial: Any) -> RunFiles:
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
        with replacing(files.local / ASHA_STATE_FILE) as tmp:
            self.save(str(tmp))
        write_text(files.local / PRUNED_FILE, json.dumps(self.pruned))  # JSON is YAML
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


