"""Ray Train: k folds trained side by side, one fold per worker, sharing their metrics every epoch.

Worker i trains fold i with the plain-PyTorch engine (no DDP: each fold is its own model). Every
epoch the workers exchange their fold metrics with ``all_gather_object`` over Ray Train's gloo
process group (gloo also works beside CUDA, where NCCL cannot gather CPU objects; its timeout is
``ray.collective_timeout_s``, which must outlast the slowest fold's epoch: a fold that stopped
early waits there for the others), and every worker calls
``ray.train.report`` once (it is a barrier), attaching ``fold_<i>.pt`` so that Ray merges one
checkpoint directory holding every fold. The fold writes its file on the training path; by
default (``ray.checkpoint_upload=async``) Ray copies it to storage in a background thread while
the next epoch trains, and the epoch's metrics reach Tune once the copy is stored (a copy left by
a worker that died first is removed by the next fold worker on its node: ``staging``). A restarted
worker group (``FailureConfig``) or a restored run finds its fold's state there and continues
after the last finished epoch; a run restored after all its folds had finished trains nothing and
writes no new checkpoint.

A fold that stops early keeps reporting its best score until every fold is done. A fold whose loss
turns non-finite ends the run for all folds with ``pruned_reason`` set (the search marks the trial
pruned with that reason).
A ``UserError`` in a fold worker (bad weights, data or checkpoint) ends the run for all folds with
``user_error`` set, without Ray Train's retries (meant for lost nodes); the driver raises it.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch.distributed as dist
from ray.train import (Checkpoint, CheckpointConfig, CheckpointUploadMode, ControllerError,
                       FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError,
                       WorkerGroupError)
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

from leuk_ray import console
from leuk_ray.config import Config, from_dict, to_dict
from leuk_ray.data import PreparedData
from leuk_ray.errors import NonFiniteLossError, UserError
from leuk_ray.placement import check_placement, worker_bundle
from leuk_ray.staging import new_staging_dir, sweep_stale_staging

SCORE = "mean_val_f1"  # mean over folds of each fold's best validation weighted F1 so far
# Ray Train's controller checks on its workers every 2 s by default, which is also how long it
# takes to notice that they finished; 0.5 s trims ~2 s off every trial (the check is one small RPC
# per worker). Set in the process that calls fit(); Ray Train passes it on to its controller.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_S = "0.5"
# how long Ray Train waits for a worker group's placement group (Ray's default, 60 s, is shorter
# than a GPU node takes to boot on an autoscaling cluster): ray.worker_start_timeout_s
WORKER_START_TIMEOUT_ENV = WORKER_GROUP_START_TIMEOUT_S_ENV_VAR


def fold_file(fold: int) -> str:
    return f"fold_{fold}.pt"


VAL_ROWS = "val_rows"  # the checkpoint key under which a fold keeps the rows it validated on


@dataclass(frozen=True)
class ValidationRows:
    """The rows a fold validated on, in the order of its validation probabilities.

    Undecodable images were already left out by the worker (``image_cache``'s bad list), so this,
    not the fold's rows of the index, is what its out-of-fold probabilities belong to. Stored in
    the fold checkpoint as plain lists (``torch.load(weights_only=True)``-safe).
    """
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    subjects: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.paths) == len(self.labels) == len(self.subjects):
            raise ValueError("ValidationRows: paths, labels and subjects differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def of(cls, ds: Any) -> ValidationRows:
        """From a ``CellDataset`` (paths, labels, subjects)."""
        return cls(tuple(ds.paths), tuple(int(y) for y in ds.labels), tuple(ds.subjects))

    def to_state(self) -> dict[str, list]:
        return {"path": list(self.paths), "label": list(self.labels),
                "subject": list(self.subjects)}

    @classmethod
    def from_state(cls, d: dict) -> ValidationRows:
        return cls(tuple(str(p) for p in d["path"]), tuple(int(y) for y in d["label"]),
                   tuple(str(s) for s in d["subject"]))


@dataclass
class FoldOutcome:
    """What ``run_folds`` hands back: the last metrics, the final checkpoint directory and the
    weights each fold's backbone started from (``WeightsInfo.to_dict()``, in fold order)."""
    metrics: dict[str, Any]
    checkpoint_dir: Path | None
    fold_weights: list[dict[str, str]] = field(default_factory=list)


def _auc(row: dict[str, Any]) -> float:
    auc = row.get("val_auc")
    return float("nan") if auc is None else float(auc)


def _summarise(rows: list[dict[str, Any]], total_epochs: int) -> dict[str, Any]:
    """Rank 0's report: per-fold values plus the means the search scores on."""
    rows = sorted(rows, key=lambda r: r["fold"])
    k = len(rows)
    out: dict[str, Any] = {
        "epoch": max(r["epoch"] for r in rows),
        "max_epochs": total_epochs,
        "folds": k,
        SCORE: sum(r["best_val_f1"] for r in rows) / k,
        "mean_val_f1_last": sum(r["val_f1"] for r in rows) / k,
        "mean_val_loss": sum(r["val_loss"] for r in rows) / k,
        # this epoch's ROC-AUC, mean over folds (NaN while a fold's validation has one class); a
        # curve to follow, not what ASHA ranks by (bench/RESULTS.md: pruning on it lost more F1)
        "mean_val_auc_last": sum(_auc(r) for r in rows) / k,
        "folds_done": sum(r["done"] for r in rows),
        "trial_finished": all(r["done"] for r in rows)
        and not any(r["failed"] or r.get("user_error") for r in rows),
        "pruned_reason": next((r["failed"] for r in rows if r["failed"]), ""),
        "user_error": next((r["user_error"] for r in rows if r.get("user_error")), ""),
        # wall-clock (time.time()) marks for bench/search_overhead.py: the first fold worker's
        # start, the last fold's first training step, and this report
        "worker_start_ts": min(r.get("started", 0.0) for r in rows),
        "first_step_ts": max(r.get("first_step", 0.0) for r in rows),
        "report_ts": time.time(),
    }
    for r in rows:
        i = r["fold"]
        out[f"fold_{i}_val_f1"] = r["best_val_f1"]
        out[f"fold_{i}_val_f1_last"] = r["val_f1"]
        out[f"fold_{i}_val_loss"] = r["val_loss"]
        out[f"fold_{i}_val_auc_last"] = _auc(r)
        out[f"fold_{i}_train_loss"] = r.get("train_loss", float("nan"))
        out[f"fold_{i}_lr"] = r.get("lr", float("nan"))
        out[f"fold_{i}_epoch"] = r["epoch"]
        out[f"fold_{i}_best_epoch"] = r["best_epoch"]
        out[f"fold_{i}_node"] = r["node"]
        out[f"fold_{i}_gpus"] = r.get("gpus", "")
        if r.get("weights"):
            out[f"fold_{i}_weights"] = r["weights"]
        for key, value in (r.get("cost") or {}).items():
            out[f"fold_{i}_{key}"] = value
    return out


@dataclass
class RoundCost:
    """What one fold worker spent outside training and validation, summed over the rounds before
    the one being reported (bench/search_overhead.py reads it from the trial's results): waiting
    for and exchanging the folds' metrics, writing its checkpoint file, and ``ray.train.report``
    (a barrier across folds; with ``ray.checkpoint_upload=sync`` also the copy to storage)."""
    rounds: int = 0
    gather_s: float = 0.0
    save_s: float = 0.0
    saved_mb: float = 0.0
    report_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"cost_rounds": self.rounds, "cost_gather_s": round(self.gather_s, 4),
                "cost_save_s": round(self.save_s, 4), "cost_saved_mb": round(self.saved_mb, 3),
                "cost_report_s": round(self.report_s, 4)}


