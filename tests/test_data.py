"""Data layer: layouts, subjects, bad input, leak-free splits, decoding, datasets, command line."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from leuk_ray.config import DataConfig
from leuk_ray.data import (CellDataset, build_index, fold_datasets, fold_frames, parse_subject,
                           prepare_data, read_image)
from leuk_ray.data.cache import decode_all, decode_dict
from leuk_ray.data.decode import ImageDecodeError
from leuk_ray.data.prepare import sample_images
from leuk_ray.data.splits import audit_split, find_leaks
from leuk_ray.errors import UserError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers
def img(path: Path, seed: int, size: int = 8) -> Path:
    """Write a tiny random (hence unique) BMP/PNG at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)
    return path


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), **kw)


def kaggle_tree(root: Path) -> Path:
    """A miniature Kaggle C-NMC tree: 3 folds x 2 classes x 2 subjects x 3 cells, prelim + CSV,
    and unlabelled testing_data."""
    seed = 0
    for f in range(3):
        for cls, subjects in (("all", [f"{10 * f + 1}", f"{10 * f + 2}"]),
                              ("hem", [f"H{10 * f + 1}", f"H{10 * f + 2}"])):
            for s in subjects:
                for c in range(3):
                    seed += 1
                    img(root / "training_data" / f"fold_{f}" / cls / f"UID_{s}_{c + 1}_1_{cls}.bmp",
                        seed)
    val = root / "validation_data"
    rows = []
    for i, (pid, lab) in enumerate([("UID_60_1_1_all.bmp", 1), ("UID_60_2_1_all.bmp", 1),
                                    ("UID_H60_1_1_hem.bmp", 0), ("UID_h61_1_1_hem.bmp", 0)], 1):
        img(val / "C-NMC_test_prelim_phase_data" / f"{i}.bmp", 1000 + i)
        rows.append({"Patient_ID": pid, "new_names": f"{i}.bmp", "labels": lab})
    pd.DataFrame(rows).to_csv(val / "C-NMC_test_prelim_phase_data_labels.csv", index=False)
    for i in range(1, 4):
        img(root / "testing_data" / "C-NMC_test_final_phase_data" / f"{i}.bmp", 2000 + i)
    return root


def assert_clean(train: pd.DataFrame, val: pd.DataFrame) -> None:
    leaks = find_leaks(train, val)
    assert leaks == {"subjects": [], "linked": [], "hashes": []}, leaks


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leuk_ray.data", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------- subjects
@pytest.mark.parametrize("name, subject", [
    ("UID_11_10_1_all.bmp", "11"), ("UID_H10_43_1_hem.bmp", "H10"), ("UID_h3_1_1_hem.png", "H3"),
    ("/data/train/ALL/UID_5_2_3_ALL.BMP", "5"), ("UID_H22_1_2_hem", "H22"),
    ("1.bmp", None), ("UID_11_10_all.bmp", None), ("cell_11_10_1_all.bmp", None),
    ("UID_X3_1_1_hem.bmp", None),
])
def test_parse_subject(name: str, subject: str | None) -> None:
    assert parse_subject(name) == subject


# ---------------------------------------------------------------------------------------- layouts
def test_seed_layout(synth_root: Path) -> None:
    ix = build_index(synth_root)
    df = ix.df
    assert ix.layout == "seed" and not ix.bad_files
    assert list(df.columns) == ["path", "label", "subject", "split", "hash"]
    assert len(df) == 120 and set(df["split"]) == {"train", "test"}
    assert set(df["label"]) == {0, 1} and (df["subject"] != "").all()
    assert all(Path(p).is_absolute() for p in df["path"])
    assert df["hash"].str.fullmatch(r"[0-9a-f]{32}").all()
    train_subj = set(df.loc[df["split"] == "train", "subject"])
    test_subj = set(df.loc[df["split"] == "test", "subject"])
    assert len(train_subj) == 12 and test_subj and not train_subj & test_subj


