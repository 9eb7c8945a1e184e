"""Find the images of a data directory and their labels: seed layout or Kaggle C-NMC tree.

Seed layout:   ROOT/train/{all,hem}/*   (+ optional ROOT/test/{all,hem}/*)
Kaggle C-NMC:  ROOT/training_data/fold_{0,1,2}/{all,hem}/*
               ROOT/validation_data/C-NMC_test_prelim_phase_data/*  + ..._labels.csv (labelled)
               ROOT/testing_data/**                                  (unlabelled, label -1)
ROOT may also be a folder holding ``C-NMC_Leukemia/`` (the unpacked Kaggle zip).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from leuk_ray.data.decode import IMAGE_EXTS, is_image_name
from leuk_ray.errors import UserError

CLASS_DIRS = {"hem": 0, "all": 1}
LABELS_CSV = "C-NMC_test_prelim_phase_data_labels.csv"
CSV_COLUMNS = ("Patient_ID", "new_names", "labels")
EXPECTED = ("expected the seed layout ROOT/train/{all,hem}/ (optionally ROOT/test/{all,hem}/) or the "
            "Kaggle C-NMC tree ROOT/training_data/fold_{0,1,2}/{all,hem}/ (with validation_data/ and "
            "testing_data/); image types: " + " ".join(IMAGE_EXTS))


@dataclass
class Entry:
    path: str       # absolute
    label: int      # 1 ALL, 0 HEM, -1 unknown
    split: str      # train/test (seed); fold_k/prelim/testing (Kaggle)
    name: str       # the name the subject is parsed from (Patient_ID for renamed test images)


@dataclass
class Scan:
    layout: str     # "seed" or "kaggle"
    root: Path
    entries: list[Entry]
    warnings: list[str] = field(default_factory=list)


def _children(d: Path) -> dict[str, Path]:
    """Sub-folders of ``d`` by lower-case name."""
    try:
        return {p.name.lower(): p for p in sorted(d.iterdir()) if p.is_dir()}
    except OSError as e:
        raise UserError(f"{d}: cannot list folder ({e.strerror or e})") from None


def _images(d: Path, ignored: list[str], recursive: bool = False) -> list[str]:
    """Absolute paths (strings; the folder resolved once) of the image files in ``d``."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(d.resolve()):
        dirnames[:] = sorted(x for x in dirnames if not x.startswith(".")) if recursive else []
        for f in sorted(filenames):
            if is_image_name(f):
                out.append(os.path.join(dirpath, f))
            elif not f.startswith("."):
                ignored.append(os.path.join(dirpath, f))
    return out


def _class_dirs(parent: Path, split: str, ignored: list[str], *, required: bool) -> list[Entry]:
    kids = _children(parent)
    found = {c: kids[c] for c in CLASS_DIRS if c in kids}
    if required and len(found) < len(CLASS_DIRS):
        missing = [c for c in CLASS_DIRS if c not in found]
        raise UserError(f"{parent}: missing class folder(s) {', '.join(missing)}/; expected "
                        f"{parent}/all/ and {parent}/hem/ (names are case-insensitive), found: "
                        f"{', '.join(sorted(kids)) or 'no folders'}")
    entries: list[Entry] = []
    for cls, d in found.items():
        files = _images(d, ignored)
        if not files:
            raise UserError(f"{d}: class folder has no images ({' '.join(IMAGE_EXTS)}); add the "
                            f"{cls.upper()} images or remove the folder")
        entries += [Entry(f, CLASS_DIRS[cls], split, os.path.basename(f)) for f in files]
    return entries


def _scan_seed(root: Path, ignored: list[str]) -> Scan:
    kids = _children(root)
    entries = _class_dirs(kids["train"], "train", ignored, required=True)
    warnings = []
    if "test" in kids:
        test_kids = _children(kids["test"])
        if not any(c in test_kids for c in CLASS_DIRS):
            raise UserError(f"{kids['test']}: test folder has no class folders; expected "
                            f"{kids['test']}/all/ and {kids['test']}/hem/, or remove it")
        test = _class_dirs(kids["test"], "test", ignored, required=False)
        if len({e.label for e in test}) < 2:
            warnings.append(f"{kids['test']}: the test set has only one class; its AUC and "
                            "per-class scores are undefined")
        entries += test
    return Scan("seed", root, entries, warnings)


