"""The Tune extensions of the search, without starting Ray: the resumable ASHA scheduler, the
prune-aware Optuna searcher, the progress callback, and where their files go (issue 14.1, 14.2,
14.5).

Real Tune ``Trial`` objects with real ``StorageContext``s (local paths, ``file://`` and a pyarrow
filesystem that is not the local one, the way s3:// reaches Tune), real ASHA brackets and a real
Optuna study. The scheduler and the callback are pickled when the search starts and unpickled by
``Tuner.restore``; the tests do the same.
"""
from __future__ import annotations

import csv
import pickle
import shutil
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray.tune")
import pyarrow.fs as pafs  # noqa: E402
from ray.train._internal.storage import StorageContext  # noqa: E402
from ray.tune.experiment import Trial  # noqa: E402

from leuk_ray.storage import RunFiles  # noqa: E402
from leuk_ray.results import SearchProgress  # noqa: E402
from leuk_ray.tune_ext import (  # noqa: E402
    ASHA_STATE_FILE, PRUNED_FILE, FollowingFIFO, ResumableASHA,
)
from leuk_ray.study import PruneAwareOptunaSearch, write_optuna_trials  # noqa: E402

M = "mean_val_f1"


def _asha() -> ResumableASHA:
    return ResumableASHA(time_attr="epoch", metric=M, mode="max", max_t=6, grace_period=2,
                         reduction_factor=2)


def _trial(storage: StorageContext, tid: str, **config: float) -> Trial:
    return Trial("leuk_ray_trial", config=dict(config), storage=storage, stub=True, trial_id=tid)


def _result(epoch: int, score: float, finished: bool = False) -> dict:
    return {"epoch": epoch, M: score, "training_iteration": epoch, "trial_finished": finished,
            "folds": 2, "fold_0_val_f1": score, "fold_1_val_f1": score}


class _Controller:
    """What Tune hands a scheduler (``TuneController._wrapped()``: ``get_trials``, ``stop_trial``).
    ``stop_trial`` of a pending trial does what Tune's does: the scheduler's ``on_trial_remove``,
    then the trial is TERMINATED without starting."""

    def __init__(self, scheduler: ResumableASHA, trials: list[Trial]) -> None:
        self.scheduler, self.trials, self.stopped = scheduler, trials, []

    def get_trials(self) -> list[Trial]:
        return self.trials

    def stop_trial(self, trial: Trial) -> None:
        self.scheduler.on_trial_remove(self, trial)
        trial.set_status(Trial.TERMINATED)
        self.stopped.append(trial.trial_id)


def _first_run(storage: StorageContext) -> tuple[bytes, bytes]:
    """A search's first run: ASHA keeps a good trial and stops a weak one at the rung (epoch 2).
    Returns the scheduler and the callback as pickled when the search started (tuner.pkl)."""
    sched, progress = _asha(), SearchProgress(["train.lr"], 6)
    at_start = pickle.dumps(sched), pickle.dumps(progress)
    good, weak = _trial(storage, "good", **{"train.lr": 3e-3}), _trial(storage, "weak",
                                                                       **{"train.lr": 1e-7})
    ctl = _Controller(sched, [good, weak])
    for t in (good, weak):
        sched.on_trial_add(ctl, t)
    good.update_last_result(_result(2, 0.9))
    assert sched.on_trial_result(ctl, good, _result(2, 0.9)) == ResumableASHA.CONTINUE
    weak.update_last_result(_result(2, 0.1))
    assert sched.on_trial_result(ctl, weak, _result(2, 0.1)) == ResumableASHA.STOP
    return at_start