def test_class_folders_case_insensitive(tmp_path: Path) -> None:
    for i in range(3):
        img(tmp_path / "train" / "ALL" / f"UID_{i + 1}_1_1_all.png", i)
        img(tmp_path / "train" / "Hem" / f"UID_H{i + 1}_1_1_hem.tif", 10 + i)
    (tmp_path / "train" / "ALL" / "notes.txt").write_text("x")
    ix = build_index(tmp_path)
    assert sorted(ix.df["label"].tolist()) == [0, 0, 0, 1, 1, 1]
    assert any("notes.txt" in w for w in ix.warnings)


def test_kaggle_layout_and_official_folds(tmp_path: Path) -> None:
    root = kaggle_tree(tmp_path / "kaggle")
    ix = build_index(root)
    assert ix.layout == "kaggle"
    counts = ix.df["split"].value_counts().to_dict()
    assert counts == {"fold_0": 12, "fold_1": 12, "fold_2": 12, "prelim": 4, "testing": 3}
    prelim = ix.df[ix.df["split"] == "prelim"].sort_values("path")
    assert prelim["subject"].tolist() == ["60", "60", "H60", "H61"]  # from Patient_ID, h61 -> H61
    assert prelim["label"].tolist() == [1, 1, 0, 0]
    assert (ix.df.loc[ix.df["split"] == "testing", "label"] == -1).all()

    p = prepare_data(cfg(root, split="official", folds=3))
    assert p.layout == "kaggle" and p.n_folds == 3 and len(p.train) == 36
    assert (p.train["fold"] == p.train["split"].str[-1].astype(int)).all()
    assert p.test is not None and sorted(p.test["split"].unique()) == ["prelim"]
    for f in range(3):
        tr, va = fold_frames(p, f)
        assert set(va["split"]) == {f"fold_{f}"} and len(tr) == 24
        assert_clean(tr, va)


def test_kaggle_zip_parent_folder(tmp_path: Path) -> None:
    kaggle_tree(tmp_path / "C-NMC_Leukemia")
    ix = build_index(tmp_path)
    assert ix.layout == "kaggle" and len(ix.df) == 43


def test_official_needs_kaggle(synth_root: Path) -> None:
    with pytest.raises(UserError, match="official.*seed layout") as e:
        prepare_data(cfg(synth_root, split="official"))
    assert str(synth_root) in str(e.value)


def linked_kaggle_tree(root: Path) -> Path:
    """``kaggle_tree`` plus subjects that the C-NMC release links, in different official folds
    (51 in fold_0 with 3 cells, 78 in fold_2 with 1; H2 in fold_0 with 3, H4 in fold_1, H6 in
    fold_2; H3 in fold_1 with 3, H10 in fold_2), and subject 29 in fold_2 whose one image is a
    copy of one of subject 12's (fold_1)."""
    kaggle_tree(root)
    tr = root / "training_data"
    for i, (fold, cls, subject, n) in enumerate([
            (0, "all", "51", 3), (2, "all", "78", 1), (1, "hem", "H4", 1), (2, "hem", "H6", 1),
            (1, "hem", "H3", 3), (2, "hem", "H10", 1)]):
        for c in range(n):
            img(tr / f"fold_{fold}" / cls / f"UID_{subject}_{c + 1}_1_{cls}.bmp", 500 + 10 * i + c)
    src = tr / "fold_1" / "all" / "UID_12_1_1_all.bmp"
    (tr / "fold_2" / "all" / "UID_29_1_1_all.bmp").write_bytes(src.read_bytes())
    return root


def test_official_keeps_linked_subjects_together(tmp_path: Path) -> None:
    root = linked_kaggle_tree(tmp_path / "kaggle")
    d = cfg(root, split="official", folds=3)
    p = prepare_data(d)  # refused before: the links span official folds
    fold = p.train.groupby("subject")["fold"].agg(set)
    for group, where in ((("51", "78"), 0), (("H2", "H4", "H6"), 0), (("H3", "H10"), 1),
                         (("12", "29"), 1)):
        assert all(fold[s] == {where} for s in group), (group, fold[list(group)])
    unlinked = p.train[~p.train["subject"].isin(["78", "H4", "H6", "H10", "29"])]
    assert (unlinked["fold"] == unlinked["split"].str[-1].astype(int)).all()  # the rest stays
    moved = [w for w in p.warnings if w.startswith("WARNING: data.split = official")]
    assert len(moved) == 4, p.warnings
    w51 = next(w for w in moved if "51" in w)
    assert all(s in w51 for s in ("78", "fold_0", "fold_2", "known C-NMC subject link"))
    w12 = next(w for w in moved if "29" in w)
    assert all(s in w12 for s in ("12", "fold_1", "fold_2", "identical image"))
    for f in range(3):
        assert_clean(*fold_frames(p, f))
    from leuk_ray.data.audit import audit
    report = audit(d)  # what `audit` prints and each run writes to warnings.txt
    assert report["leaks"] == [] and set(moved) <= set(report["warnings"])


