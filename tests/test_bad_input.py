"""Bad input through the real command lines: ONE table of cases, each run as a user would run it.

Every error case must end with exit code 2, exactly one line on stderr that starts with
``error:`` and names the file/key and what is wrong, no traceback, and nothing the user had lost
or changed: the whole case folder (data, existing outputs, the working directory) is hashed before
and after. Accepted-but-odd input (grey/RGBA/16-bit images, a few unusable files below
``data.max_bad_fraction``) must succeed instead. Ray must never start, and nothing may train.

To add a case: write a ``build(root, kit) -> args`` that creates the bad input under ``root`` and
returns the arguments of ``python -m leuk_ray.<cmd>``, then add a ``Case`` row to ``CASES``.
Words in ``Case.words`` may use ``{root}``. The cheapest command that reaches the check is used
(``leuk_ray.data audit`` starts in ~2 s; train/predict/search import torch or Ray, ~6-8 s).

The last two tests are the security checks of issue 7: every ``torch.load`` passes
``weights_only=True``, and nothing binds a public address.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "leuk_ray"
CSV_NAME = "C-NMC_test_prelim_phase_data_labels.csv"


# ------------------------------------------------------------------------------------------ helpers
class OutputTouched(AssertionError):
    """Something the user had was changed/removed, or the failed command left files behind."""


def _img(path: Path, seed: int, shape: tuple = (12, 12, 3), dtype=np.uint8) -> Path:
    """A tiny random (hence unique) image; the extension picks the format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hi = 65536 if dtype == np.uint16 else 256
    pixels = np.random.default_rng(seed).integers(0, hi, shape, dtype=dtype)
    assert cv2.imwrite(str(path), pixels), path
    return path


def _snapshot(root: Path) -> dict[str, str]:
    """relative path -> 'dir' or the sha256 of the file's bytes, for everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def _diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    lost = [f"lost {k}" for k in sorted(set(before) - set(after))]
    changed = [f"changed {k}" for k in sorted(set(before) & set(after)) if before[k] != after[k]]
    created = [f"created {k}" for k in sorted(set(after) - set(before))]
    return lost + changed + created


class Kit:
    """What builders may reuse: the session's synthetic tree and a tiny verified artifact."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request

    def synth(self, dest: Path) -> Path:
        """A copy of the conftest synthetic seed-layout tree (120 images, 48 px, 6+6 subjects)."""
        return Path(shutil.copytree(self._request.getfixturevalue("_synth_master"), dest))

    def artifact(self, dest: Path) -> Path:
        return Path(shutil.copytree(self._request.getfixturevalue("_artifact_master"), dest))