def test_asha_state_follows_a_moved_experiment(tmp_path):
    """Issue 14.1: the scheduler pickled with the first location wrote its state there, so a
    search resumed from a copied/moved directory lost its rungs (or crashed saving them)."""
    first = StorageContext(storage_path=str(tmp_path / "a"), experiment_dir_name="s")
    sched_blob, _ = _first_run(first)
    assert yaml.safe_load((tmp_path / "a" / "s" / PRUNED_FILE).read_text()) == {"weak": 2}

    shutil.move(tmp_path / "a", tmp_path / "b")  # another machine, another mount point
    moved = StorageContext(storage_path=str(tmp_path / "b"), experiment_dir_name="s")
    sched = pickle.loads(sched_blob)  # what Tuner.restore brings back
    new = _trial(moved, "new", **{"train.lr": 1e-3})
    ctl = _Controller(sched, [new])
    sched.on_trial_add(ctl, new)
    # the rung remembers 0.9 and 0.1 (cutoff 0.5): a new trial at 0.4 is below it (a fresh rung
    # lets the first trial at it continue)
    assert sched.on_trial_result(ctl, new, _result(2, 0.4)) == ResumableASHA.STOP
    assert yaml.safe_load((tmp_path / "b" / "s" / PRUNED_FILE).read_text()) == {"weak": 2, "new": 2}
    assert (tmp_path / "b" / "s" / ASHA_STATE_FILE).is_file()
    assert not (tmp_path / "a").exists()  # nothing written where the search first ran


@pytest.mark.parametrize("make", [_asha, FollowingFIFO], ids=["asha", "fifo"])
def test_new_trials_after_a_move_run_where_the_experiment_is_now(tmp_path, make):
    """Issue 14.1: after Tuner.restore from a moved directory the restored trials point there,
    but the trials the searcher proposes next are made from the spec saved with the searcher
    state, whose storage is the first location. The scheduler re-points them."""
    first = StorageContext(storage_path=str(tmp_path / "a"), experiment_dir_name="s")
    moved = StorageContext(storage_path=str(tmp_path / "b"), experiment_dir_name="s")
    sched = make()
    restored, proposed = _trial(moved, "restored"), _trial(first, "proposed")
    ctl = _Controller(sched, [restored, proposed])
    for t in (restored, proposed):
        sched.on_trial_add(ctl, t)
    assert proposed.storage.experiment_fs_path == moved.experiment_fs_path
    assert restored.storage.experiment_fs_path == moved.experiment_fs_path


def test_asha_state_through_a_filesystem_that_is_not_local(tmp_path):
    """Issue 14.1: with s3:// Tune hands out a pyarrow filesystem, not a local path; the state
    goes through that filesystem (here a SubTreeFileSystem, which is not a LocalFileSystem)."""
    root = tmp_path / "bucket"
    root.mkdir()
    fs = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
    storage = StorageContext(storage_path="results", experiment_dir_name="s",
                             storage_filesystem=fs)
    sched_blob, _ = _first_run(storage)
    assert yaml.safe_load((root / "results" / "s" / PRUNED_FILE).read_text()) == {"weak": 2}
    sched = pickle.loads(sched_blob)
    new = _trial(storage, "new")
    sched.on_trial_add(_Controller(sched, [new]), new)
    assert sched.pruned == {"weak": 2}  # read back through the filesystem


def test_a_pruned_trial_restored_unfinished_is_ended_not_run(tmp_path):
    """Issue 14.5: ASHA's decision is saved per result, Tune's trial states at most every ~10 s.
    A search interrupted in between restores the stopped trial as unfinished; it must end again
    (with the result it was stopped on) instead of running to the end."""
    storage = StorageContext(storage_path=str(tmp_path / "r"), experiment_dir_name="s")
    sched_blob, _ = _first_run(storage)

    sched = pickle.loads(sched_blob)
    # Tune's last saved state: both trials still running at epoch 1, so both are pending again
    weak, good = _trial(storage, "weak", **{"train.lr": 1e-7}), _trial(storage, "good")
    for t in (weak, good):
        t.update_last_result(_result(1, 0.5))
    ctl = _Controller(sched, [weak, good])
    for t in (weak, good):
        sched.on_trial_add(ctl, t)
    assert sched.choose_trial_to_run(ctl) is good
    assert ctl.stopped == ["weak"] and weak.status == Trial.TERMINATED
    assert weak.last_result["epoch"] == 2 and weak.last_result[M] == 0.1
    # and should it report anyway, it is stopped at once
    assert sched.on_trial_result(ctl, weak, _result(3, 0.95)) == ResumableASHA.STOP
    assert sched.pruned == {"weak": 2}


