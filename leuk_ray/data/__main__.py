"""``python -m leuk_ray.data {audit,synth}``: inspect a data folder, or write the synthetic demo set."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from leuk_ray.cli import run_main
from leuk_ray.config import Config, DataConfig, validate


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    d = DataConfig()
    p = argparse.ArgumentParser(prog="python -m leuk_ray.data", formatter_class=_Formatter,
                                description="Inspect a C-NMC data folder (audit) or write the "
                                "synthetic demo set (synth). Run a subcommand with --help for "
                                "its options.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{audit,synth}")
    a = sub.add_parser("audit", formatter_class=_Formatter,
                       help="counts per class and subject, folds, duplicate groups, leaks",
                       description="Index DATA_DIR (seed layout or Kaggle C-NMC tree), split it as "
                       "training would and report counts, folds, duplicate groups and leaks. "
                       "Exit code 1 when a leak is found, 2 on bad input.")
    a.add_argument("data_dir", metavar="DATA_DIR", help="data folder")
    a.add_argument("--folds", type=int, default=d.folds, help="number of CV folds (data.folds)")
    a.add_argument("--seed", type=int, default=d.seed, help="fold seed (data.seed)")
    a.add_argument("--split", default=d.split, choices=("kfold", "official", "holdout"),
                   help="split scheme (data.split)")
    a.add_argument("--max-images", type=int, default=d.max_images,
                   help="sample at most this many training images (0 = all)")
    a.add_argument("--max-bad-fraction", type=float, default=d.max_bad_fraction,
                   help="refuse the data when more than this fraction of files is unusable")
    a.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    s = sub.add_parser("synth", formatter_class=_Formatter, help="write the synthetic demo set",
                       description="Write synthetic C-NMC-like cells (seed layout: train/ and test/ "
                       "with disjoint subjects) to OUT_DIR.")
    s.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (new or empty)")
    s.add_argument("--n", type=int, default=240, help="number of images (train + test)")
    s.add_argument("--size", type=int, default=128, help="image side, pixels")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        from leuk_ray.data.synth import make_synthetic
        out = make_synthetic(args.out_dir, n=args.n, size=args.size, seed=args.seed)
        print(f"synthetic data: {out.resolve()}  (use --data {out.resolve()})")
        return 0
    from leuk_ray.data.audit import audit, format_report
    cfg = Config(data=DataConfig(root=args.data_dir, folds=args.folds, seed=args.seed,
                                 split=args.split, max_images=args.max_images,
                                 max_bad_fraction=args.max_bad_fraction))
    validate(cfg, where="audit options")
    report = audit(cfg.data)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print(format_report(report))
    return 1 if report["leaks"] else 0


if __name__ == "__main__":
    run_main(main)
