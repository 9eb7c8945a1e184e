"""``python -m leuk_ray.final``: the best config -> a k-fold ensemble, evaluated, in one artifact.

1. Reads the best config of a search (``--from DIR`` or ``--config``), or a preset.
2. Retrains the k fold models in parallel with the same fold trainer as the search (one fold per
   Ray Train worker; full epoch budget, early stopping on each fold's validation subjects, no
   pruning). The run is named after its config and folds, so rerunning after a crash resumes the
   folds from their last checkpoints.
3. Fits a temperature per fold on that fold's out-of-fold predictions and picks the decision
   threshold on the calibrated out-of-fold predictions (never on the test set); with TTA, the
   same again on TTA outputs (``leuk_ray.calibration``: what predict applies).
4. Evaluates every fold model and the ensemble (mean of the calibrated fold probabilities) on the
   labelled test set, with and without test-time augmentation, with bootstrap confidence
   intervals over test subjects. The models run where the folds trained: one Ray task per fold
   with a fold worker's resources (its GPU share) scores the fold's out-of-fold rows with TTA and
   the test set (``score_folds``); this driver only combines the returned probabilities.
5. Writes the artifact atomically: manifest.json, fold_<i>.pt, metrics.json, oof.csv, report/.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from leuk_ray import cluster, console
from leuk_ray.artifact import build_ensemble, leuk_ray_version, save_artifact
from leuk_ray.calibration import Calibration, fit_calibration
from leuk_ray.cli import common_parser, run_main
from leuk_ray.config import (SMOKE_CAPS, SMOKE_MODEL, Config, config_from_yaml_with_extras,
                             from_dict, load_config, set_value, to_dict)
from leuk_ray.data import PreparedData, prepare_data
from leuk_ray.data.dataset import frame_dataset
from leuk_ray.data.transforms import Preprocessing, eval_transform
from leuk_ray.engine import load_checkpoint
from leuk_ray.errors import UserError
from leuk_ray.fold_trainer import VAL_ROWS, ValidationRows, fold_file, run_folds
from leuk_ray.metrics import bootstrap_ci, classification_metrics
from leuk_ray.placement import worker_bundle
from leuk_ray.report import write_report
from leuk_ray.storage import RunFiles, check_shared_storage, check_storage
from leuk_ray.weights import WeightsInfo, check_weights


def build_parser() -> argparse.ArgumentParser:
    p = common_parser("python -m leuk_ray.final",
                      "Retrain the best config of a search as a k-fold ensemble (one fold per Ray "
                      "Train worker), calibrate it on out-of-fold predictions, evaluate it on the "
                      "held-out test set and write the artifact that `python -m leuk_ray.predict` "
                      "uses.")
    p.add_argument("--from", dest="from_dir", metavar="SEARCH_DIR", default=None,
                   help="a search's directory (<storage>/<name>): uses its best_config.yaml")
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", default=None,
                     help="also evaluate with test-time augmentation (default: final.tta)")
    tta.add_argument("--no-tta", dest="tta", action="store_false", help="skip the TTA evaluation")
    p.add_argument("--compare", metavar="SEARCH_DIR", default=None,
                   help="also build the ensemble of this search's best config on the same folds "
                        "and write comparison.md (did the search beat this config/preset?)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the ensemble artifact already in the output directory")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=float, default=None, help=argparse.SUPPRESS)
    return p


def check_target(files: RunFiles, overwrite: bool) -> None:
    """Before any work: refuse an output that holds an artifact (without --overwrite) or other
    files (always), so nothing there is lost and no training is wasted."""
    built = [f for f in ("manifest.json", "comparison.json") if files.exists(f)]
    if not files.remote and files.local.is_dir():  # also a --compare run stopped half-way
        built += [str(m.relative_to(files.local)) for m in files.local.glob("*/manifest.json")]
    if built:
        if not overwrite:
            raise UserError(f"{files.uri}: already holds an ensemble artifact ({built[0]}); pass "
                            "--overwrite to replace it, or choose another --out")
        return
    if not files.remote and files.local.exists() and \
            (not files.local.is_dir() or any(files.local.iterdir())):
        raise UserError(f"{files.uri}: exists and is not an ensemble artifact; refusing to write "
                        "into it: choose another --out")


def resolve_config(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """Base = the search's best config (or --config, which may be a best_config.yaml), then the
    usual --preset/--smoke-test/--set layers; ``--data`` overrides data.root."""
    source = None
    base: dict | None = None
    if args.from_dir:
        search = RunFiles.from_path(args.from_dir)
        if not search.pull("best_config.yaml"):
            raise UserError(f"{search.uri}/best_config.yaml: not found; --from takes a finished "
                            "search's directory (the one holding best_config.yaml)")
        source = search.local / "best_config.yaml"
    elif args.config:
        source = Path(args.config).expanduser()
    if source is not None:
        cfg0, _ = config_from_yaml_with_extras(source)
        base = to_dict(cfg0)
    overrides = list(args.overrides)
    if args.data:
        overrides.insert(0, f"data.root={args.data}")
    cfg = load_config(None, overrides, preset=args.preset if base is None else None,
                      smoke=args.smoke_test, base=base)
    if args.preset and base is not None:
        raise UserError("--preset with --from/--config: choose one source of the config")
    if cfg.final.epochs:
        set_value(cfg, "train.epochs", cfg.final.epochs, where="final.epochs")
        if args.smoke_test:  # --smoke-test caps what final.epochs asks for too
            set_value(cfg, "train.epochs", min(cfg.final.epochs, SMOKE_CAPS["train.epochs"]),
                      where="--smoke-test")
    if args.tta is not None:
        set_value(cfg, "final.tta", args.tta, where="--tta")
    if not cfg.data.root and not getattr(args, "compare", None):
        raise UserError("no data: pass --data DIR (or a config whose data.root is set)")
    return cfg, source


# the config sections that determine the trained fold weights; final.* (TTA, calibration, out),
# ray.* (resources) and search.* do not, so changing them keeps the run name and its checkpoints
WEIGHT_SECTIONS = ("data", "model", "train")
# ...and within them, keys that say how the training runs on this machine, not what it trains: a
# rerun after a crash with another cache budget, thread count or device resumes the same folds
RUN_ONLY_KEYS = ("data.cache", "data.cache_mb", "data.num_workers", "data.max_bad_fraction",
                 "train.threads", "train.device")


def _run_name(cfg: Config, prepared: PreparedData, weights: WeightsInfo) -> str:
    """Same weights-determining config, same starting weights (by content: the file's sha256, so
    new weights at the same path train anew) and same folds -> same name -> a rerun resumes the
    folds from their checkpoints instead of starting over."""
    d = to_dict(cfg)
    kept = {k: dict(d[k]) for k in WEIGHT_SECTIONS}
    for key in RUN_ONLY_KEYS:
        section, field = key.split(".")
        kept[section].pop(field)
    w = weights.to_dict()
    if w["source"].startswith("hub:"):  # file and sha256 are known only once it is cached: a
        w["file"] = w["sha256"] = ""    # rerun after the first run downloaded it must resume
    kept["weights"] = w
    h = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode())
    for r in prepared.train.itertuples():
        h.update(f"{r.path}|{r.fold}\n".encode())
    return f"final-{h.hexdigest()[:12]}"


@dataclass
class OutOfFold:
    """Out-of-fold rows in fold order: each validation image scored by the model that never saw
    it, exactly the rows (and order) each fold validated on, as its worker recorded them."""
    path: np.ndarray
    label: np.ndarray
    subject: np.ndarray
    fold: np.ndarray
    prob_all: np.ndarray      # the fold model's P(ALL), uncalibrated

    def __len__(self) -> int:
        return int(self.label.size)


def _oof(prepared: PreparedData, states: Sequence[dict]) -> OutOfFold:
    """The OOF rows from the fold checkpoints: probabilities and the rows they belong to.

    A fold's worker leaves undecodable images out of its validation set; the rows it validated
    on travel with its probabilities (``ValidationRows`` in the checkpoint) instead of being
    rebuilt here from the index.
    """
    parts: list[tuple[ValidationRows, np.ndarray]] = []
    for i, st in enumerate(states):
        if st.get(VAL_ROWS) is None:
            raise UserError(f"fold {i}: its checkpoint does not record the rows it validated on "
                            "(written by an older leuk-ray); rerun with a fresh --out")
        rows = ValidationRows.from_state(st[VAL_ROWS])
        p = st["best_probs"].numpy() if st.get("best_probs") is not None else np.zeros(0)
        if len(p) != len(rows):
            raise UserError(f"fold {i}: its checkpoint holds {len(p)} validation probabilities "
                            f"for {len(rows)} validation rows; rerun with a fresh --out")
        planned = set(prepared.train.loc[prepared.train["fold"] == i, "path"])
        if not set(rows.paths) <= planned:
            raise UserError(f"fold {i}: its checkpoint validated on images that are not in this "
                            "fold of the data any more; the data changed since training: rerun "
                            "with the same data or a fresh --out")
        parts.append((rows, p))
    return OutOfFold(
        path=np.array([q for r, _ in parts for q in r.paths], dtype=object),
        label=np.array([y for r, _ in parts for y in r.labels], dtype=np.int64),
        subject=np.array([s for r, _ in parts for s in r.subjects], dtype=object),
        fold=np.concatenate([np.full(len(r), i, dtype=np.int64) for i, (r, _) in
                             enumerate(parts)]),
        prob_all=np.concatenate([p.astype(np.float64) for _, p in parts]))


def _eval_dataset(df: pd.DataFrame, prep: Preprocessing):
    """Rows of ``df`` decoded and resized as ``prep`` (the backbone's, what training used) says."""
    return frame_dataset(df, prep.image_size, eval_transform(prep.image_size, prep.interpolation),
                         interpolation=prep.interpolation)


def _rows(paths: Sequence[str], labels: Sequence[int], subjects: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({"path": list(paths), "label": list(labels), "subject": list(subjects)})


def _labelled_test(prepared: PreparedData) -> pd.DataFrame | None:
    test = prepared.test
    test = test[test["label"] >= 0] if test is not None else None
    if test is None or len(test) == 0:
        return None
    return _rows(test["path"], test["label"].astype(int), test["subject"])


@dataclass
class FoldScores:
    """What one fold model scored (``score_fold``): P(ALL), uncalibrated, in row order."""
    fold: int
    oof_tta: np.ndarray | None    # the fold's own out-of-fold rows, 8 TTA views (None: no TTA)
    test: np.ndarray | None       # the labelled test rows (None: no labelled test set)
    test_tta: np.ndarray | None   # the same with TTA (None: no TTA or no test set)
    device: str                   # where it ran: cuda or cpu


def score_fold(cfg_dict: dict[str, Any], fold: int, best_state: dict,
               oof_rows: pd.DataFrame | None, test: pd.DataFrame | None,
               tta: bool) -> FoldScores:
    """Fold ``fold``'s best model, built as the artifact builds it, on its out-of-fold rows with
    TTA and on the test rows without and with TTA: ``Ensemble.predict`` (``predict_probs``), the
    inference path of predict. Runs in a Ray task beside the fold workers (``score_folds``)."""
    cfg = from_dict(cfg_dict, where="final scoring task")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    ens = build_ensemble(cfg, [best_state], device=cfg.train.device)

    def probs(rows: pd.DataFrame | None, with_tta: bool) -> np.ndarray | None:
        if rows is None or len(rows) == 0:
            return None
        _, per_fold = ens.predict(_eval_dataset(rows, ens.preprocessing), tta=with_tta,
                                  batch_size=cfg.train.batch_size)
        return per_fold[0]

    return FoldScores(fold=fold, oof_tta=probs(oof_rows, True) if tta else None,
                      test=probs(test, False), test_tta=probs(test, True) if tta else None,
                      device=str(ens.device))


def score_folds(cfg: Config, states: Sequence[dict], oof: OutOfFold,
                test: pd.DataFrame | None) -> list[FoldScores]:
    """``score_fold`` for every fold, as k Ray tasks in parallel, each with a fold worker's
    resources (``ray.cpus_per_worker``, ``ray.gpus_per_worker``): the k models x 8 TTA views run
    on the GPUs the folds trained on, not in this driver (on a cluster, a CPU head node). What
    comes back is typed data; this driver never builds a model."""
    import ray

    bundle = dict(worker_bundle(cfg))  # what Ray Train reserves for a fold worker
    task = ray.remote(score_fold).options(
        num_cpus=bundle.pop("CPU", 0.0), num_gpus=bundle.pop("GPU", 0.0),
        memory=bundle.pop("memory", None), resources=bundle or None,
        name="leuk_ray.final.score_fold")
    refs = []
    for i, st in enumerate(states):
        m = oof.fold == i
        rows = _rows(oof.path[m], oof.label[m], oof.subject[m]) if cfg.final.tta else None
        refs.append(task.remote(to_dict(cfg), i, st["best_state"], rows, test, cfg.final.tta))
    try:
        return list(ray.get(refs))
    except ray.exceptions.RayTaskError as e:  # a user error in a task: its one line, no trace
        if isinstance(e.cause, UserError):
            raise e.cause from None
        raise


def _oof_tta(oof: OutOfFold, scores: Sequence[FoldScores]) -> np.ndarray:
    """Each OOF row's P(ALL) from its own fold model averaged over the 8 TTA views."""
    out = np.empty(len(oof), dtype=np.float64)
    for s in scores:
        out[oof.fold == s.fold] = s.oof_tta
    return out


def _write_oof_csv(oof: OutOfFold, cal: Calibration, path: Path,
                   tta: tuple[np.ndarray, Calibration] | None = None) -> None:
    cols = {"path": oof.path, "subject": oof.subject, "label": oof.label, "fold": oof.fold,
            "prob_all": oof.prob_all,
            "prob_all_calibrated": cal.calibrated_oof(oof.prob_all, oof.fold)}
    if tta is not None:
        cols["prob_all_tta"] = tta[0]
        cols["prob_all_tta_calibrated"] = tta[1].calibrated_oof(tta[0], oof.fold)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(cols))
        for row in zip(*cols.values()):
            w.writerow([row[0], row[1], int(row[2]), int(row[3])]
                       + [f"{v:.6f}" for v in row[4:]])


def evaluate_test(test: pd.DataFrame | None, scores: Sequence[FoldScores], cal: Calibration,
                  tta_cal: Calibration | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every fold model and the ensemble on the labelled test set, without and (with a TTA
    calibration) with TTA, each with the calibration fitted for it (``Calibration.combine``: what
    predict applies); bootstrap confidence intervals over test subjects for the ensembles."""
    if test is None or len(test) == 0:
        return {}, {}
    y = test["label"].to_numpy(dtype=np.int64)
    subj = list(test["subject"])
    out: dict[str, Any] = {"n": int(len(y)), "subjects": sorted(set(subj)), "ci": {}}
    probs: dict[str, np.ndarray] = {}
    for tta, c in ((False, cal), (True, tta_cal)):
        if c is None:
            continue
        key = "ensemble_tta" if tta else "ensemble"
        per_fold = np.stack([s.test_tta if tta else s.test for s in scores])
        p = c.combine(per_fold)
        out[key] = classification_metrics(y, p, c.threshold, subjects=subj)
        out["ci"][key] = bootstrap_ci(y, p, c.threshold, subj)
        out["folds_tta" if tta else "folds"] = [
            classification_metrics(y, pf, c.threshold, subjects=subj)
            for pf in c.calibrated_folds(per_fold)]
        probs[key] = p
    probs["label"], probs["subject"] = y, np.array(subj)
    probs["path"] = np.array(list(test["path"]))
    return out, probs


def describe_model(cfg: Config, prepared: PreparedData, oof: OutOfFold, *, smoke: bool,
                   weights: dict[str, Any]) -> dict[str, Any]:
    """What the artifact's model is (the manifest's "model" entry and the report's Model
    section): backbone, its starting weights (``check_weights(...).to_dict()``), input size, the
    data it was trained on, smoke test or not, leuk-ray version."""
    m = cfg.model
    val = prepared.train[prepared.train["fold"] >= 0]
    return {
        "backbone": m.backbone, "head": m.head, "weights": weights,
        "image_size": cfg.data.image_size, "folds": prepared.n_folds,
        "train_images": int(len(prepared.train)),
        "train_subjects": int(prepared.train["subject"].nunique()),
        "left_out_undecodable": int(len(val) - len(oof)),   # by the fold workers
        "unusable_files": len(prepared.bad_files),          # set aside by the index
        # a --smoke-test run, or a config that came from one (its tiny test backbone)
        "smoke_test": bool(smoke) or m.backbone == SMOKE_MODEL.get("model.backbone"),
        "leuk_ray_version": leuk_ray_version(),
        "data": str(prepared.root or cfg.data.root), "split": cfg.data.split,
    }


def _fmt(m: dict | None) -> str:
    if not m:
        return "-"
    auc = f"{m['auc']:.4f}" if m.get("auc") is not None else "n/a"
    return (f"F1 {m['f1']:.4f}  acc {m['accuracy']:.4f}  AUC {auc}  sens {m['sensitivity']:.4f}  "
            f"spec {m['specificity']:.4f}  ECE {m['ece']:.4f}")


@dataclass
class FinalResult:
    """What ``run_final`` hands back for one config: where its artifact is and what it measured."""

    uri: str                              # the artifact directory (local path or URI)
    metrics: dict[str, Any]               # as in the manifest: oof, test, folds, threshold, model
    calibration: Calibration              # what predict applies without TTA
    tta_calibration: Calibration | None   # ... and with --tta (None when final.tta is off)

    @property
    def threshold(self) -> float:
        return self.calibration.threshold


def build_final(cfg: Config, prepared: PreparedData, files: RunFiles,
                *, label: str = "", smoke: bool = False) -> FinalResult:
    """Train the folds, calibrate on OOF, evaluate, write the artifact."""
    runs = f"{files.storage}/.{files.name}.runs"  # fold checkpoints: a rerun resumes from them
    weights = check_weights(cfg.model)  # what the backbones start from (and the run name's part)
    name = _run_name(cfg, prepared, weights)
    print(f"{label}training {prepared.n_folds} fold models in parallel (run {runs}/{name})",
          flush=True)
    outcome = run_folds(cfg, prepared, storage_path=runs, name=name)
    if outcome.metrics.get("pruned_reason"):
        raise UserError(f"final training failed: {outcome.metrics['pruned_reason']}")
    if outcome.checkpoint_dir is None:
        raise UserError(f"final training left no checkpoint under {runs}/{name}")
    states = [load_checkpoint(outcome.checkpoint_dir / fold_file(i))
              for i in range(prepared.n_folds)]

    oof = _oof(prepared, states)
    k = prepared.n_folds
    cal = fit_calibration(oof.label, oof.prob_all, oof.fold, k, fit=cfg.final.calibrate)
    oof_cal = cal.calibrated_oof(oof.prob_all, oof.fold)
    oof_metrics = classification_metrics(oof.label, oof_cal, cal.threshold,
                                         subjects=list(oof.subject))
    test = _labelled_test(prepared)
    what = f"{len(oof)} out-of-fold images with TTA, " if cfg.final.tta else ""
    print(f"{label}scoring {what}{0 if test is None else len(test)} test images"
          f"{' with and without TTA' if cfg.final.tta else ''}: {k} tasks beside the fold workers",
          flush=True)
    scores = score_folds(cfg, states, oof, test)
    print(f"{label}scored on {', '.join(sorted({s.device for s in scores}))}", flush=True)
    oof_tta, tta_cal = None, None
    if cfg.final.tta:  # what predict --tta thresholds: calibrate on TTA outputs as well
        p_tta = _oof_tta(oof, scores)
        tta_cal = fit_calibration(oof.label, p_tta, oof.fold, k, fit=cfg.final.calibrate)
        oof_tta = (p_tta, tta_cal)
    test_metrics, test_probs = evaluate_test(test, scores, cal, tta_cal)
    fold_scores = []
    for i, st in enumerate(states):
        row = {"fold": i, "val_f1": float(st["best_metrics"].get("f1", float("nan"))),
               "best_epoch": int(st["best_epoch"]), "epochs": int(st["epoch"]),
               "temperature": cal.temperatures[i]}
        if test_metrics:
            row["test_f1"] = test_metrics["folds"][i]["f1"]
        fold_scores.append(row)
    model = describe_model(cfg, prepared, oof, smoke=smoke, weights=weights.to_dict())
    calibration = {"plain": cal.to_dict(),
                   "tta": None if tta_cal is None else tta_cal.to_dict()}
    metrics = {"threshold": cal.threshold, "calibration": calibration, "oof": oof_metrics,
               "test": test_metrics, "folds": fold_scores, "model": model}

    def report(report_dir: Path) -> None:
        _write_oof_csv(oof, cal, report_dir.parent / "oof.csv", oof_tta)
        comparison, ci, columns = None, None, {}
        if test_probs:
            y, p, subj = test_probs["label"], test_probs["ensemble"], test_probs["subject"]
            m, what = test_metrics["ensemble"], "held-out test set"
            ci = test_metrics["ci"]["ensemble"]
            comparison = {f"fold {i}": fm for i, fm in enumerate(test_metrics["folds"])}
            comparison["ensemble"] = m
            if "ensemble_tta" in test_metrics:
                comparison.update({f"fold {i} + TTA": fm
                                   for i, fm in enumerate(test_metrics["folds_tta"])})
                comparison["ensemble + TTA"] = test_metrics["ensemble_tta"]
                columns["test, ensemble + TTA"] = test_metrics["ensemble_tta"]
            columns["out-of-fold (one model per image)"] = oof_metrics
        else:
            y, p, subj = oof.label, oof_cal, oof.subject
            m, what = oof_metrics, "out-of-fold predictions (no labelled test set)"
        write_report(report_dir, title=f"leuk-ray ensemble of {len(states)} folds: {what}",
                     metrics=m, y_true=y, prob_all=p, threshold=cal.threshold,
                     fold_scores=fold_scores, subjects=list(subj), calibration=calibration,
                     comparison=comparison, model=model, ci=ci, columns=columns,
                     main_column="test, ensemble" if test_probs else "out-of-fold")

    save_artifact(files.local, cfg=cfg, fold_states=[s["best_state"] for s in states],
                  fold_scores=fold_scores, calibration=cal, tta_calibration=tta_cal,
                  model_info=model, metrics=metrics, write_report=report,
                  weights=weights.to_dict(), fold_weights=outcome.fold_weights)
    files.push("")  # to s3:// etc.: every file, manifest.json last

    print(f"\n{label}out-of-fold ({len(oof)} images): {_fmt(oof_metrics)}")
    print(f"temperatures {', '.join(f'{T:.3f}' for T in cal.temperatures)} (one per fold), "
          f"threshold {cal.threshold:.3f} (chosen on out-of-fold data)")
    if tta_cal is not None:
        print(f"with TTA: temperatures "
              f"{', '.join(f'{T:.3f}' for T in tta_cal.temperatures)}, threshold "
              f"{tta_cal.threshold:.3f}")
    for i, s in enumerate(fold_scores):
        print(f"fold {i}: val F1 {s['val_f1']:.4f} (best epoch {s['best_epoch']})"
              + (f", test F1 {s['test_f1']:.4f}" if "test_f1" in s else ""))
    if test_metrics:
        print(f"test ensemble     ({test_metrics['n']} images): {_fmt(test_metrics['ensemble'])}")
        if "ensemble_tta" in test_metrics:
            print(f"test ensemble+TTA ({test_metrics['n']} images): "
                  f"{_fmt(test_metrics['ensemble_tta'])}")
    else:
        print("no labelled test set: evaluated on out-of-fold predictions only")
    print(f"artifact: {files.uri}")
    return FinalResult(files.uri, metrics, cal, tta_cal)


# the data keys that define the folds: a comparison trains both configs on the same folds
FOLD_KEYS = ("root", "folds", "split", "holdout", "seed", "max_images", "max_bad_fraction")


def write_comparison(out: Path, named: dict[str, dict[str, Any]]) -> Path:
    """comparison.md / comparison.json: per-fold and ensemble scores of each config side by side."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(named, indent=2, default=str))
    names = list(named)
    md = ["# Did the search help?", "",
          "Both configs trained on the same subject-grouped folds and evaluated on the same "
          "held-out test set.", "",
          "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label: str, get) -> None:
        vals = []
        for n in names:
            try:
                v = get(named[n])
                vals.append(f"{v:.4f}" if isinstance(v, float) else str(v))
            except (KeyError, IndexError, TypeError):
                vals.append("-")
        md.append(f"| {label} | " + " | ".join(vals) + " |")

    k = max(len(m["folds"]) for m in named.values())
    for i in range(k):
        row(f"fold {i} validation F1", lambda m, i=i: m["folds"][i]["val_f1"])
    row("mean validation F1 (CV)", lambda m: float(np.mean([f["val_f1"] for f in m["folds"]])))
    row("out-of-fold F1 (calibrated)", lambda m: m["oof"]["f1"])
    for i in range(k):
        row(f"fold {i} test F1", lambda m, i=i: m["test"]["folds"][i]["f1"])
    for key, label in (("ensemble", "ensemble"), ("ensemble_tta", "ensemble + TTA")):
        for metric in ("f1", "accuracy", "auc", "sensitivity", "specificity", "ece"):
            row(f"test {label} {metric}", lambda m, key=key, metric=metric: m["test"][key][metric])
    md += ["", "Artifacts: " + ", ".join(f"`{n}/`" for n in names) + "."]
    p = out / "comparison.md"
    p.write_text("\n".join(md) + "\n")
    return p


def run_final(configs: Config | Mapping[str, Config], out: str, *, overwrite: bool = False,
              address: str | None = None, num_cpus: float | None = None, smoke: bool = False,
              source: str = "") -> FinalResult | dict[str, FinalResult]:
    """Train, calibrate, evaluate and ship the k-fold ensemble of ``configs`` to ``out`` (a path
    or URI); what ``python -m leuk_ray.final`` does.

    One ``Config`` gives one artifact at ``out`` and its ``FinalResult``. A mapping ``{name:
    Config}`` trains each on the same folds (their fold-defining ``data`` keys must agree) into
    ``out/<name>`` and writes ``comparison.md`` beside them; it returns ``{name: FinalResult}``.
    Fold checkpoints are kept beside ``out``, so a rerun after a crash resumes them. Raises
    ``UserError`` for a mistake (an existing artifact without ``overwrite``, unusable weights,
    bad data), before Ray starts where it can.
    """
    named = dict(configs) if isinstance(configs, Mapping) else None
    cfgs = list(named.values()) if named else [configs]
    for c in cfgs:
        check_weights(c.model)  # backbone name and weights: fail before the data and Ray
    first = cfgs[0]
    for c in cfgs[1:]:
        for key in FOLD_KEYS:
            if getattr(c.data, key) != getattr(first.data, key):
                raise UserError(f"configs to compare differ in data.{key}; they must be trained "
                                "on the same folds")
    files = RunFiles.from_path(out)  # s3:// artifacts are built locally, then uploaded
    check_target(files, overwrite)
    print(f"final: config from {source or 'the caller'}; artifact -> {files.uri}", flush=True)
    prepared = prepare_data(first.data)  # refuses test subjects that also appear in training
    for w in prepared.warnings:
        print(f"warning: {w}", flush=True)
    n_test = 0 if prepared.test is None else int((prepared.test["label"] >= 0).sum())
    print(f"data: {len(prepared.train)} images in {prepared.n_folds} folds, {n_test} labelled test "
          "images", flush=True)
    check_storage(files.storage)
    dashboard = cluster.connect(address, num_cpus=num_cpus)
    if dashboard:
        print(f"dashboard: {dashboard}", flush=True)
    check_shared_storage(files.storage, first)
    if named is None:
        return build_final(first, prepared, files, smoke=smoke)
    # the split depends only on FOLD_KEYS, which the configs share: one split serves them all
    results = {n: build_final(c, prepared, RunFiles(files.uri, n), label=f"[{n}] ",
                              smoke=smoke) for n, c in named.items()}
    files.local.mkdir(parents=True, exist_ok=True)
    write_comparison(files.local, {n: r.metrics for n, r in results.items()})
    files.push("comparison.md", "comparison.json")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(args.verbose)
    cfg, source = resolve_config(args)
    check_weights(cfg.model)  # before reading --compare's search: the first mistake first
    compare_cfg = None
    if args.compare:
        search = RunFiles.from_path(args.compare)
        if not search.pull("best_config.yaml"):
            raise UserError(f"{search.uri}/best_config.yaml: not found; --compare takes a finished "
                            "search's directory")
        compare_cfg, _ = config_from_yaml_with_extras(search.local / "best_config.yaml")
        for key in FOLD_KEYS:  # the same folds for both
            set_value(cfg, f"data.{key}", getattr(compare_cfg.data, key), where="--compare")
        if args.data:
            set_value(compare_cfg, "data.root", args.data, where="--data")
            set_value(cfg, "data.root", args.data, where="--data")
    default = (f"{args.from_dir.rstrip('/')}/ensemble" if args.from_dir else
               time.strftime("runs/final-%Y%m%d-%H%M%S"))
    target = args.out or cfg.final.out or default
    what = str(source or args.preset or "defaults")
    common = dict(overwrite=args.overwrite, address=args.address, num_cpus=args.num_cpus,
                  smoke=args.smoke_test, source=what)
    if compare_cfg is None:
        res = run_final(cfg, target, **common)
        print(f"report:   {res.uri}/report/report.md")
        local = RunFiles.from_path(res.uri).local  # predict reads a local copy
        print(f"predict:  python -m leuk_ray.predict --model {local} IMAGES_OR_FOLDERS")
        return 0
    mine = args.preset or (source.stem if source else "config")
    run_final({mine: cfg, "search": compare_cfg}, target, **common)
    files = RunFiles.from_path(target)
    print(f"\ncomparison: {files.uri}/comparison.md")
    print((files.local / "comparison.md").read_text())
    return 0


if __name__ == "__main__":
    run_main(main)