@pytest.fixture(scope="module")
def _artifact_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-fold ensemble of random-init tiny models (smoke config), saved by save_artifact."""
    import torch

    from leuk_ray.artifact import save_artifact
    from leuk_ray.config import load_config
    from leuk_ray.model import create_model

    cfg = load_config(smoke=True)
    states = []
    for i in range(2):
        torch.manual_seed(i)
        states.append(create_model(cfg.model).state_dict())
    return save_artifact(tmp_path_factory.mktemp("art") / "ensemble", cfg=cfg, fold_states=states,
                         fold_scores=[{"fold": i, "val_f1": 0.5} for i in range(2)],
                         temperature=1.0, threshold=0.5, metrics={})


# ------------------------------------------------------------------------------ input builders
def _seed_tree(root: Path, subjects: int = 3, per: int = 2) -> Path:
    """A small valid seed layout: train/{all,hem}, `subjects` subjects per class."""
    seed = 0
    for cls, prefix in (("all", ""), ("hem", "H")):
        for s in range(1, subjects + 1):
            for c in range(1, per + 1):
                seed += 1
                _img(root / "train" / cls / f"UID_{prefix}{s}_{c}_1_{cls}.bmp", seed)
    return root


def _kaggle_tree(root: Path, rows: list[tuple[str, str, str]] | None = None) -> Path:
    """A miniature Kaggle C-NMC tree; its labels CSV has ``rows`` (Patient_ID, new_names, labels)"""
    seed = 100
    for f in range(3):
        for cls, subj in (("all", f"{f + 1}"), ("hem", f"H{f + 1}")):
            seed += 1
            _img(root / "training_data" / f"fold_{f}" / cls / f"UID_{subj}_1_1_{cls}.bmp", seed)
    images = root / "validation_data" / "C-NMC_test_prelim_phase_data"
    for i in (1, 2):
        _img(images / f"{i}.bmp", 200 + i)
    rows = rows or [("UID_60_1_1_all.bmp", "1.bmp", "1"), ("UID_H60_1_1_hem.bmp", "2.bmp", "0")]
    pd.DataFrame(rows, columns=["Patient_ID", "new_names", "labels"]).to_csv(
        root / "validation_data" / CSV_NAME, index=False)
    return root


def _train_cmd(root: Path, *extra: str, data: Path | None = None,
               existing: bool = True) -> list[str]:
    """train --smoke-test into an existing run folder holding an earlier run's files, or (for the
    cases that get past the config, where train refuses such a folder) into a new one."""
    out = root / "runs" / "try1"
    if existing:
        out.mkdir(parents=True)
        (out / "config.yaml").write_text("# the config of an earlier run\ntrain: {epochs: 3}\n")
        (out / "fold_0.pt").write_bytes(b"earlier weights")
    data = data if data is not None else _seed_tree(root / "data")
    return ["--smoke-test", "--data", str(data), "--out", str(out), *extra]


def b_missing_data_dir(root: Path, kit: Kit) -> list[str]:
    return ["audit", str(root / "no_such_data")]


def b_unknown_layout(root: Path, kit: Kit) -> list[str]:
    d = root / "downloads"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in ("cells.zip", "notes.txt", "UID_1_1_1_all.bmp", "random.bin"):
        (d / name).write_bytes(rng.bytes(100))
    return ["audit", str(d)]


def b_missing_class_folder(root: Path, kit: Kit) -> list[str]:
    _img(root / "data" / "train" / "all" / "UID_1_1_1_all.bmp", 0)
    return ["audit", str(root / "data")]


def b_empty_class_folder(root: Path, kit: Kit) -> list[str]:
    _img(root / "data" / "train" / "all" / "UID_1_1_1_all.bmp", 0)
    (root / "data" / "train" / "hem").mkdir()
    (root / "data" / "train" / "hem" / "readme.txt").write_text("no images here")
    return ["audit", str(root / "data")]


ALL_DIR = "data/train/all"


def _zero_byte(data: Path) -> Path:
    p = data / "train" / "all" / "UID_101_50_1_all.bmp"
    p.write_bytes(b"")
    return p


def _truncated(data: Path) -> Path:
    whole = sorted((data / "train" / "all").glob("UID_102_*.bmp"))[0].read_bytes()
    p = data / "train" / "all" / "UID_102_52_1_all.bmp"
    p.write_bytes(whole[: len(whole) // 2])
    return p


def _not_an_image(data: Path) -> Path:
    p = data / "train" / "all" / "UID_101_51_1_all.png"
    p.write_text("this is a text file behind an image extension\n")
    return p


def b_zero_byte_file(root: Path, kit: Kit) -> list[str]:
    _zero_byte(kit.synth(root / "data"))
    return ["audit", str(root / "data"), "--max-bad-fraction", "0"]


def b_truncated_image(root: Path, kit: Kit) -> list[str]:
    _truncated(kit.synth(root / "data"))
    return ["audit", str(root / "data"), "--max-bad-fraction", "0"]


def b_not_an_image(root: Path, kit: Kit) -> list[str]:
    _not_an_image(kit.synth(root / "data"))
    return ["audit", str(root / "data"), "--max-bad-fraction", "0"]


def b_bad_files_below_fraction(root: Path, kit: Kit) -> list[str]:
    data = kit.synth(root / "data")
    for make in (_zero_byte, _truncated, _not_an_image):
        make(data)
    return ["audit", str(data), "--max-bad-fraction", "0.05", "--json"]


def c_bad_files_below_fraction(root: Path, r: subprocess.CompletedProcess) -> None:
    report = json.loads(r.stdout)
    bad = {b["path"]: b["reason"] for b in report["bad_files"]}
    d = root / ALL_DIR
    expect = {str(d / "UID_101_50_1_all.bmp"): "empty file",
              str(d / "UID_102_52_1_all.bmp"): "truncated BMP",
              str(d / "UID_101_51_1_all.png"): "not an image"}
    assert set(bad) == set(expect), bad
    assert all(expect[p] in bad[p] for p in expect), bad
    assert report["images"] == 120
    warning = next(w for w in report["warnings"] if "unusable" in w)
    assert "3 of 123" in warning and all(p in warning for p in expect), warning


ODD_IMAGES = {  # name -> (shape, dtype): accepted and converted to (size, size, 3) uint8 RGB
    "train/all/UID_101_90_1_all.png": ((40, 40), np.uint8),          # greyscale
    "train/hem/UID_H101_90_1_hem.png": ((40, 40, 4), np.uint8),      # RGBA
    "train/all/UID_102_90_1_all.png": ((40, 40, 3), np.uint16),      # 16-bit colour
    "train/hem/UID_H102_90_1_hem.tif": ((40, 40), np.uint16),        # 16-bit grey TIFF
    "train/all/UID_103_90_1_all.bmp": ((40, 40, 4), np.uint8),       # 32-bit BMP with alpha
    "train/hem/UID_H103_90_1_hem.bmp": ((40, 40), np.uint8),         # 8-bit palette BMP
}


def b_gray_rgba_16bit(root: Path, kit: Kit) -> list[str]:
    data = kit.synth(root / "data")
    for i, (name, (shape, dtype)) in enumerate(ODD_IMAGES.items()):
        _img(data / name, 500 + i, shape, dtype)
    return ["audit", str(data), "--json"]


def c_gray_rgba_16bit(root: Path, r: subprocess.CompletedProcess) -> None:
    from leuk_ray.data import read_image

    report = json.loads(r.stdout)
    assert report["bad_files"] == [] and report["images"] == 120 + len(ODD_IMAGES)
    assert report["counts"] == {"all": 63, "hem": 63}
    for name in ODD_IMAGES:
        for size in (64, None):
            a = read_image(root / "data" / name, size)
            assert a.dtype == np.uint8 and a.shape == ((size, size, 3) if size else (40, 40, 3))
    assert read_image(root / "data" / "train/all/UID_102_90_1_all.png").std() > 10  # not clipped


def b_one_class_only(root: Path, kit: Kit) -> list[str]:
    data = root / "data"
    for i in range(1, 5):
        _img(data / "train" / "all" / f"UID_{i}_1_1_all.bmp", i)
    (data / "train" / "hem").mkdir(parents=True)
    (data / "train" / "hem" / "UID_H1_1_1_hem.bmp").write_bytes(b"")   # the only HEM file: unusable
    return ["audit", str(data), "--max-bad-fraction", "0.5"]


def b_fewer_subjects_than_folds(root: Path, kit: Kit) -> list[str]:
    return ["audit", str(kit.synth(root / "data")), "--folds", "7"]


def b_folds_below_2(root: Path, kit: Kit) -> list[str]:
    return ["audit", str(_seed_tree(root / "data")), "--folds", "1"]


def b_csv_missing_columns(root: Path, kit: Kit) -> list[str]:
    data = _kaggle_tree(root / "data")
    csv = data / "validation_data" / CSV_NAME
    pd.read_csv(csv).drop(columns="labels").to_csv(csv, index=False)
    return ["audit", str(data)]


def b_csv_missing_files(root: Path, kit: Kit) -> list[str]:
    data = _kaggle_tree(root / "data", rows=[("UID_60_1_1_all.bmp", "1.bmp", "1"),
                                              ("UID_H60_1_1_hem.bmp", "2.bmp", "0"),
                                              ("UID_H61_1_1_hem.bmp", "7.bmp", "0")])
    return ["audit", str(data)]


def b_csv_dotdot_path(root: Path, kit: Kit) -> list[str]:
    _img(root / "secret.bmp", 9)  # exists, outside the data root
    data = _kaggle_tree(root / "data", rows=[("UID_60_1_1_all.bmp", "../../../secret.bmp", "1"),
                                              ("UID_H60_1_1_hem.bmp", "2.bmp", "0")])
    return ["audit", str(data)]


def b_csv_absolute_path(root: Path, kit: Kit) -> list[str]:
    secret = _img(root / "secret.bmp", 9)
    data = _kaggle_tree(root / "data", rows=[("UID_60_1_1_all.bmp", str(secret), "1"),
                                              ("UID_H60_1_1_hem.bmp", "2.bmp", "0")])
    return ["audit", str(data)]


def b_malformed_yaml(root: Path, kit: Kit) -> list[str]:
    (root / "my.yaml").write_text("train:\n  epochs: 3\n  lr: [1e-3\nmodel:\n  dropout: 0.2\n")
    return _train_cmd(root, "--config", str(root / "my.yaml"))


def b_unknown_config_key(root: Path, kit: Kit) -> list[str]:
    (root / "my.yaml").write_text("train:\n  epochs: 3\n  learning_rate: 1.0e-3\n")
    return _train_cmd(root, "--config", str(root / "my.yaml"))


def b_negative_lr(root: Path, kit: Kit) -> list[str]:
    return _train_cmd(root, "--set", "train.lr=-0.001")


def b_dropout_ge_1(root: Path, kit: Kit) -> list[str]:
    return _train_cmd(root, "--set", "model.dropout=1.0")


def b_train_bad_files_over_fraction(root: Path, kit: Kit) -> list[str]:
    data = kit.synth(root / "data")
    _zero_byte(data)
    return _train_cmd(root, "--set", "data.max_bad_fraction=0", data=data, existing=False)


def _search_cmd(root: Path, *extra: str, data: Path | None = None) -> list[str]:
    """search --smoke-test into a storage folder that already holds an earlier search."""
    store = root / "results"
    (store / "earlier").mkdir(parents=True)
    (store / "earlier" / "trials.csv").write_text("trial_id,status\nt1,completed\n")
    data = data if data is not None else _seed_tree(root / "data")
    return ["--smoke-test", "--data", str(data), "--storage-path", str(store),
            "--name", "s1", *extra]


def b_space_low_ge_high(root: Path, kit: Kit) -> list[str]:
    (root / "space.yaml").write_text("params:\n"
                                     "  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-3}\n"
                                     "  model.dropout: {type: uniform, low: 0.0, high: 0.5}\n")
    return _search_cmd(root, "--space", str(root / "space.yaml"))


def b_search_missing_data_dir(root: Path, kit: Kit) -> list[str]:
    return _search_cmd(root, data=root / "no_such_data")


def b_artifact_wrong_checksum(root: Path, kit: Kit) -> list[str]:
    art = kit.artifact(root / "ensemble")
    w = bytearray((art / "fold_0.pt").read_bytes())
    w[len(w) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    (art / "fold_0.pt").write_bytes(bytes(w))
    _img(root / "cells" / "a.png", 1, (64, 64, 3))
    (root / "cwd" / "preds.csv").write_text("path,prob_all,pred\nearlier.png,0.9,all\n")
    return ["--model", str(art), str(root / "cells")]


def b_predict_empty_folder(root: Path, kit: Kit) -> list[str]:
    art = kit.artifact(root / "ensemble")
    (root / "cells").mkdir()
    (root / "cells" / "notes.txt").write_text("no images here")
    return ["--model", str(art), str(root / "cells"), "--out",
            str(root / "preds.csv")]


def b_space_unsearchable_key(root: Path, kit: Kit) -> list[str]:
    (root / "space.yaml").write_text("params:\n"
                                     "  train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}\n"
                                     "  data.image_size: {type: choice, values: [64, 128]}\n")
    return _search_cmd(root, "--space", str(root / "space.yaml"))


def b_search_num_samples_zero(root: Path, kit: Kit) -> list[str]:
    return _search_cmd(root, "--num-samples", "0")


def _finished_search(root: Path, kit: Kit) -> Path:
    """A search directory as a finished search and final leave it: best_config.yaml, ensemble/."""
    from leuk_ray.config import load_config, save_config

    search = root / "results" / "s1"
    cfg = load_config(None, [f"data.root={_seed_tree(root / 'data')}"], smoke=True)
    save_config(cfg, search / "best_config.yaml", extra={"cv_score": 0.5, "trial_id": "t1"})
    kit.artifact(search / "ensemble")
    return search


def b_final_existing_artifact(root: Path, kit: Kit) -> list[str]:
    return ["--from", str(_finished_search(root, kit))]


def b_predict_search_dir(root: Path, kit: Kit) -> list[str]:
    search = _finished_search(root, kit)
    _img(root / "cells" / "a.png", 1, (64, 64, 3))
    return ["--model", str(search), str(root / "cells"), "--out", str(root / "preds.csv")]


# ------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Case:
    id: str
    cmd: str                                  # python -m leuk_ray.<cmd>
    build: Callable[[Path, Kit], list[str]]   # makes the input under root, returns the arguments
    words: tuple[str, ...] = ()               # all in the one error line; may use {root}
    code: int = 2
    check: Callable[[Path, subprocess.CompletedProcess], None] | None = None  # accepted cases
    bug: str = ""                             # known bug (outside this test's remit): xfail

    def param(self):
        marks = [pytest.mark.xfail(reason=self.bug, raises=OutputTouched, strict=True)] \
            if self.bug else []
        return pytest.param(self, id=self.id, marks=marks)


CASES = [
    # --- data folder (python -m leuk_ray.data audit reaches every data-layer check cheaply)
    Case("missing-data-dir", "data", b_missing_data_dir,
         ("{root}/no_such_data", "data folder not found", "train/{all,hem}")),
    Case("unknown-layout", "data", b_unknown_layout,
         ("{root}/downloads", "unknown data layout", "found: no folders", "training_data/fold_")),
    Case("missing-class-folder", "data", b_missing_class_folder,
         ("{root}/data/train", "missing class folder", "hem/", "found: all")),
    Case("empty-class-folder", "data", b_empty_class_folder,
         ("{root}/data/train/hem", "class folder has no images", ".bmp")),
    Case("zero-byte-file", "data", b_zero_byte_file,
         ("{root}/" + ALL_DIR + "/UID_101_50_1_all.bmp", "empty file (0 bytes)",
          "data.max_bad_fraction = 0.0", "1 of 121")),
    Case("truncated-image", "data", b_truncated_image,
         ("{root}/" + ALL_DIR + "/UID_102_52_1_all.bmp", "truncated BMP",
          "data.max_bad_fraction = 0.0")),
    Case("non-image-with-image-extension", "data", b_not_an_image,
         ("{root}/" + ALL_DIR + "/UID_101_51_1_all.png", "not an image",
          "data.max_bad_fraction = 0.0")),
    Case("bad-files-below-max-bad-fraction-accepted", "data", b_bad_files_below_fraction, code=0,
         check=c_bad_files_below_fraction),
    Case("gray-rgba-16bit-accepted", "data", b_gray_rgba_16bit, code=0, check=c_gray_rgba_16bit),
    Case("one-class-only", "data", b_one_class_only,
         ("{root}/data", "all of one class (ALL only", "both ALL and HEM",
          "{root}/data/train/hem/UID_H1_1_1_hem.bmp")),
    Case("fewer-subjects-than-folds", "data", b_fewer_subjects_than_folds,
         ("data.folds = 7", "ALL has 6 and HEM has 6", "lower data.folds")),
    Case("folds-below-2", "data", b_folds_below_2,
         ("data.folds = 1", "out of range", "[2, 20]")),
    Case("labels-csv-missing-columns", "data", b_csv_missing_columns,
         ("{root}/data/validation_data/" + CSV_NAME, "lacks column(s) labels",
          "Patient_ID, new_names, labels")),
    Case("labels-csv-missing-files", "data", b_csv_missing_files,
         ("{root}/data/validation_data/" + CSV_NAME, "1 row(s) point at files missing", "7.bmp")),
    Case("labels-csv-dotdot-path", "data", b_csv_dotdot_path,
         ("{root}/data/validation_data/" + CSV_NAME, "outside the data folder",
          "'../../../secret.bmp'")),
    Case("labels-csv-absolute-path", "data", b_csv_absolute_path,
         ("{root}/data/validation_data/" + CSV_NAME, "outside the data folder",
          "'{root}/secret.bmp'")),
    # --- config (python -m leuk_ray.train --smoke-test; the earlier run in --out stays as it was)
    Case("malformed-yaml", "train", b_malformed_yaml,
         ("{root}/my.yaml", "malformed YAML at line", "column")),
    Case("unknown-config-key", "train", b_unknown_config_key,
         ("{root}/my.yaml", "unknown key 'train.learning_rate'", "lr")),
    Case("negative-lr", "train", b_negative_lr,
         ("--set train.lr=-0.001", "train.lr = -0.001", "out of range", "(0.0, 10.0]")),
    Case("dropout-ge-1", "train", b_dropout_ge_1,
         ("--set model.dropout=1.0", "model.dropout = 1.0", "out of range", "[0.0, 1.0)")),
    Case("train-bad-files-over-max-bad-fraction", "train", b_train_bad_files_over_fraction,
         ("{root}/" + ALL_DIR + "/UID_101_50_1_all.bmp", "empty file",
          "data.max_bad_fraction = 0.0")),
    # --- search (python -m leuk_ray.search --smoke-test): must fail before Ray starts
    Case("search-space-low-ge-high", "search", b_space_low_ge_high,
         ("{root}/space.yaml", "params.train.lr", "low (0.001) must be less than high (0.001)")),
    Case("search-missing-data-dir", "search", b_search_missing_data_dir,
         ("{root}/no_such_data", "data folder not found")),
    # --- predict (python -m leuk_ray.predict)
    Case("artifact-wrong-checksum", "predict", b_artifact_wrong_checksum,
         ("{root}/ensemble", "fold_0.pt", "checksum mismatch", "rerun leuk_ray.final")),
    Case("predict-empty-folder", "predict", b_predict_empty_folder,
         ("{root}/cells", "no image files found", ".bmp")),
    # --- issue 14: search spaces, --num-samples, final's output, predict --model
    Case("search-space-unsearchable-key", "search", b_space_unsearchable_key,
         ("{root}/space.yaml", "params.data.image_size cannot be searched",
          "searchable keys: model.head")),
    Case("search-num-samples-zero", "search", b_search_num_samples_zero,
         ("--num-samples 0", "positive number of trials")),
    Case("final-existing-artifact", "final", b_final_existing_artifact,
         ("{root}/results/s1/ensemble", "already holds an ensemble artifact", "--overwrite")),
    Case("predict-search-dir", "predict", b_predict_search_dir,
         ("{root}/results/s1", "search directory", "--model {root}/results/s1/ensemble")),
]


@dataclass
class _Prepared:
    root: Path
    argv: list[str]
    before: dict[str, str]
    ray_tmp: Path
    result: Future


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, _Prepared]:
    """Build every selected case and start its command, two at a time, slowest first.

    Each command costs 2-8 s, mostly imports (torch, Ray); running two at once keeps the catalogue
    well under 90 s on two cores. Each test then waits for its own case and checks it.
    """
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "originalname", "") == "test_bad_input"
                and hasattr(item, "callspec")}
    order = {"search": 0, "train": 1, "predict": 2}
    pool = ThreadPoolExecutor(max_workers=2)
    request.addfinalizer(lambda: pool.shutdown(wait=True, cancel_futures=True))
    kit = Kit(request)
    out: dict[str, _Prepared] = {}
    cases = [c for c in CASES if c.id in selected]
    for case in sorted(cases, key=lambda c: order.get(c.cmd, 9)):
        base = tmp_path_factory.mktemp(case.id)
        root = (base / "case").resolve()
        (root / "cwd").mkdir(parents=True)  # the command's working directory
        argv = [f"leuk_ray.{case.cmd}", *case.build(root, kit)]
        before = _snapshot(root)
        ray_tmp = base / "ray_tmp"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(OMP_NUM_THREADS="1", LEUK_RAY_CACHE_DIR=str(base / "hash_cache"),
                   RAY_TMPDIR=str(ray_tmp),
                   # a cluster reachable nowhere: a command that wrongly gets as far as ray.init
                   # fails there instead of starting a local Ray
                   RAY_ADDRESS="127.0.0.1:9")
        out[case.id] = _Prepared(root, argv, before, ray_tmp, pool.submit(_run, argv, root / "cwd",
                                                                          env))
    return out


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input(case: Case, runs: dict[str, _Prepared]) -> None:
    p = runs[case.id]
    root, r = p.root, p.result.result()
    shown = (f"\n$ python -m {' '.join(p.argv)}\nexit {r.returncode}\nstdout:\n{r.stdout}\n"
             f"stderr:\n{r.stderr}")

    assert "Traceback" not in r.stderr + r.stdout, shown
    assert r.returncode == case.code, shown
    assert not p.ray_tmp.exists() and "Ray:" not in r.stdout, "Ray was started" + shown
    assert not re.search(r"^(training \d|fold \d+: \d+ training)", r.stdout, re.M), \
        "training started" + shown
    if case.code == 2:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), shown
        for w in (w.replace("{root}", str(root)) for w in case.words):
            assert w in lines[0], f"missing {w!r}" + shown
    if case.check is not None:
        case.check(root, r)
    changes = _diff(p.before, _snapshot(root))
    if changes:
        raise OutputTouched(f"{case.id}: {'; '.join(changes)}" + shown)


def test_catalogue_covers_issue_7() -> None:
    """The README's troubleshooting table lists these ids; keep the table in step."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    for needed in ("missing-data-dir", "unknown-layout", "missing-class-folder",
                   "empty-class-folder", "zero-byte-file", "truncated-image",
                   "non-image-with-image-extension", "gray-rgba-16bit-accepted", "one-class-only",
                   "fewer-subjects-than-folds", "labels-csv-missing-columns",
                   "labels-csv-missing-files", "labels-csv-dotdot-path", "malformed-yaml",
                   "unknown-config-key", "negative-lr", "dropout-ge-1", "folds-below-2",
                   "search-space-low-ge-high", "artifact-wrong-checksum", "predict-empty-folder"):
        assert needed in ids


