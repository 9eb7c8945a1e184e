"""TensorBoard event files that hold the training curves of a search, and nothing else.

Tune's default TensorBoard logger writes every number of every report: wall-clock marks, Ray's
timers, node ids as they come. ``CurvesLogger`` takes its place (Tune adds its own only when no
``TBXLoggerCallback`` is given) and writes, per trial, at the absolute epoch (a restored trial
continues its curves instead of starting at step 1 again):

    fold_<i>/train_loss, fold_<i>/val_loss, fold_<i>/val_f1, fold_<i>/val_auc, fold_<i>/lr
                       each fold's epoch (a NaN, e.g. AUC on a one-class validation, is left out)
    mean/val_f1_best   the trial's score (mean over folds of each fold's best F1 so far)
    mean/val_f1, mean/val_loss, mean/val_auc                                 this epoch's means

and at a trial's end its searched parameters with its score (TensorBoard's HPARAMS tab). View
them with ``tensorboard --logdir SEARCH_DIR`` (``pip install -e ".[tensorboard]"``).
"""
from __future__ import annotations

import math
from typing import Any

from ray.tune.logger import TBXLoggerCallback

from leuk_ray.fold_trainer import SCORE

FOLD_CURVES = {"train_loss": "train_loss", "val_loss": "val_loss", "val_f1_last": "val_f1",
               "val_auc_last": "val_auc", "lr": "lr"}  # report key suffix -> tag under fold_<i>/


def curves(result: dict[str, Any]) -> dict[str, float]:
    """The training curves in one trial report: tag -> value (finite numbers only)."""
    out: dict[str, Any] = {"mean/val_f1_best": result.get(SCORE),
                           "mean/val_f1": result.get("mean_val_f1_last"),
                           "mean/val_loss": result.get("mean_val_loss"),
                           "mean/val_auc": result.get("mean_val_auc_last")}
    for i in range(int(result.get("folds") or 0)):
        for key, tag in FOLD_CURVES.items():
            out[f"fold_{i}/{tag}"] = result.get(f"fold_{i}_{key}")
    return {k: float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class CurvesLogger(TBXLoggerCallback):
    """Tune's TensorBoard logger, limited to ``curves`` at the absolute epoch."""

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if trial not in self._trial_writer:
            self.log_trial_start(trial)
        step = int(result.get("epoch") or iteration)
        values = curves(result)
        writer = self._trial_writer[trial]
        for tag, value in values.items():
            writer.add_scalar(tag, value, global_step=step)
        # what log_trial_end gives TensorBoard's HPARAMS tab beside the searched parameters
        self._trial_result[trial] = {k: v for k, v in values.items() if k.startswith("mean/")}
        writer.flush()