# ------------------------------------------------------------------------------- splits, leakage
def test_real_sample_folds_are_leak_free(cnmc_root: Path) -> None:
    p = prepare_data(cfg(cnmc_root, folds=3, seed=42))
    assert p.layout == "seed" and p.grouped_by_subject and len(p.train) == 1200
    assert p.test is not None and len(p.test) == 53
    assert sorted(p.train["fold"].unique()) == [0, 1, 2]
    fold_of = p.train.groupby("subject")["fold"].agg(set)
    assert (fold_of.map(len) == 1).all()  # every subject in exactly one fold
    for linked in ({"H10", "H3"}, {"51", "78"}, {"H2", "H4", "H5", "H6"}):  # SOURCES.md groups
        assert len({next(iter(fold_of[s])) for s in linked}) == 1, linked
    for f in range(3):
        tr, va = fold_frames(p, f)
        assert set(va["label"]) == {0, 1}
        assert_clean(tr, va)
    assert_clean(p.train, p.test)


def test_cross_subject_duplicates_stay_together(synth_root: Path) -> None:
    train = synth_root / "train"
    src = sorted((train / "all").glob("UID_101_*"))[0]
    (train / "all" / "UID_102_90_1_all.bmp").write_bytes(src.read_bytes())
    src = sorted((train / "hem").glob("UID_H101_*"))[0]
    (train / "hem" / "UID_H103_90_1_hem.bmp").write_bytes(src.read_bytes())
    for seed in (0, 1, 2, 3):
        p = prepare_data(cfg(synth_root, folds=3, seed=seed))
        fold = p.train.groupby("subject")["fold"].first()
        assert fold["101"] == fold["102"] and fold["H101"] == fold["H103"]
        for f in range(3):
            assert_clean(*fold_frames(p, f))
    from leuk_ray.data.audit import duplicate_groups
    groups = {tuple(g["subjects"]) for g in duplicate_groups(p.train)}
    assert {("101", "102"), ("H101", "H103")} <= groups


def png_with_text_chunk(png: bytes, text: bytes) -> bytes:
    """``png`` with a tEXt chunk after IHDR: other bytes, the same pixels."""
    body = b"tEXt" + b"Comment\0" + text
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return png[:33] + chunk + png[33:]  # 8-byte signature + 25-byte IHDR chunk


def test_duplicates_found_by_pixels_not_bytes(synth_root: Path) -> None:
    """One BMP saved again as PNG (two compression levels) and as a PNG with a text chunk, under
    three other subjects, is found as one content: byte hashes saw four different files."""
    train = synth_root / "train" / "all"
    src = sorted(train.glob("UID_101_*.bmp"))[0]
    pixels = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    for subject, level in ((102, 0), (103, 3)):
        assert cv2.imwrite(str(train / f"UID_{subject}_90_1_all.png"), pixels,
                           [cv2.IMWRITE_PNG_COMPRESSION, level])
    ok, png = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    tagged = train / "UID_104_90_1_all.png"
    tagged.write_bytes(png_with_text_chunk(png.tobytes(), b"re-saved by a viewer"))
    copies = [src, train / "UID_102_90_1_all.png", train / "UID_103_90_1_all.png", tagged]
    assert len({c.read_bytes() for c in copies}) == 4
    assert all(np.array_equal(read_image(c), read_image(src)) for c in copies)
    df = build_index(synth_root).df.set_index("path")
    assert len({df.loc[str(c), "hash"] for c in copies}) == 1
    from leuk_ray.data.audit import duplicate_groups
    groups = {tuple(g["subjects"]) for g in duplicate_groups(df.reset_index())}
    assert ("101", "102", "103", "104") in groups
    p = prepare_data(cfg(synth_root, folds=3, seed=0))
    assert p.train[p.train["subject"].isin(["101", "102", "103", "104"])]["fold"].nunique() == 1


