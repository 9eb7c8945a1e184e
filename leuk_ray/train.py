"""``python -m leuk_ray.train``: train one fold or every fold in turn on this machine, without Ray.

The baseline the Ray layer is measured against, and the way to debug a config:

    python -m leuk_ray.train --data DIR --out runs/try1 [--fold 0] [--set train.epochs=3]
    python -m leuk_ray.train --smoke-test --demo    # synthetic data, tiny model, minutes on a CPU
    python -m leuk_ray.train --data DIR --out runs/try1 --resume   # continue after an interruption

Outputs in --out: config.yaml, warnings.txt (data warnings, if any), fold_<i>.pt (best epoch:
{"model", "config", "metrics", "fold", "epoch"}, loadable with torch.load(weights_only=True)),
state_fold_<i>.pt (resume state, every epoch), history.csv, oof.csv, summary.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from leuk_ray import console
from leuk_ray.cli import common_parser, config_from_args, run_main
from leuk_ray.config import Config, save_config, to_dict
from leuk_ray.data import fold_datasets, prepare_data
from leuk_ray.data.cache import image_cache
from leuk_ray.data.synth import demo_data
from leuk_ray.data.transforms import preprocessing_for
from leuk_ray.engine import FoldResult, FoldRun, fit_fold, load_checkpoint, save_checkpoint
from leuk_ray.errors import UserError
from leuk_ray.weights import check_weights


def build_parser() -> argparse.ArgumentParser:
    p = common_parser("python -m leuk_ray.train",
                      "Train the folds of a config one after another on this machine (no Ray); "
                      "writes the best checkpoint of each fold, per-epoch history, out-of-fold "
                      "predictions and a summary.")
    p.add_argument("--fold", type=int, default=None, metavar="N",
                   help="train only fold N (default: all folds one after another)")
    p.add_argument("--demo", action="store_true",
                   help="generate a small synthetic data set in <out>/demo_data and train on it")
    p.add_argument("--resume", action="store_true",
                   help="continue each fold from <out>/state_fold_<i>.pt where it exists")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(args.verbose)
    if args.resume and not args.out:
        raise UserError("--resume needs --out DIR: the directory of the run to continue")
    out = Path(args.out or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}").expanduser()
    if args.demo:
        if args.data:
            raise UserError("--demo and --data exclude each other: --demo trains on generated data")
        args.data = str(demo_data(out / "demo_data"))
    cfg = config_from_args(args)
    if not cfg.data.root:
        raise UserError("no data: pass --data DIR (or --demo)")
    check_weights(cfg.model)  # backbone name and weights: fail before the data is read

    if not args.resume and (out / "config.yaml").exists():
        raise UserError(f"{out} holds an earlier run: pass --resume to continue it, or another "
                        "--out")
    prepared = prepare_data(cfg.data)  # bad data fails here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if prepared.warnings:
        (out / "warnings.txt").write_text("\n".join(prepared.warnings) + "\n")
        for w in prepared.warnings:
            print(f"warning: {w}")
    folds = list(range(prepared.n_folds))
    if args.fold is not None:
        if args.fold not in folds:
            raise UserError(f"--fold {args.fold}: out of range; this split has {prepared.n_folds} "
                            f"fold(s), numbered 0..{prepared.n_folds - 1}")
        folds = [args.fold]

    print(f"training {len(folds)} fold(s) of {prepared.n_folds} on {len(prepared.train)} images "
          f"({cfg.model.backbone}, {cfg.data.image_size} px, up to {cfg.train.epochs} epochs) "
          f"-> {out}", flush=True)
    images, bad = image_cache(cfg.data, prepared, preprocessing_for(cfg).interpolation)
    results: list[FoldResult] = []
    oof_parts: list[pd.DataFrame] = []
    for fold in folds:
        result, val_ds = train_fold(cfg, prepared, fold, out, resume=args.resume, images=images,
                                    bad=bad)
        results.append(result)
        oof_parts.append(pd.DataFrame({
            "path": list(val_ds.paths), "subject": list(val_ds.subjects),
            "label": [int(y) for y in val_ds.labels], "fold": fold, "prob_all": result.oof_probs}))
        write_tables(out, cfg, results, oof_parts)

    mean_f1 = write_tables(out, cfg, results, oof_parts)
    print(f"outputs: {out}")
    print(f"mean validation F1 over {len(results)} fold(s): {mean_f1:.4f}")
    return 0


def train_fold(cfg: Config, prepared, fold: int, out: Path, *, resume: bool,
               images: dict | None = None, bad: Sequence[str] = ()):
    """Train one fold (resuming from its state file if asked) and write fold_<i>.pt."""
    train_ds, val_ds = fold_datasets(prepared, fold, cfg.data, images=images, bad=bad,
                                     interpolation=preprocessing_for(cfg).interpolation)
    state_path = out / f"state_fold_{fold}.pt"
    state = None
    if resume and state_path.exists():
        state = load_checkpoint(state_path)
        print(f"fold {fold}: resuming after epoch {state.get('epoch')} from {state_path}",
              flush=True)
    print(f"fold {fold}: {len(train_ds)} training / {len(val_ds)} validation images", flush=True)

    def on_epoch(metrics: dict, run: FoldRun) -> None:
        save_checkpoint(run.state_dict(), state_path)

    result = fit_fold(cfg, train_ds, val_ds, fold=fold, state=state, on_epoch=on_epoch,
                      log=lambda msg: print(msg, flush=True))
    save_checkpoint({"model": result.best_state, "config": to_dict(cfg),
                     "metrics": result.best_metrics, "fold": fold, "epoch": result.best_epoch},
                    out / f"fold_{fold}.pt")
    return result, val_ds


def write_tables(out: Path, cfg: Config, results: list[FoldResult],
                 oof_parts: list[pd.DataFrame]) -> float:
    """history.csv, oof.csv and summary.json for the folds trained so far; returns the mean F1."""
    rows = [r for res in results for r in res.history]
    pd.DataFrame(rows).to_csv(out / "history.csv", index=False)
    if oof_parts:
        pd.concat(oof_parts, ignore_index=True).to_csv(out / "oof.csv", index=False)
    f1s = [res.best_metrics.get("f1", float("nan")) for res in results]
    mean_f1 = sum(f1s) / len(f1s) if f1s else float("nan")
    summary = {
        "mean_val_f1": None if math.isnan(mean_f1) else mean_f1,
        "monitor": cfg.train.monitor,
        "folds": {str(res.fold): {"best_epoch": res.best_epoch, "epochs": len(res.history),
                                  **res.best_metrics} for res in results},
    }
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    return mean_f1


def _json_safe(x):
    """NaN/inf -> None, recursively (summary.json stays strict JSON)."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


if __name__ == "__main__":
    run_main(main)
