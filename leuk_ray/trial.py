"""One search trial, as Ray Tune runs it: the base config with the trial's values, trained on all
folds by Ray Train.

This module is what every trial driver imports (one Ray actor per running trial, placed on the
head node of a cluster), so it stays light: no Optuna search, no training engine. The fold workers
import the engine themselves (``leuk_ray.fold_trainer.fold_worker``). Measured on a 2-core
machine: importing this module takes ~3.5 s and 0.83 GB peak memory (torch is most of it, and
Ray Train's TorchTrainer needs it); importing ``leuk_ray.search`` took ~8.5 s and 1.1 GB.
"""
from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from leuk_ray.config import Config
from leuk_ray.data import PreparedData
from leuk_ray.errors import UserError
from leuk_ray.fold_trainer import (FoldsFailedError, fit_or_explain, make_trainer,
                                   raise_user_error)
from leuk_ray.search_space import apply_params

# Written beside a trial's fold checkpoints when it failed for a reason a retry cannot fix (a
# user error, or Ray Train's restarts exhausted). Tune retries every failed trial
# (ray.trial_max_failures), meant for a lost trial driver; a retried trial that finds this file
# fails again at once with the same message instead of training again.
FAILED_FILE = "trial_failed.txt"


def trial_fn(params: dict[str, Any], *, base: Config, prepared: PreparedData, folds_path: str) -> None:
    """One Tune trial: ``base`` with ``params`` applied, one Ray Train worker per fold.

    The inner run is named after the trial, so a trial restarted by ``--resume`` resumes its folds
    from their last checkpoints instead of starting again.
    """
    cfg = apply_params(base, params)
    trial_id = tune.get_context().get_trial_id()
    marker = f"{folds_path.rstrip('/')}/{trial_id}/{FAILED_FILE}"
    earlier = _read(marker)
    if earlier:
        kind, _, message = earlier.partition(": ")
        raise (UserError if kind == "UserError" else FoldsFailedError)(message)
    # best_weights=False: a trial is scored on its folds' metrics, and final retrains the best
    # config; its fold checkpoints keep only what resuming the trial needs
    trainer = make_trainer(cfg, prepared, storage_path=folds_path, name=trial_id,
                           callbacks=[TuneReportCallback()], best_weights=False,
                           epoch_lines=False, label=f"[trial {trial_id}] ")
    try:
        result = fit_or_explain(trainer, cfg)
        raise_user_error(result.metrics)  # a fold's user error fails this trial, without retries
    except (UserError, FoldsFailedError) as e:
        _write(marker, f"{type(e).__name__}: {e}")
        raise


def _read(path: str) -> str:
    """The text of a local file or a URI (s3://...); '' when there is none."""
    import pyarrow.fs as pafs

    fs, p = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return ""
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def _write(path: str, text: str) -> None:
    import pyarrow.fs as pafs

    fs, p = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    fs.create_dir(p.rpartition("/")[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())