def test_audit_split_names_offenders(synth_root: Path) -> None:
    df = build_index(synth_root).df
    a, b = df.iloc[::2], df.iloc[1::2]  # every subject on both sides
    with pytest.raises(UserError, match=r"fold 9: leakage refused: \d+ subject\(s\) .*101"):
        audit_split(a, b, "fold 9")
    dup = df.iloc[[0]].assign(subject="999")
    with pytest.raises(UserError, match="identical image") as e:
        audit_split(df.iloc[[0]].assign(subject="998"), dup, "test vs train")
    assert df["path"].iloc[0] in str(e.value)


def test_test_subject_in_training_is_refused(synth_root: Path) -> None:
    img(synth_root / "test" / "all" / "UID_101_99_1_all.bmp", 77, size=48)
    with pytest.raises(UserError, match="test set.*subject.*101"):
        prepare_data(cfg(synth_root))


def test_folds_are_deterministic(synth_root: Path) -> None:
    a = prepare_data(cfg(synth_root, folds=3, seed=7)).train
    b = prepare_data(cfg(synth_root, folds=3, seed=7)).train
    pd.testing.assert_frame_equal(a, b)
    others = [prepare_data(cfg(synth_root, folds=3, seed=s)).train["fold"] for s in range(8, 12)]
    assert any(not o.equals(a["fold"]) for o in others)


def test_holdout(synth_root: Path) -> None:
    p = prepare_data(cfg(synth_root, split="holdout", seed=5))
    assert p.n_folds == 1 and sorted(p.train["fold"].unique()) == [-1, 0]
    tr, va = fold_frames(p, 0)
    test = p.test
    assert test is not None and {"holdout_test", "test"} == set(test["split"])
    carved = test[test["split"] == "holdout_test"]
    for part in (tr, va, carved):
        assert set(part["label"]) == {0, 1}
    n = len(tr) + len(va) + len(carved)
    assert 0.5 < len(tr) / n < 0.85 and len(va) and len(carved)
    assert_clean(tr, va)
    assert_clean(p.train, test)


def _realised(p) -> np.ndarray:
    n = np.array([(p.train["fold"] == -1).sum(), (p.train["fold"] == 0).sum(),
                  (p.test["split"] == "holdout_test").sum()])
    return n / n.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_holdout_fractions_real_sample(cnmc_root: Path, seed: int) -> None:
    p = prepare_data(cfg(cnmc_root, split="holdout", seed=seed))  # seed 0 was 0.53/0.31/0.16
    assert np.abs(_realised(p) - [0.70, 0.15, 0.15]).max() <= 0.05, _realised(p)
    assert not any("data.holdout" in w for w in p.warnings), p.warnings


def test_holdout_assign_minimises_deviation() -> None:
    from leuk_ray.data.splits import holdout_assign
    rng = np.random.default_rng(0)
    rows = []
    for lab, prefix in ((1, ""), (0, "H")):
        for s, n in enumerate(rng.integers(5, 120, 25)):  # 25 subjects per class, 5..119 images
            rows += [(f"{prefix}{s + 1}", lab, f"{prefix}{s}-{i}") for i in range(n)]
    df = pd.DataFrame(rows, columns=["subject", "label", "hash"])
    target = np.array([0.70, 0.15, 0.15])
    parts = {}
    for seed in range(5):
        part = holdout_assign(df, list(target), seed)
        parts[seed] = part
        for lab in (0, 1):  # stratified: each class on its own within 5 points
            got = np.bincount(part[df["label"] == lab], minlength=3)
            assert np.abs(got / got.sum() - target).max() <= 0.05, (seed, lab, got)
        assert (df.assign(part=part).groupby("subject")["part"].nunique() == 1).all()
    assert np.array_equal(holdout_assign(df, list(target), 3), parts[3])  # deterministic by seed
    assert any(not np.array_equal(parts[0], parts[s]) for s in range(1, 5))


