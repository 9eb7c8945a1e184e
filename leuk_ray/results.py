"""A search's results as its trials end: one typed row per trial (``trials.csv``), the best
row, the console's story (one line per trial epoch, per ended trial, a status line), and the
deletion of the fold checkpoints that ended trials no longer need.

Rows are built from Tune's objects (a ``Trial`` while the search runs, a ``Result`` of the
``ResultGrid`` at the end), never read back from ``trials.csv``'s text: a searched boolean stays
a bool. ``SearchProgress`` is pickled into the experiment by Tune, so, like the schedulers in
``leuk_ray.tune_ext``, it lives outside the ``python -m`` module.
"""
from __future__ import annotations

import csv
import math
import shutil
import time
from pathlib import Path
from typing import Any

from ray import tune

from leuk_ray.atomic import replacing
from leuk_ray.fold_trainer import SCORE
from leuk_ray.storage import RunFiles, is_uri
from leuk_ray.study import STUDY_FILE, asha_reason
from leuk_ray.tune_ext import experiment_files, read_pruned


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
    with replacing(path) as tmp, tmp.open("w", newline="") as f:  # (creates an s3:// mirror)
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
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
    if not is_uri(target):
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
        self.files: RunFiles | None = None
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
        best = best_row(rows)
        text = ", ".join(f"{v} {k}" for k, v in counts.items()) + f", {waiting} to come"
        if best:
            text += f"; best {best['mean_val_f1']:.4f} (trial {best['trial_id']})"
        print(f"status: {text}", flush=True)

    def _bind(self, trial: Any) -> RunFiles:
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


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed row with the highest finite mean_val_f1, or None."""
    done = [r for r in rows if r["status"] == "completed"
            and isinstance(r["mean_val_f1"], (int, float)) and math.isfinite(r["mean_val_f1"])]
    return max(done, key=lambda r: r["mean_val_f1"]) if done else None
