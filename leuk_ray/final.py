"""``python -m leuk_ray.final``: the best config -> a k-fold ensemble, evaluated, in one artifact.

1. Reads the best config of a search (``--from DIR`` or ``--config``), or a preset.
2. Retrains the k fold models in parallel with the same fold trainer as the search (one fold per
   Ray Train worker; full epoch budget, early stopping on each fold's validation subjects, no
   pruning). The run is named after its config and folds, so rerunning after a crash resumes the
   folds from their last checkpoints.
3. Fits a temperature and picks the decision threshold on the out-of-fold predictions (never on
   the test set).
4. Evaluates every fold model and the ensemble (mean of the fold probabilities) on the labelled
   test set, with and without test-time augmentation.
5. Writes the artifact atomically: manifest.json, fold_<i>.pt, metrics.json, oof.csv, report/.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leuk_ray import cluster
from leuk_ray.artifact import build_ensemble, save_artifact
from leuk_ray.calibration import apply_temperature, calibrate_oof
from leuk_ray.cli import common_parser, run_main
from leuk_ray.config import (Config, config_from_yaml_with_extras, load_config, set_value,
                             to_dict)
from leuk_ray.data import PreparedData, fold_datasets, prepare_data
from leuk_ray.data.dataset import frame_dataset
from leuk_ray.data.transforms import eval_transform
from leuk_ray.engine import load_checkpoint
from leuk_ray.errors import UserError
from leuk_ray.fold_trainer import fold_file, run_folds
from leuk_ray.metrics import classification_metrics
from leuk_ray.report import write_report


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
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=float, default=None, help=argparse.SUPPRESS)
    return p


def resolve_config(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """Base = the search's best config (or --config, which may be a best_config.yaml), then the
    usual --preset/--smoke-test/--set layers; ``--data`` overrides data.root."""
    source = None
    base: dict | None = None
    if args.from_dir:
        search = cluster.RunFiles.from_path(args.from_dir)
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
    if args.tta is not None:
        set_value(cfg, "final.tta", args.tta, where="--tta")
    if not cfg.data.root and not getattr(args, "compare", None):
        raise UserError("no data: pass --data DIR (or a config whose data.root is set)")
    return cfg, source


def _run_name(cfg: Config, prepared: PreparedData) -> str:
    """Same config and same folds -> same name -> a rerun resumes instead of starting over."""
    h = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode())
    for r in prepared.train.itertuples():
        h.update(f"{r.path}|{r.fold}\n".encode())
    return f"final-{h.hexdigest()[:12]}"


def _oof(prepared: PreparedData, cfg: Config, states: list[dict]) -> dict[str, np.ndarray]:
    """Out-of-fold rows in fold order: each validation image scored by the model that never saw it."""
    paths, labels, subjects, folds, probs = [], [], [], [], []
    for i, st in enumerate(states):
        _, val_ds = fold_datasets(prepared, i, cfg.data)
        p = st["best_probs"].numpy() if st.get("best_probs") is not None else np.zeros(0)
        if len(p) != len(val_ds):
            raise UserError(f"fold {i}: its checkpoint scored {len(p)} validation images but the "
                            f"data now has {len(val_ds)}; the data changed since training: rerun "
                            "with the same data or a fresh --out")
        paths += val_ds.paths
        labels.append(val_ds.labels)
        subjects += list(val_ds.subjects)
        folds.append(np.full(len(p), i))
        probs.append(p)
    return {"path": np.array(paths), "label": np.concatenate(labels), "subject": np.array(subjects),
            "fold": np.concatenate(folds), "prob_all": np.concatenate(probs)}


def _write_oof_csv(oof: dict[str, np.ndarray], temperature: float, path: Path) -> None:
    cal = apply_temperature(oof["prob_all"], temperature)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "subject", "label", "fold", "prob_all", "prob_all_calibrated"])
        for row in zip(oof["path"], oof["subject"], oof["label"], oof["fold"], oof["prob_all"], cal):
            w.writerow([row[0], row[1], int(row[2]), int(row[3]), f"{row[4]:.6f}", f"{row[5]:.6f}"])


def evaluate_test(ens: Any, prepared: PreparedData, cfg: Config, threshold: float,
                  temperature: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every fold model and the ensemble on the labelled test set, without and with TTA."""
    test = prepared.test
    test = test[test["label"] >= 0] if test is not None else None
    if test is None or len(test) == 0:
        return {}, {}
    ds = frame_dataset(test, cfg.data.image_size, eval_transform(cfg.data.image_size))
    y, subj = ds.labels, list(ds.subjects)
    out: dict[str, Any] = {"n": int(len(y)), "subjects": sorted(set(subj))}
    probs: dict[str, np.ndarray] = {}
    for tta in ([False, True] if cfg.final.tta else [False]):
        key = "ensemble_tta" if tta else "ensemble"
        p, per_fold = ens.predict(ds, tta=tta, batch_size=cfg.train.batch_size)
        out[key] = classification_metrics(y, p, threshold, subjects=subj)
        out["folds_tta" if tta else "folds"] = [
            classification_metrics(y, apply_temperature(pf, temperature), threshold, subjects=subj)
            for pf in per_fold]
        probs[key] = p
    probs["label"], probs["subject"], probs["path"] = y, np.array(subj), np.array(ds.paths)
    return out, probs


def _fmt(m: dict | None) -> str:
    if not m:
        return "-"
    auc = f"{m['auc']:.4f}" if m.get("auc") is not None else "n/a"
    return (f"F1 {m['f1']:.4f}  acc {m['accuracy']:.4f}  AUC {auc}  sens {m['sensitivity']:.4f}  "
            f"spec {m['specificity']:.4f}  ECE {m['ece']:.4f}")