def test_holdout_warns_when_a_part_is_off(tmp_path: Path) -> None:
    seed = 0
    for cls, prefix in (("all", ""), ("hem", "H")):  # one big and two small subjects per class
        for s, n in ((1, 20), (2, 2), (3, 2)):
            for c in range(n):
                seed += 1
                img(tmp_path / "train" / cls / f"UID_{prefix}{s}_{c + 1}_1_{cls}.png", seed)
    p = prepare_data(cfg(tmp_path, split="holdout", seed=0))
    (w,) = [w for w in p.warnings if "data.holdout" in w]
    assert w.startswith("WARNING") and "0.83/0.08/0.08" in w and "train" in w, w


def test_image_level_fallback_warns(tmp_path: Path) -> None:
    for i in range(12):
        img(tmp_path / "train" / "all" / f"cell_{i}.png", i)
        img(tmp_path / "train" / "hem" / f"cell_{i}.png", 100 + i)
    p = prepare_data(cfg(tmp_path, folds=3))
    assert not p.grouped_by_subject
    assert any(w.startswith("WARNING") and "no subject id" in w for w in p.warnings)
    assert sorted(p.train["fold"].value_counts().tolist()) == [8, 8, 8]


def test_max_images_keeps_every_subject(synth_root: Path) -> None:
    p = prepare_data(cfg(synth_root, max_images=40, seed=1))
    full = build_index(synth_root).df
    full_train = full[full["split"] == "train"]
    assert len(p.train) == 40
    assert set(p.train["subject"]) == set(full_train["subject"])
    again = sample_images(full_train.reset_index(drop=True), 40, 1)
    assert again["path"].tolist() == p.train["path"].tolist()
    assert abs((p.train["label"] == 1).mean() - 0.5) < 0.1


# ------------------------------------------------------------------------------------- bad input
def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data folder not found.*expected") as e:
        build_index(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match=r"unknown data layout \(found: images\).*train/\{all,hem\}"):
        build_index(tmp_path)


def test_missing_class_folder(tmp_path: Path) -> None:
    img(tmp_path / "train" / "all" / "UID_1_1_1_all.bmp", 0)
    with pytest.raises(UserError, match="missing class folder.*hem") as e:
        build_index(tmp_path)
    assert str(tmp_path / "train") in str(e.value)


def test_empty_class_folder(tmp_path: Path) -> None:
    img(tmp_path / "train" / "all" / "UID_1_1_1_all.bmp", 0)
    (tmp_path / "train" / "hem").mkdir()
    (tmp_path / "train" / "hem" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="class folder has no images") as e:
        build_index(tmp_path)
    assert str(tmp_path / "train" / "hem") in str(e.value)


def test_one_class_only(tmp_path: Path) -> None:
    for i in range(5):
        img(tmp_path / "train" / "all" / f"UID_{i}_1_1_all.bmp", i)
    (tmp_path / "train" / "hem" / "UID_H1_1_1_hem.bmp").parent.mkdir(parents=True)
    (tmp_path / "train" / "hem" / "UID_H1_1_1_hem.bmp").write_bytes(b"")
    with pytest.raises(UserError, match=r"one class \(ALL only") as e:
        prepare_data(cfg(tmp_path, max_bad_fraction=0.5))
    assert str(tmp_path) in str(e.value)