def read_labels_csv(csv: Path, image_dir: Path, root: Path) -> list[Entry]:
    """The labelled preliminary-test images listed in ``csv`` (Patient_ID, new_names, labels)."""
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise UserError(f"{csv}: cannot read labels CSV ({e}); expected columns "
                        f"{', '.join(CSV_COLUMNS)}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{csv}: labels CSV lacks column(s) {', '.join(missing)}; expected "
                        f"{', '.join(CSV_COLUMNS)} (labels: 1 = ALL, 0 = HEM), found "
                        f"{', '.join(df.columns) or 'none'}")
    names = df["new_names"].str.strip()
    clash = df[names.duplicated(keep=False)].groupby(names)["labels"].nunique()
    if (clash > 1).any():
        raise UserError(f"{csv}: file(s) listed twice with different labels: "
                        f"{', '.join(clash.index[clash > 1][:5])}; keep one row per file")
    df = df[~names.duplicated()]
    entries, absent, escaping, bad_labels = [], [], [], []
    for row, (pid, name, lab) in enumerate(zip(df["Patient_ID"], df["new_names"], df["labels"]),
                                           start=2):
        name, lab = name.strip(), lab.strip()
        rel = PurePosixPath(name.replace("\\", "/"))
        if not name or rel.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in rel.parts:
            escaping.append(f"row {row}: {name!r}")
            continue  # what passes stays inside image_dir, hence inside the data root
        p = os.path.join(image_dir.resolve(), *rel.parts)
        if lab not in ("0", "1", "0.0", "1.0"):
            bad_labels.append(f"row {row}: {lab!r}")
        elif not os.path.isfile(p):
            absent.append(name)
        else:
            entries.append(Entry(p, int(float(lab)), "prelim", pid.strip() or name))
    if escaping:
        raise UserError(f"{csv}: {len(escaping)} row(s) name files outside the data folder "
                        f"{root} (absolute or '..' paths are refused): {'; '.join(escaping[:5])}")
    if bad_labels:
        raise UserError(f"{csv}: {len(bad_labels)} row(s) with a label other than 1 (ALL) or "
                        f"0 (HEM): {'; '.join(bad_labels[:5])}")
    if absent:
        raise UserError(f"{csv}: {len(absent)} row(s) point at files missing from {image_dir}: "
                        f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}; restore "
                        "the files or remove those rows")
    return entries


def _scan_kaggle(root: Path, ignored: list[str]) -> Scan:
    kids = _children(root)
    warnings: list[str] = []
    training = kids["training_data"]
    folds = {k: v for k, v in _children(training).items() if re.fullmatch(r"fold_\d+", k)}
    if not folds:
        raise UserError(f"{training}: no fold_0, fold_1, fold_2 folders; {EXPECTED}")
    entries: list[Entry] = []
    for name, d in sorted(folds.items()):
        entries += _class_dirs(d, name, ignored, required=True)
    if "validation_data" in kids:
        val = kids["validation_data"]
        csvs = [p for p in sorted(val.iterdir()) if p.suffix.lower() == ".csv"]
        csv = next((p for p in csvs if p.name.lower() == LABELS_CSV.lower()), None) or \
            (csvs[0] if len(csvs) == 1 else None)
        dirs = _children(val)
        image_dir = dirs.get("c-nmc_test_prelim_phase_data") or \
            (next(iter(dirs.values())) if len(dirs) == 1 else val)
        if csv is None:
            n = len(_images(image_dir, [], recursive=True))
            warnings.append(f"{val}: no labels CSV ({LABELS_CSV}); its {n} images are not used")
        else:
            listed = read_labels_csv(csv, image_dir, root)
            entries += listed
            unlisted = set(_images(image_dir, [], recursive=True)) - {e.path for e in listed}
            if unlisted:
                warnings.append(f"{image_dir}: {len(unlisted)} image(s) not listed in {csv.name} "
                                f"are not used, e.g. {', '.join(sorted(unlisted)[:3])}")
    if "testing_data" in kids:
        for f in _images(kids["testing_data"], ignored, recursive=True):
            entries.append(Entry(f, -1, "testing", os.path.basename(f)))
    return Scan("kaggle", root, entries, warnings)


def scan(root: str | Path) -> Scan:
    """Detect the layout of ``root`` and list every image with its label and origin split."""
    if not str(root).strip():
        raise UserError("data.root is empty: pass --data DIR (or set data.root) to a C-NMC folder "
                        "or to `python -m leuk_ray.data synth DIR` output")
    r = Path(root).expanduser()
    if not r.exists():
        raise UserError(f"{r}: data folder not found; {EXPECTED}")
    if not r.is_dir():
        raise UserError(f"{r}: not a folder; {EXPECTED}")
    kids = _children(r)
    if "training_data" not in kids and "train" not in kids and "c-nmc_leukemia" in kids:
        r, kids = kids["c-nmc_leukemia"], _children(kids["c-nmc_leukemia"])
    ignored: list[str] = []
    if "training_data" in kids:
        s = _scan_kaggle(r, ignored)
    elif "train" in kids:
        s = _scan_seed(r, ignored)
    else:
        hint = (f"; {r} looks like a class-folder parent itself: point at the folder above it"
                if set(CLASS_DIRS) <= set(kids) or re.fullmatch(r"fold_\d+", r.name.lower()) else "")
        raise UserError(f"{r}: unknown data layout (found: {', '.join(sorted(kids)[:8]) or 'no folders'}"
                        f"){hint}; {EXPECTED}")
    if ignored:
        s.warnings.append(f"{s.root}: ignored {len(ignored)} file(s) without an image extension, "
                          f"e.g. {', '.join(ignored[:3])}")
    return s