# ------------------------------------------------------------------------------------- security
def _sources() -> list[tuple[Path, ast.Module]]:
    files = sorted(PKG.rglob("*.py"))
    assert files, PKG
    return [(p, ast.parse(p.read_text(), filename=str(p))) for p in files]


def _dotted(node: ast.AST) -> str:
    """``torch.serialization.load`` for a call's func expression; '' when not a name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def test_every_torch_load_passes_weights_only_true() -> None:
    found = []
    for path, tree in _sources():
        aliases = {"torch.load", "torch.serialization.load"}
        for node in ast.walk(tree):  # `import torch as t`, `from torch import load as l`
            if isinstance(node, ast.Import):
                aliases |= {f"{a.asname}.load" for a in node.names
                            if a.name == "torch" and a.asname}
            elif isinstance(node, ast.ImportFrom) and \
                    node.module in ("torch", "torch.serialization"):
                aliases |= {a.asname or a.name for a in node.names if a.name == "load"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted(node.func) in aliases:
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                found.append(where)
                kw = {k.arg: k.value for k in node.keywords}
                assert None not in kw, f"{where}: torch.load with **kwargs cannot be checked"
                v = kw.get("weights_only")
                assert isinstance(v, ast.Constant) and v.value is True, \
                    f"{where}: torch.load must pass weights_only=True"
    assert found, "no torch.load found: the scan is broken"  # engine, artifact, model load today


PUBLIC = ("0.0.0.0", "::")


def _docstrings(tree: ast.Module) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def test_nothing_binds_a_public_address() -> None:
    local_inits = []
    for path, tree in _sources():
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docs:
                assert "0.0.0.0" not in node.value, f"{path}:{node.lineno}: {node.value!r}"
            if isinstance(node, ast.keyword) and node.arg and "host" in node.arg:
                assert not (isinstance(node.value, ast.Constant) and node.value.value in PUBLIC), \
                    f"{path}:{node.value.lineno}: {node.arg}={node.value.value!r}"
            if isinstance(node, ast.Call) and _dotted(node.func) == "ray.init":
                kw = {k.arg: k.value for k in node.keywords}
                if "address" in kw:  # joins an existing cluster: starts nothing
                    continue
                host = kw.get("dashboard_host")
                assert isinstance(host, ast.Constant) and host.value == "127.0.0.1", \
                    f"{path}:{node.lineno}: a local ray.init must pass dashboard_host='127.0.0.1'"
                local_inits.append(path.name)
    assert "cluster.py" in local_inits  # the local Ray of leuk_ray.cluster.connect

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())  # comments may say "never 0.0.0.0"
    strings: list[str] = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(k), walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str):
            strings.append(x)
    walk(raw)
    assert not [s for s in strings if "0.0.0.0" in s]
    heads = [s for s in strings if "ray start" in s and "--head" in s]
    assert heads and all(re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", s) for s in heads), heads