def _corrupt(synth_root: Path) -> list[Path]:
    """A zero-byte file, text behind .png, and a BMP cut short (header intact)."""
    d = synth_root / "train" / "all"
    (d / "UID_101_50_1_all.bmp").write_bytes(b"")
    (d / "UID_101_51_1_all.png").write_text("this is not an image")
    whole = sorted(d.glob("UID_102_*.bmp"))[0].read_bytes()
    (d / "UID_102_52_1_all.bmp").write_bytes(whole[: len(whole) // 2])
    return [d / "UID_101_50_1_all.bmp", d / "UID_101_51_1_all.png", d / "UID_102_52_1_all.bmp"]


def test_bad_files_skipped_and_listed(synth_root: Path) -> None:
    bad = _corrupt(synth_root)
    ix = build_index(synth_root, max_bad_fraction=0.05)
    assert len(ix.df) == 120 and sorted(p for p, _ in ix.bad_files) == sorted(map(str, bad))
    reasons = dict(ix.bad_files)
    assert "empty" in reasons[str(bad[0])] and "not an image" in reasons[str(bad[1])]
    assert "truncated BMP" in reasons[str(bad[2])]
    warning = next(w for w in ix.warnings if "unusable" in w)
    assert "3 of 123" in warning and all(str(b) in warning for b in bad)
    p = prepare_data(cfg(synth_root, max_bad_fraction=0.05))
    assert len(p.train) + len(p.test) == 120 and any("unusable" in w for w in p.warnings)


def test_too_many_bad_files(synth_root: Path) -> None:
    bad = _corrupt(synth_root)
    with pytest.raises(UserError, match="max_bad_fraction") as e:
        build_index(synth_root, max_bad_fraction=0.01)
    assert str(bad[0]) in str(e.value)


def test_fewer_subjects_than_folds(synth_root: Path) -> None:
    with pytest.raises(UserError, match="data.folds = 7.*ALL has 6 and HEM has 6.*lower data.folds"):
        prepare_data(cfg(synth_root, folds=7))


def test_labels_csv_missing_columns(tmp_path: Path) -> None:
    root = kaggle_tree(tmp_path)
    csv = root / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv"
    pd.read_csv(csv).drop(columns="labels").to_csv(csv, index=False)
    with pytest.raises(UserError, match="lacks column.*labels") as e:
        build_index(root)
    assert str(csv) in str(e.value)


def test_labels_csv_missing_files(tmp_path: Path) -> None:
    root = kaggle_tree(tmp_path)
    (root / "validation_data" / "C-NMC_test_prelim_phase_data" / "3.bmp").unlink()
    with pytest.raises(UserError, match=r"1 row\(s\) point at files missing.*3\.bmp") as e:
        build_index(root)
    assert "C-NMC_test_prelim_phase_data_labels.csv" in str(e.value)


@pytest.mark.parametrize("name", ["../../training_data/fold_0/all/UID_1_1_1_all.bmp",
                                  "/etc/passwd"])
def test_labels_csv_paths_escaping_root(tmp_path: Path, name: str) -> None:
    root = kaggle_tree(tmp_path)
    csv = root / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv"
    df = pd.read_csv(csv)
    df.loc[0, "new_names"] = name
    df.to_csv(csv, index=False)
    with pytest.raises(UserError, match="outside the data folder") as e:
        build_index(root)
    assert name in str(e.value) and str(csv) in str(e.value)


# ------------------------------------------------------------------------------------- decoding
def test_decode_converts_gray_rgba_16bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cases = {
        "gray.png": rng.integers(0, 256, (20, 30), dtype=np.uint8),
        "rgba.png": rng.integers(0, 256, (20, 30, 4), dtype=np.uint8),
        "deep.png": rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16),
        "deep_gray.tif": rng.integers(0, 65536, (20, 30), dtype=np.uint16),
        "photo.jpg": rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
    }
    for name, arr in cases.items():
        assert cv2.imwrite(str(tmp_path / name), arr)
        out = read_image(tmp_path / name, 16)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8, name
    assert read_image(tmp_path / "gray.png").shape == (20, 30, 3)
    red_bgr = np.zeros((4, 4, 3), np.uint8)
    red_bgr[..., 2] = 255
    cv2.imwrite(str(tmp_path / "red.bmp"), red_bgr)
    assert read_image(tmp_path / "red.bmp", 4)[0, 0].tolist() == [255, 0, 0]  # RGB order
    deep = read_image(tmp_path / "deep.png")
    assert abs(int(deep.mean()) - 127) < 10  # 16-bit scaled, not clipped


def test_decode_errors_name_the_file(tmp_path: Path) -> None:
    good = img(tmp_path / "good.png", 0, size=32).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    broken = bytearray(good)
    broken[60:100] = b"\x00" * 40  # IDAT damaged, IEND intact
    (tmp_path / "broken.png").write_bytes(bytes(broken))
    for name in ("cut.png", "broken.png", "missing.png"):
        with pytest.raises(ImageDecodeError, match=name):
            read_image(tmp_path / name, 8)
    paths = [str(tmp_path / n) for n in ("good.png", "cut.png", "broken.png")]
    arr, bad = decode_all(paths, 8, threads=2)
    assert arr.shape == (3, 8, 8, 3) and bad == sorted(paths[1:])
    assert arr[0].any() and not arr[1].any()


# ------------------------------------------------------------------------------------- datasets
def test_fold_datasets_and_model_input(synth_root: Path) -> None:
    import torch

    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from leuk_ray.data.transforms import Preprocessing, to_model_input, train_transform

    prep = Preprocessing(32, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    d = cfg(synth_root, image_size=32, folds=3)
    p = prepare_data(d)
    tr, va = fold_datasets(p, 1, d)
    assert isinstance(tr, CellDataset) and len(tr) + len(va) == len(p.train)
    x, y = tr[0]
    assert x.shape == (32, 32, 3) and x.dtype == torch.uint8 and y in (0, 1)
    assert tr.labels.dtype == np.int64 and tr.subjects[0] != ""
    assert set(va.subjects).isdisjoint(tr.subjects)

    paths = p.train["path"].tolist()
    images, bad = decode_dict(paths, 32)
    assert not bad and len(images) == len(paths)
    tr2, va2 = fold_datasets(p, 1, d, images=images, bad=[paths[0]])
    assert len(tr2) + len(va2) == len(p.train) - 1 and any("undecodable" in w for w in p.warnings)
    i = va2.paths.index(va.paths[-1])
    assert torch.equal(va2[i][0], va[len(va) - 1][0])  # cached == decoded on the fly

    batch = torch.stack([va[i][0] for i in range(4)])
    z = to_model_input(batch, "cpu", channels_last=True, prep=prep)
    assert z.dtype == torch.float32 and z.is_contiguous(memory_format=torch.channels_last)
    black = to_model_input(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), "cpu", prep=prep)
    assert torch.allclose(black[0, :, 0, 0], -torch.tensor(IMAGENET_DEFAULT_MEAN) /
                          torch.tensor((0.229, 0.224, 0.225)), atol=1e-5)
    for name in ("seed000", "light", "none"):
        out = train_transform(name, 32, seed=0)(image=read_image(paths[0], 32))["image"]
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_fast_d4_is_albumentations_d4_with_opencv_kernels() -> None:
    """Same pixels for each of the 8 group elements, and the same draws from the same seed."""
    import albumentations as A
    from albumentations.augmentations.geometric import functional as fgeometric

    from leuk_ray.data.transforms import _D4_CV2, FastD4

    rng = np.random.default_rng(0)
    for shape in [(6, 6, 3), (5, 7, 3), (5, 7), (4, 4, 1), (6, 6, 4)]:
        img = rng.integers(0, 256, size=shape, dtype=np.uint8)
        for g in _D4_CV2:
            want = fgeometric.d4(img, g)
            got = FastD4(p=1).apply(img, g)
            assert got.shape == want.shape and np.array_equal(got, want), (shape, g)
    img = rng.integers(0, 256, size=(9, 9, 3), dtype=np.uint8)
    fast, ref = A.Compose([FastD4(p=1)], seed=3), A.Compose([A.D4(p=1)], seed=3)
    outs = [fast(image=img)["image"] for _ in range(40)]
    assert all(np.array_equal(a, ref(image=img)["image"]) for a in outs)
    assert len({a.tobytes() for a in outs}) == 8  # every element of the group is drawn


def test_model_input_is_bhwc_permuted_on_the_device() -> None:
    import torch

    from leuk_ray.data.transforms import Preprocessing, to_model_input

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    prep = Preprocessing(5, mean, std)
    x = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    want = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    nchw = to_model_input(x, "cpu", prep=prep)
    nhwc = to_model_input(x, "cpu", channels_last=True, prep=prep)
    assert nchw.shape == nhwc.shape == (2, 3, 5, 7) and nchw.is_contiguous()
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(nchw, want, atol=1e-5) and torch.equal(nchw, nhwc)
    with pytest.raises(ValueError, match="BHWC"):
        to_model_input(x.permute(0, 3, 1, 2).contiguous(), "cpu", prep=prep)  # CHW is refused
    with pytest.raises(TypeError, match="uint8"):
        to_model_input(x.float(), "cpu", prep=prep)


def test_hash_cache_follows_file_changes(synth_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LEUK_RAY_CACHE_DIR", str(tmp_path / "cache"))
    first = build_index(synth_root).df
    assert len(list((tmp_path / "cache").glob("index-*.json"))) == 1
    a, b = first["path"].iloc[0], first["path"].iloc[1]
    Path(b).write_bytes(Path(a).read_bytes() + b"\0")  # new size and mtime: must be re-hashed
    again = build_index(synth_root).df.set_index("path")["hash"]
    assert again[a] == first["hash"].iloc[0] and again[b] != first["hash"].iloc[1]


def test_synthetic_data_is_learnable(tmp_path: Path) -> None:
    """A three-layer CNN at 64 px separates synthetic ALL from HEM within 10 epochs."""
    import torch
    from torch import nn

    from leuk_ray.data.synth import make_synthetic
    from leuk_ray.data.transforms import resolve_preprocessing, to_model_input

    prep = resolve_preprocessing("efficientnet_b3", 64)
    torch.manual_seed(0)
    d = cfg(make_synthetic(tmp_path / "demo", n=240, size=64, seed=1), image_size=64, folds=3)
    tr, va = fold_datasets(prepare_data(d), 0, d, seed=0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(32, 2))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    loader = torch.utils.data.DataLoader(tr, batch_size=16, shuffle=True)
    xv = to_model_input(torch.stack([va[i][0] for i in range(len(va))]), "cpu", prep=prep)
    best = 0.0
    for _ in range(10):
        for x, y in loader:
            loss = nn.functional.cross_entropy(net(to_model_input(x, "cpu", prep=prep)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            best = max(best, (net(xv).argmax(1).numpy() == va.labels).mean())
    assert best >= 0.8


# ------------------------------------------------------------------------------------ command line
def test_cli_audit_json_real_sample(cnmc_root: Path) -> None:
    r = run_cli("audit", str(cnmc_root), "--folds", "3", "--seed", "42", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == 1253 and report["subjects"] == 46 and report["leaks"] == []
    assert [f["fold"] for f in report["folds"]] == [0, 1, 2]
    assert sum(f["n_val"] for f in report["folds"]) == 1200
    assert all(f["val_subjects"] for f in report["folds"])
    assert {"H10", "H3"} in [set(g["subjects"]) for g in report["duplicate_groups"]]
    assert isinstance(report["warnings"], list)


def test_cli_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    r = run_cli("audit", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(tmp_path / "missing") in lines[0]


def test_cli_synth_and_help(tmp_path: Path) -> None:
    r = run_cli("synth", str(tmp_path / "demo"), "--n", "32", "--size", "24")
    assert r.returncode == 0, r.stderr
    assert str((tmp_path / "demo").resolve()) in r.stdout.strip().splitlines()[-1]
    assert len(build_index(tmp_path / "demo").df) == 32
    h = run_cli("audit", "--help")
    assert h.returncode == 0 and "default: 3" in h.stdout and "--json" in h.stdout


def test_demo_data_is_written_whole_once_and_reused(tmp_path):
    """One --demo data set for train and search: written into a temporary folder and renamed, so
    an interrupted first run leaves nothing a later run would take for the data set."""
    from leuk_ray.data.synth import MARKER, demo_data

    root = demo_data(tmp_path / "demo", seed=3)
    assert (root / MARKER).is_file() and (root / "train").is_dir()
    stamp = (root / MARKER).stat().st_mtime_ns
    assert demo_data(tmp_path / "demo", seed=3) == root
    assert (root / MARKER).stat().st_mtime_ns == stamp          # reused, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary folder left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="mine: exists and is not a demo data set"):
        demo_data(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"   # never deleted