def _quiet_report_log() -> None:
    """Drop Ray Train's INFO line per report (the whole metrics dict, every epoch, every worker).

    ``LoggingConfig(log_level="WARNING")`` (see ``make_trainer``) filters Ray Train's loggers by
    name, but Ray 2.60 creates the one that logs "Reporting training result ..." with
    ``logging.getLogger(__file__)``, so its records are named by a file path, pass the filter and
    reach the console through the root logger. Raise that logger's level in this worker.
    """
    suffix = os.path.join("ray", "train", "v2", "_internal", "execution", "context.py")
    for name in list(logging.Logger.manager.loggerDict):
        if name.endswith(suffix):
            logging.getLogger(name).setLevel(logging.WARNING)


def fold_worker(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs: train fold ``world_rank`` to the end.

    A ``UserError`` (bad weights, data, checkpoint...) is not raised to Ray Train, which would
    retry the worker group as if a node had been lost: the worker reports it (``user_error``) in
    the same gather/report round as the other folds, every fold stops, and the driver raises it.
    """
    try:
        _train_fold(loop_config)
    except UserError as e:
        _report_user_error(f"fold {ray.train.get_context().get_world_rank()}: {e}",
                           float(loop_config["cfg"]["ray"]["collective_timeout_s"]))


def _gather(mine: dict[str, Any], k: int, timeout_s: float) -> list[dict[str, Any]]:
    """Every fold's row, in rank order, over the default (gloo) process group.

    A fold that stopped early waits here for the others' epoch; the wait is bounded by the group's
    timeout (``TorchConfig(timeout_s=ray.collective_timeout_s)``). Hitting it is said plainly.
    """
    rows: list[dict[str, Any]] = [None] * k  # type: ignore[list-item]
    try:
        dist.all_gather_object(rows, mine)
    except RuntimeError as e:
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        raise RuntimeError(f"fold {mine['fold']} waited longer than ray.collective_timeout_s="
                           f"{timeout_s:g}s for the other folds' epoch: raise "
                           f"ray.collective_timeout_s above the slowest fold's epoch ({e})") from e
    return rows


def _check_gpu(cfg: Config, fold: int) -> None:
    """A fold worker that Ray gave a GPU must be able to use it.

    Without this, ``train.device=auto`` falls back to the CPU when CUDA is unusable in the worker
    (a CPU-only torch wheel, a driver older than the wheel's CUDA): the fold trains, slowly, on
    the CPU while holding the GPU. Applies to ``train.device`` auto and cuda; ``train.device=cpu``
    is an explicit choice to train on the CPU.
    """
    if cfg.train.device == "cpu":
        return
    gpus = ray.get_gpu_ids()
    if not gpus and cfg.ray.gpus_per_worker <= 0:
        return
    import torch

    where = (f"ray.gpus_per_worker={cfg.ray.gpus_per_worker:g} gave fold {fold} GPU "
             f"{','.join(map(str, gpus)) or '?'} on {ray.util.get_node_ip_address()}")
    fix = ("install a torch build for that node's NVIDIA driver (see `nvidia-smi` and "
           "torch.version.cuda), or set train.device=cpu or ray.gpus_per_worker=0")
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None else
               f"torch (CUDA {torch.version.cuda}) sees no usable GPU there: "
               f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}")
        raise UserError(f"{where}, but CUDA is unusable: {why}; {fix}")
    try:  # a tiny op: a driver/wheel mismatch can pass is_available() and fail here
        torch.ones(1, device="cuda").add_(1).item()
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or ["error"])[0]
        raise UserError(f"{where}, but a CUDA operation failed there ({first}); {fix}") from None


def _report_user_error(message: str, timeout_s: float) -> None:
    """Take part in the round the other folds are in (gather, report), so that every fold ends on
    ``user_error`` instead of waiting for this one.

    The report carries a checkpoint holding only ``user_error_fold_<i>.txt``: Ray Train v2 hands
    the driver the metrics of the latest checkpoint only. The other folds' files (if they trained
    this round) are in the same checkpoint, so a rerun resumes them; this fold starts afresh.
    """
    print(f"error: {message}", file=sys.__stderr__, flush=True)
    ctx = ray.train.get_context()
    fold, k = ctx.get_world_rank(), ctx.get_world_size()
    now = time.time()
    mine = {"fold": fold, "epoch": 0, "val_f1": 0.0, "val_loss": float("nan"), "best_val_f1": 0.0,
            "best_epoch": 0, "done": True, "failed": "", "user_error": message, "started": now,
            "first_step": 0.0, "node": ray.get_runtime_context().get_node_id(), "stepped": False}
    rows = _gather(mine, k, timeout_s) if k > 1 else [mine]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"user_error_fold_{fold}.txt").write_text(message + "\n")
        ray.train.report(_summarise(rows, 0), checkpoint=Checkpoint.from_directory(tmp))


def _train_fold(loop_config: dict[str, Any]) -> None:
    started = time.time()
    # The training engine (timm, albumentations) is imported here, in the fold workers only: the
    # processes that just build trainers (trial drivers, the final job's driver) stay light.
    from leuk_ray.data import fold_datasets
    from leuk_ray.data.cache import image_cache
    from leuk_ray.data.transforms import preprocessing_for
    from leuk_ray.engine import FoldRun, load_checkpoint, save_checkpoint

    cfg: Config = from_dict(loop_config["cfg"], where="fold worker")
    prepared: PreparedData = loop_config["prepared"]
    best_weights: bool = loop_config.get("best_weights", True)  # see make_trainer
    ctx = ray.train.get_context()
    fold, k = ctx.get_world_rank(), ctx.get_world_size()
    node = ray.get_runtime_context().get_node_id()
    gpus = ",".join(map(str, ray.get_gpu_ids()))  # Ray's ids on this node ('' without a GPU)
    _quiet_report_log()
    _check_gpu(cfg, fold)
    sweep_stale_staging()  # local copies that stopped or lost fold workers left on this node

    # What reaches the driver's console (console.story): that a fold resumed or stopped, and in
    # the final job every epoch; a search prints its own line per trial epoch (SearchProgress),
    # so its folds' epoch lines stay in Ray's log files. Ray Train tees print() through its
    # logger (each line twice): write to the real stdout.
    label = loop_config.get("label", "")

    def log(msg: str) -> None:
        print(label + msg, file=sys.__stdout__, flush=True)

    def tell(msg: str) -> None:
        console.story(label + msg)

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            path = Path(d) / fold_file(fold)
            if path.exists():
                state = load_checkpoint(path)
                tell(f"fold {fold}: resuming after epoch {state['epoch']} from {checkpoint.path}")

    interpolation = preprocessing_for(cfg).interpolation  # the backbone's (timm's data config)
    images, bad = image_cache(cfg.data, prepared, interpolation)
    train_ds, val_ds = fold_datasets(prepared, fold, cfg.data, images=images, bad=bad,
                                     interpolation=interpolation)
    val_rows = ValidationRows.of(val_ds).to_state()  # what best_probs belong to
    run = FoldRun(cfg, train_ds, val_ds, fold=fold, state=state,
                  log=tell if loop_config.get("epoch_lines", True) else log)
    last: dict[str, Any] = {"val_f1": 0.0, "val_loss": float("nan")}
    if run.history:
        last = run.history[-1]
    failed = ""
    first_step = 0.0
    cost = RoundCost()
    upload = (CheckpointUploadMode.ASYNC if cfg.ray.checkpoint_upload == "async"
              else CheckpointUploadMode.SYNC)
    while True:
        stepped = not run.done and not failed
        if stepped:
            first_step = first_step or time.time()
            try:
                last = run.step()
            except NonFiniteLossError as e:
                failed = str(e)
                tell(f"fold {fold}: stopping: {failed}")
        mine = {
            "fold": fold,
            "epoch": run.epoch,
            "val_f1": float(last.get("val_f1", 0.0)),
            "val_loss": float(last.get("val_loss", float("nan"))),
            "val_auc": last.get("val_auc"),
            "train_loss": float(last.get("train_loss", float("nan"))),
            "lr": float(last.get("lr", float("nan"))),
            "best_val_f1": float(run.best_val_f1 or 0.0),
            "best_epoch": int(run.best_epoch),
            "done": bool(run.done),
            "failed": failed,
            "started": started,
            "first_step": first_step,
            "node": node,
            "gpus": gpus,
            "stepped": stepped,
            "weights": _weights_of(run.model),
            "cost": cost.to_dict(),
        }
        t0 = time.perf_counter()
        rows = _gather(mine, k, cfg.ray.collective_timeout_s) if k > 1 else [mine]
        cost.gather_s += time.perf_counter() - t0
        summary = _summarise(rows, cfg.train.epochs)
        if any(r["stepped"] for r in rows):
            cost.rounds += 1
            t0 = time.perf_counter()
            tmp = new_staging_dir(fold)  # swept if this process dies before it is stored
            path = tmp / fold_file(fold)
            save_checkpoint({**run.state_dict(best_weights=best_weights), VAL_ROWS: val_rows},
                            path)
            cost.save_s += time.perf_counter() - t0
            cost.saved_mb += path.stat().st_size / 2**20
            t0 = time.perf_counter()
            # async: Ray copies the directory to storage in a background thread (one at a time,
            # in order) and deletes it once stored; sync: the copy is made here, then deleted.
            ray.train.report(summary, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_upload_mode=upload,
                             delete_local_checkpoint_after_upload=True)
            cost.report_s += time.perf_counter() - t0
        else:
            # Nothing trained this round: a run restored after it had already finished (the search
            # driver died after the trial ended but before Tune recorded it). Report the same
            # metrics again, but no new checkpoint: the restored one stays the latest, nothing is
            # retrained and nothing the finished trial left is rotated away. Every rank takes the
            # same branch (decided on the gathered rows), so Ray never merges a partial checkpoint.
            ray.train.report(summary)
        if summary["pruned_reason"] or summary["user_error"] or summary["folds_done"] == k:
            break


def make_trainer(cfg: Config, prepared: PreparedData, *, storage_path: str, name: str,
                 callbacks: list | None = None, best_weights: bool = True,
                 epoch_lines: bool = True, label: str = "") -> TorchTrainer:
    """A TorchTrainer with one worker per fold; checkpoints under ``storage_path/name``.

    ``epoch_lines``: each fold's epoch line reaches the driver's console (``console.story``; the
    final job's progress), else only Ray's log files (a search prints its own per trial).
    ``label`` starts every line the folds print (a search's ``[trial ID] ``).

    Reusing the same ``storage_path`` and ``name`` resumes from the latest checkpoint there
    (Ray Train restores its run state from storage).

    Checkpoint volume: each round's checkpoint holds, per fold, what resuming needs
    (``FoldRun.state_dict``): a training fold's model, optimiser and schedule; a finished fold's
    metrics and, with ``best_weights``, its best weights and validation probabilities (the final
    job's ensemble and calibration; a search passes False: its trials are scored on metrics and
    final retrains). Only the latest checkpoint is kept: resume reads no other, and Ray Train
    deletes the previous one only after the new one is complete. With
    ``ray.checkpoint_upload=async`` that copy runs beside the next epoch, one at a time and in
    order; a worker whose training function returns waits for its copies to finish.
    """
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_S)
    r = cfg.ray
    # read by Ray Train's controller, which this process starts with fit() (Ray Train passes the
    # variable on): how long the worker group's placement group may wait for its resources
    os.environ[WORKER_START_TIMEOUT_ENV] = f"{r.worker_start_timeout_s:g}"
    return TorchTrainer(
        fold_worker,
        train_loop_config={"cfg": to_dict(cfg), "prepared": prepared,
                           "best_weights": best_weights, "epoch_lines": epoch_lines,
                           "label": label},
        # gloo: the folds never all-reduce gradients, only exchange small metric dicts; its
        # timeout bounds how long a fold that stopped early waits for the others' epoch
        torch_config=TorchConfig(backend="gloo", timeout_s=math.ceil(r.collective_timeout_s)),
        scaling_config=ScalingConfig(num_workers=prepared.n_folds, use_gpu=r.gpus_per_worker > 0,
                                     resources_per_worker=worker_bundle(cfg),
                                     placement_strategy=r.placement_strategy),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks or [],
            # max_failures: restarts after a lost or failed fold worker. A worker group that
            # cannot be placed within ray.worker_start_timeout_s is a controller failure, which
            # Ray Train retries forever by default: ray.start_retries bounds it.
            failure_config=FailureConfig(max_failures=r.max_failures,
                                         controller_failure_limit=r.start_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            # Ray Train logs every report (with all its metrics) and its worker-group start-up at
            # INFO, several lines per epoch; the folds print their own progress. Warnings and
            # errors still reach the console; every level stays in Ray's train log files.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def run_folds(cfg: Config, prepared: PreparedData, *, storage_path: str, name: str,
              callbacks: list | None = None) -> FoldOutcome:
    """Train all folds to the end (used by the final job); returns the last metrics.

    A user error a fold worker reported is raised here, as a ``UserError``; folds that cannot be
    placed on the cluster are refused before Ray Train starts (``check_placement``); a
    run that failed for good (restarts exhausted) raises ``FoldsFailedError`` saying why.
    """
    check_placement(cfg, prepared.n_folds, driver=False)  # this process is the driver
    trainer = make_trainer(cfg, prepared, storage_path=storage_path, name=name, callbacks=callbacks)
    result = fit_or_explain(trainer, cfg)
    raise_user_error(result.metrics)
    ckpt = result.checkpoint
    local = None
    if ckpt is not None:  # on s3:// and the like, download the merged fold checkpoints
        local = Path(ckpt.to_directory()) if "://" in str(ckpt.path) or \
            ckpt.filesystem.type_name != "local" else Path(ckpt.path)
    metrics = dict(result.metrics or {})
    weights = [metrics.get(f"fold_{i}_weights") or {} for i in range(prepared.n_folds)]
    return FoldOutcome(metrics=metrics, checkpoint_dir=local, fold_weights=weights)


class FoldsFailedError(RuntimeError):
    """A fold run that Ray Train gave up on, with what gave out and which setting bounds it."""


def fit_or_explain(trainer: TorchTrainer, cfg: Config) -> Any:
    """``trainer.fit()``; Ray Train's final failure becomes a ``FoldsFailedError`` that names
    what ran out (``ray.max_failures``, or placement within ``ray.worker_start_timeout_s`` x
    ``ray.start_retries``) and the cause."""
    try:
        return trainer.fit()
    except TrainingFailedError as e:
        raise FoldsFailedError(describe_failure(e, cfg)) from e


def describe_failure(error: TrainingFailedError, cfg: Config) -> str:
    r = cfg.ray
    if isinstance(error, ControllerError) and isinstance(error.controller_failure,
                                                         WorkerGroupStartupTimeoutError):
        return (f"the fold workers {worker_bundle(cfg)} could not be placed within "
                f"ray.worker_start_timeout_s={r.worker_start_timeout_s:g}s in "
                f"{r.start_retries + 1} tries (ray.start_retries={r.start_retries}): the cluster "
                "lacks free resources for them (see `ray status`); add nodes, lower "
                "ray.cpus_per_worker/ray.gpus_per_worker or search.max_concurrent, or raise "
                "ray.worker_start_timeout_s while an autoscaler boots nodes")
    if isinstance(error, WorkerGroupError):
        # the causes this code explains (they name a ray.* setting) first: trials.csv keeps the
        # first 300 characters of a reason
        causes = sorted({(str(x).strip().splitlines() or [type(x).__name__])[-1][:300]
                         for x in error.worker_failures.values()},
                        key=lambda c: ("ray." not in c, c))
        return (f"the fold workers failed {r.max_failures + 1} time(s), more than "
                f"ray.max_failures={r.max_failures} restarts allow: {'; '.join(causes)}")
    cause = getattr(error, "controller_failure", error)
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
    return f"Ray Train's controller failed: {first}"


def raise_user_error(metrics: dict[str, Any] | None) -> None:
    """The driver's side of a fold's user error: a ``UserError`` with its message, not a retry."""
    if metrics and metrics.get("user_error"):
        raise UserError(str(metrics["user_error"]))


def _weights_of(model: Any) -> dict[str, str]:
    info = getattr(getattr(model, "backbone", None), "weights_info", None)
    return info.to_dict() if info is not None else {}