def build_final(cfg: Config, prepared: PreparedData, files: cluster.RunFiles,
                *, label: str = "") -> dict[str, Any]:
    """Train the folds, calibrate on OOF, evaluate, write the artifact; returns its metrics."""
    runs = f"{files.storage}/.{files.name}.runs"  # fold checkpoints: a rerun resumes from them
    name = _run_name(cfg, prepared)
    print(f"{label}training {prepared.n_folds} fold models in parallel (run {runs}/{name})",
          flush=True)
    outcome = run_folds(cfg, prepared, storage_path=runs, name=name)
    if outcome.metrics.get("pruned_reason"):
        raise UserError(f"final training failed: {outcome.metrics['pruned_reason']}")
    if outcome.checkpoint_dir is None:
        raise UserError(f"final training left no checkpoint under {runs}/{name}")
    states = [load_checkpoint(outcome.checkpoint_dir / fold_file(i))
              for i in range(prepared.n_folds)]

    oof = _oof(prepared, cfg, states)
    temperature, threshold = calibrate_oof(oof["label"], oof["prob_all"], fit=cfg.final.calibrate)
    oof_metrics = classification_metrics(oof["label"], apply_temperature(oof["prob_all"],
                                                                         temperature),
                                         threshold, subjects=list(oof["subject"]))
    ens = build_ensemble(cfg, [s["best_state"] for s in states], temperature=temperature,
                         threshold=threshold, device=cfg.train.device)
    test_metrics, test_probs = evaluate_test(ens, prepared, cfg, threshold, temperature)
    fold_scores = []
    for i, st in enumerate(states):
        row = {"fold": i, "val_f1": float(st["best_metrics"].get("f1", float("nan"))),
               "best_epoch": int(st["best_epoch"]), "epochs": int(st["epoch"])}
        if test_metrics:
            row["test_f1"] = test_metrics["folds"][i]["f1"]
        fold_scores.append(row)
    metrics = {"threshold": threshold, "temperature": temperature, "oof": oof_metrics,
               "test": test_metrics, "folds": fold_scores}

    def report(report_dir: Path) -> None:
        _write_oof_csv(oof, temperature, report_dir.parent / "oof.csv")
        comparison = None
        if test_probs:
            y, p, subj = test_probs["label"], test_probs["ensemble"], test_probs["subject"]
            m, what = test_metrics["ensemble"], "held-out test set"
            comparison = {f"fold {i}": fm for i, fm in enumerate(test_metrics["folds"])}
            comparison["ensemble"] = m
            if "ensemble_tta" in test_metrics:
                comparison.update({f"fold {i} + TTA": fm
                                   for i, fm in enumerate(test_metrics["folds_tta"])})
                comparison["ensemble + TTA"] = test_metrics["ensemble_tta"]
        else:
            y, p, subj = oof["label"], apply_temperature(oof["prob_all"], temperature), \
                oof["subject"]
            m, what = oof_metrics, "out-of-fold predictions (no labelled test set)"
        write_report(report_dir, title=f"leuk-ray ensemble of {len(states)} folds: {what}",
                     metrics=m, y_true=y, prob_all=p, threshold=threshold,
                     fold_scores=fold_scores, subjects=list(subj), temperature=temperature,
                     comparison=comparison)

    save_artifact(files.local, cfg=cfg, fold_states=[s["best_state"] for s in states],
                  fold_scores=fold_scores, temperature=temperature, threshold=threshold,
                  metrics=metrics, write_report=report)
    files.push("")  # to s3:// etc.: every file, manifest.json last

    print(f"\n{label}out-of-fold ({len(oof['label'])} images): {_fmt(oof_metrics)}")
    print(f"temperature {temperature:.3f}, threshold {threshold:.3f} (chosen on out-of-fold data)")
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
    return metrics


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg, source = resolve_config(args)
    compare_cfg = None
    if args.compare:
        search = cluster.RunFiles.from_path(args.compare)
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
    files = cluster.RunFiles.from_path(target)  # s3:// artifacts are built locally, then uploaded
    print(f"final: config from {source or args.preset or 'defaults'}; artifact -> {files.uri}",
          flush=True)
    prepared = prepare_data(cfg.data)  # refuses test subjects that also appear in training
    for w in prepared.warnings:
        print(f"warning: {w}", flush=True)
    n_test = 0 if prepared.test is None else int((prepared.test["label"] >= 0).sum())
    print(f"data: {len(prepared.train)} images in {prepared.n_folds} folds, {n_test} labelled test "
          "images", flush=True)
    cluster.check_storage(files.storage)
    dashboard = cluster.connect(args.address, num_cpus=args.num_cpus)
    if dashboard:
        print(f"dashboard: {dashboard}", flush=True)
    cluster.check_shared_storage(files.storage, cfg)

    if compare_cfg is None:
        build_final(cfg, prepared, files)
        print(f"report:   {files.uri}/report/report.md")
        print(f"predict:  python -m leuk_ray.predict --model {files.local} IMAGES_OR_FOLDERS")
        return 0
    mine = args.preset or (source.stem if source else "config")
    # the split depends only on FOLD_KEYS, which both configs share: one split serves both
    results = {}
    for n, c in {mine: cfg, "search": compare_cfg}.items():
        results[n] = build_final(c, prepared, cluster.RunFiles(files.uri, n), label=f"[{n}] ")
    files.local.mkdir(parents=True, exist_ok=True)
    report = write_comparison(files.local, results)
    files.push("comparison.md", "comparison.json")
    print(f"\ncomparison: {files.uri}/comparison.md")
    print(report.read_text())
    return 0


if __name__ == "__main__":
    run_main(main)