def test_progress_writes_trials_csv_where_the_experiment_is_now(tmp_path):
    """Issue 14.1: the progress callback kept the first run's path and wrote trials.csv there."""
    first = StorageContext(storage_path=str(tmp_path / "a"), experiment_dir_name="s")
    _, progress_blob = _first_run(first)
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = StorageContext(storage_path=str(tmp_path / "b"), experiment_dir_name="s")
    progress = pickle.loads(progress_blob)
    weak = _trial(moved, "weak", **{"train.lr": 1e-7})
    weak.update_last_result(_result(2, 0.1))
    progress.on_trial_complete(iteration=1, trials=[weak], trial=weak)
    with (tmp_path / "b" / "s" / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["trial_id"], r["status"]) for r in rows] == [("weak", "pruned")]
    assert "ASHA stopped it at epoch 2" in rows[0]["reason"]
    assert not (tmp_path / "a").exists()


def test_progress_uploads_trials_csv_through_a_remote_filesystem(tmp_path):
    """The s3:// path of the callback: trials.csv is written to a local mirror, then uploaded
    through the filesystem Tune resolved."""
    root = tmp_path / "bucket"
    root.mkdir()
    fs = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
    storage = StorageContext(storage_path="results", experiment_dir_name="s",
                             storage_filesystem=fs)
    progress = SearchProgress(["train.lr"], 6)
    t = _trial(storage, "t1", **{"train.lr": 1e-3})
    t.update_last_result(_result(6, 0.8, finished=True))
    progress.on_trial_complete(iteration=1, trials=[t], trial=t)
    with (root / "results" / "s" / "trials.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["completed"]


# ------------------------------------------------------------------------- the prune-aware searcher
def _searcher(url: str | None = None, name: str = "s") -> PruneAwareOptunaSearch:
    from optuna.distributions import FloatDistribution

    from leuk_ray.study import make_sampler

    return PruneAwareOptunaSearch(space={"train/lr": FloatDistribution(1e-7, 1e-2, log=True)},
                                  metric=M, mode="max", sampler=make_sampler(0),
                                  study_name=name, storage_url=url)


def test_searcher_tells_optuna_pruned_for_stopped_and_complete_for_finished():
    import optuna

    s = _searcher()
    s.suggest("stopped")
    s.suggest("finished")
    s.on_trial_result("stopped", _result(1, 0.4))
    s.on_trial_complete("stopped", _result(2, 0.3))  # ASHA's STOP: the last report is not final
    for e in (1, 2, 3):
        s.on_trial_result("finished", _result(e, 0.5 + e / 10))
    s.on_trial_complete("finished", _result(3, 0.8, finished=True))
    by_state = {t.state: t for t in s._ot_study.trials}  # noqa: SLF001
    pruned = by_state[optuna.trial.TrialState.PRUNED]
    assert pruned.intermediate_values == {1: 0.4, 2: 0.3}  # at the absolute epoch
    assert by_state[optuna.trial.TrialState.COMPLETE].value == pytest.approx(0.8)


def test_searcher_skips_non_finite_reports():
    import optuna

    s = _searcher()
    s.suggest("t")
    s.on_trial_result("t", _result(1, float("nan")))
    s.on_trial_complete("t", {**_result(1, float("nan")), "pruned_reason": "non-finite loss"})
    (trial,) = s._ot_study.trials  # noqa: SLF001
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values == {}


@pytest.mark.parametrize("uri", [False, True], ids=["local", "file-uri"])
def test_study_db_and_optuna_trials_csv(tmp_path, uri):
    """Issue 15: the study is kept in study.db in the run's files (the driver's mirror for a
    remote storage; file:// takes the s3:// code path); optuna_trials.csv is read from it, with
    each trial's state and the attributes a user looks for."""
    import optuna

    from leuk_ray.config import Config
    from leuk_ray.study import STUDY_FILE, study_url

    exp = tmp_path / "results" / "s"
    exp.mkdir(parents=True)
    files = RunFiles.from_path(f"file://{exp}" if uri else str(exp))
    assert files.remote is uri
    url = study_url(Config(), files)
    # file:// is a local filesystem to Tune: its trials write the run directory itself, and the
    # study is kept there too (not in the driver's mirror, which nothing would upload)
    assert url == f"sqlite:///{exp / STUDY_FILE}"
    s = _searcher(url, name=files.name)
    s.suggest("a")
    s.on_trial_result("a", _result(1, 0.2))
    s.on_trial_complete("a", _result(2, 0.3))
    s.suggest("b")
    s.on_trial_complete("b", _result(6, 0.8, finished=True))
    s.suggest("c")
    s.on_trial_result("c", _result(1, 0.5))
    s.on_trial_complete("c", error=True)
    study = optuna.load_study(study_name=files.name, storage=url)  # another reader, e.g. a dashboard
    a, b, c = study.trials
    assert [t.state.name for t in (a, b, c)] == ["PRUNED", "COMPLETE", "FAIL"]
    assert a.intermediate_values == {1: 0.2, 2: 0.3} and a.value == 0.3
    assert b.value == 0.8 and c.value is None
    assert study.metric_names == [M]  # the dashboard's axis says mean_val_f1, not "Objective 0"
    assert a.user_attrs["tune_trial_id"] == "a" and a.user_attrs["status"] == "pruned"
    assert a.user_attrs["reason"].startswith("ASHA stopped it at epoch 2")
    assert b.user_attrs["epochs"] == 6 and b.user_attrs["fold_val_f1"] == [0.8, 0.8]
    assert c.user_attrs["status"] == "failed"
    assert write_optuna_trials(files, Config())
    with (files.local / "optuna_trials.csv").open() as f:
        assert [r["state"] for r in csv.DictReader(f)] == ["PRUNED", "COMPLETE", "FAIL"]


def test_restored_searcher_follows_a_moved_study(tmp_path):
    """A search directory moved elsewhere: the restored searcher writes to the study.db there,
    not to the pickled path of the old place."""
    import optuna

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    s = _searcher(f"sqlite:///{old / 'study.db'}")
    s.suggest("a")
    s.on_trial_result("a", _result(1, 0.4))
    s.save(str(old / "searcher.pkl"))
    shutil.move(str(old), str(new))
    PruneAwareOptunaSearch.resume_url = f"sqlite:///{new / 'study.db'}"
    try:
        r = PruneAwareOptunaSearch()
        r.restore(str(new / "searcher.pkl"))
    finally:
        PruneAwareOptunaSearch.resume_url = None
    r.on_trial_complete("a", _result(3, 0.6, finished=True))
    assert not old.exists()
    (t,) = optuna.load_study(study_name="s", storage=f"sqlite:///{new / 'study.db'}").trials
    assert t.state.name == "COMPLETE" and t.value == 0.6


def test_trial_the_study_ended_after_the_last_save_is_not_told_again(tmp_path):
    """The study is written as trials end, the searcher's state only with Tune's experiment
    checkpoint: a driver killed in between restores a searcher that thinks a trial still runs.
    Tune reruns it (its folds are finished) and reports it complete again; telling the study
    raised UpdateFinishedTrialError and ended the resumed search (CI, test_faults)."""
    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"
    s = _searcher(url)
    s.suggest("a")
    s.on_trial_result("a", _result(2, 0.4))
    s.save(str(tmp_path / "searcher.pkl"))  # Tune's last experiment checkpoint
    s.on_trial_complete("a", _result(2, 0.4))  # ASHA stops it; then the driver is killed
    r = PruneAwareOptunaSearch()
    r.restore(str(tmp_path / "searcher.pkl"))
    r.on_trial_result("a", _result(3, 0.9))
    r.on_trial_complete("a", _result(3, 0.9, finished=True))  # the rerun finds it finished
    (t,) = optuna.load_study(study_name="s", storage=url).trials
    assert t.state.name == "PRUNED" and t.intermediate_values == {2: 0.4}


def test_searcher_pickled_in_tuner_pkl_unpickles_after_a_move(tmp_path):
    """Tune pickles the searcher whole into tuner.pkl; an RDBStorage in it reconnected to the old
    study.db path on unpickling, which fails once the directory was moved (test_search's moved
    URI). The pickle holds no connection: it reopens the study where the search is now."""
    import optuna

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    s = _searcher(f"sqlite:///{old / 'study.db'}")
    s.suggest("a")
    blob = pickle.dumps(s)
    shutil.move(str(old), str(new))
    PruneAwareOptunaSearch.resume_url = f"sqlite:///{new / 'study.db'}"
    try:
        r = pickle.loads(blob)
    finally:
        PruneAwareOptunaSearch.resume_url = None
    r.on_trial_complete("a", _result(3, 0.6, finished=True))
    assert not old.exists()
    (t,) = optuna.load_study(study_name="s", storage=f"sqlite:///{new / 'study.db'}").trials
    assert t.state.name == "COMPLETE"


def test_copy_without_its_study_is_one_clear_line(tmp_path):
    """tuner.pkl goes through Ray's cloudpickle, which copies classes of ``__main__`` (the search
    command) by value, so the searcher lives outside it and ``resume_url`` reaches the unpickled
    one. A copy made without study.db is told so, and no empty study.db is left in its place."""
    from ray import cloudpickle

    from leuk_ray.errors import UserError

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    s = _searcher(f"sqlite:///{old / 'study.db'}")
    s.suggest("a")
    blob = cloudpickle.dumps(s)
    new.mkdir()
    PruneAwareOptunaSearch.resume_url = f"sqlite:///{new / 'study.db'}"
    try:
        with pytest.raises(UserError, match=r"no study 's' in sqlite:///.*new/study\.db.*copy it"):
            cloudpickle.loads(blob)
    finally:
        PruneAwareOptunaSearch.resume_url = None
    assert not (new / "study.db").exists()


def test_trial_proposed_after_the_last_save_is_proposed_again(tmp_path):
    """A trial the study recorded as proposed after Tune's last searcher checkpoint was never
    known to Tune: on resume it is marked FAIL ("lost") and its parameters come next, so a
    ``first:`` point is not skipped (test_faults: the exploding point was lost)."""
    import optuna
    from optuna.distributions import FloatDistribution

    from leuk_ray.study import make_sampler

    url = f"sqlite:///{tmp_path / 'study.db'}"
    s = PruneAwareOptunaSearch(space={"train/lr": FloatDistribution(1e-7, 20.0, log=True)},
                               metric=M, mode="max", sampler=make_sampler(0), study_name="s",
                               storage_url=url,
                               points_to_evaluate=[{"train/lr": 1e-3}, {"train/lr": 10.0}])
    assert s.suggest("a") == {"train": {"lr": 1e-3}}
    s.on_trial_complete("a", _result(3, 0.6, finished=True))
    s.save(str(tmp_path / "searcher.pkl"))
    s.suggest("b")  # the second point, proposed; then the driver is killed
    r = pickle.loads(pickle.dumps(s))  # tuner.pkl's copy is older still; any copy will do
    r.restore(str(tmp_path / "searcher.pkl"))
    assert r.suggest("c") == {"train": {"lr": 10.0}}
    study = optuna.load_study(study_name="s", storage=url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "RUNNING"]
    assert study.trials[1].user_attrs["status"] == "lost"
    assert study.trials[2].user_attrs["tune_trial_id"] == "c"


def test_study_storage_key_is_checked_at_the_edge():
    from leuk_ray.config import load_config
    from leuk_ray.errors import UserError

    with pytest.raises(UserError, match="search.storage.*not an RDB URL"):
        load_config(None, ["search.storage=/tmp/study.db"])
    assert load_config(None, ["search.storage=postgresql://u@h/db"]).search.storage


def test_optuna_trials_csv_without_a_study(tmp_path):
    from leuk_ray.config import Config

    assert not write_optuna_trials(RunFiles.from_path(f"file://{tmp_path / 'none'}"), Config())


def test_run_files_from_tune_storage(tmp_path):
    """RunFiles.from_fs: a local filesystem is the directory itself (also for file://); another
    filesystem is used as given, with a local mirror."""
    local = StorageContext(storage_path=f"file://{tmp_path}", experiment_dir_name="s")
    files = RunFiles.from_fs(local.storage_filesystem, local.experiment_fs_path)
    assert not files.remote and files.local == tmp_path / "s"
    (tmp_path / "s" / "x.txt").write_text("remote")  # StorageContext made s/
    fs = pafs.SubTreeFileSystem(str(tmp_path.parent), pafs.LocalFileSystem())
    files = RunFiles.from_fs(fs, f"{tmp_path.name}/s")  # like s3's bucket/path
    assert files.remote and files.newest("*.txt") == "x.txt" and files.pull("x.txt") == ["x.txt"]
    assert (files.local / "x.txt").read_text() == "remote"
    assert Path(files.local) != tmp_path / "s"


def test_tensorboard_curves_are_the_training_curves_only():
    """Issue 15: Tune's default TensorBoard logger wrote every number of a report (timestamps,
    node ids, timers); CurvesLogger writes per-fold losses, F1, AUC and learning rate, and the
    means."""
    from leuk_ray.curves import CurvesLogger, curves

    result = {**_result(3, 0.7), "mean_val_f1_last": 0.65, "mean_val_loss": 0.4,
              "mean_val_auc_last": 0.8, "fold_0_val_auc_last": 0.75, "timestamp": 1e9,
              "report_ts": 1.7e9, "fold_0_node": "abc", "time_this_iter_s": 2.0,
              "fold_0_train_loss": 0.5, "fold_0_val_loss": 0.45, "fold_0_val_f1_last": 0.6,
              "fold_0_lr": 1e-3, "fold_1_train_loss": 0.55, "fold_1_val_loss": float("nan"),
              "fold_1_val_f1_last": 0.7, "fold_1_lr": 1e-3, "trial_finished": True}
    tags = curves(result)
    assert tags == {"mean/val_f1_best": 0.7, "mean/val_f1": 0.65, "mean/val_loss": 0.4,
                    "mean/val_auc": 0.8, "fold_0/val_auc": 0.75, "fold_0/train_loss": 0.5,
                    "fold_0/val_loss": 0.45, "fold_0/val_f1": 0.6,
                    "fold_0/lr": 1e-3, "fold_1/train_loss": 0.55, "fold_1/val_f1": 0.7,
                    "fold_1/lr": 1e-3}  # a NaN is left out, not written
    from ray.tune.logger import TBXLoggerCallback
    assert issubclass(CurvesLogger, TBXLoggerCallback)  # so Tune adds no logger of its own


def test_a_restored_tuner_keeps_its_concurrency_bound(tmp_path):
    """Issue 14.1: the concurrency bound survives Tuner.restore (tuner.pkl); the resumed search
    says which bound it runs with."""
    from ray import tune

    from leuk_ray.search import restored_concurrency

    def trainable(config):  # never run here
        return None

    tune.Tuner(trainable, tune_config=tune.TuneConfig(max_concurrent_trials=4),
               run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path)))
    restored = tune.Tuner.restore(str(tmp_path / "exp"), trainable=trainable)
    assert restored_concurrency(restored) == 4


def test_run_files_of_a_gcs_filesystem_are_those_of_its_gs_uri():
    """pyarrow names Google Cloud Storage 'gcs', users and pyarrow's URI parser 'gs': a run that
    Tune hands over as a filesystem must be the run of the --storage-path URI, with the same
    local mirror (else study.db would be pushed from one folder and looked for in another)."""
    fs = pafs.GcsFileSystem(anonymous=True)  # no request is made
    via_fs = RunFiles.from_fs(fs, "bucket/results/s1")
    via_uri = RunFiles.from_path("gs://bucket/results/s1")
    as_gcs = RunFiles.from_path("gcs://bucket/results/s1")  # pyarrow's other spelling
    assert via_fs.uri == via_uri.uri == as_gcs.uri == "gs://bucket/results/s1"
    assert via_fs.local == via_uri.local == as_gcs.local
