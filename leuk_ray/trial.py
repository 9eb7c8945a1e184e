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
from leuk_ray.fold_trainer import make_trainer, raise_user_error
from leuk_ray.search_space import apply_params


def trial_fn(params: dict[str, Any], *, base: Config, prepared: PreparedData, folds_path: str) -> None:
    """One Tune trial: ``base`` with ``params`` applied, one Ray Train worker per fold.

    The inner run is named after the trial, so a trial restarted by ``--resume`` resumes its folds
    from their last checkpoints instead of starting again.
    """
    cfg = apply_params(base, params)
    trial_id = tune.get_context().get_trial_id()
    trainer = make_trainer(cfg, prepared, storage_path=folds_path, name=trial_id,
                           callbacks=[TuneReportCallback()])
    result = trainer.fit()
    raise_user_error(result.metrics)  # a fold's user error fails this trial, without retries
