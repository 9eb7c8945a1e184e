"""Leak-free splits: rows are grouped by subject AND content hash (union-find), then split by group.

Two images with identical bytes under different subject ids make those subjects one group, as do
the subject ids the C-NMC release is known to link (``KNOWN_LINKED_SUBJECTS``), so no subject and no
image content can appear on both sides of a split. ``audit_split`` checks that independently.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from leuk_ray.data.subjects import KNOWN_LINKED_SUBJECTS, subject_key
from leuk_ray.errors import UserError

CLASS_NAMES = ("hem", "all")


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def link_groups(df: pd.DataFrame, *, by_subject: bool = True, known_links: bool = True
                ) -> np.ndarray:
    """Group id per row: connected components of shared subject, content hash and known links."""
    uf = _UnionFind(len(df))
    first: dict[tuple[str, str], int] = {}
    subjects = df["subject"].tolist() if by_subject else [""] * len(df)
    for i, (subj, digest) in enumerate(zip(subjects, df["hash"].tolist())):
        keys = [("h", digest)]
        if subj:
            keys.append(("s", _canonical(subj) if known_links else subj))
        for key in keys:
            if key in first:
                uf.union(first[key], i)
            else:
                first[key] = i
    roots = np.array([uf.find(i) for i in range(len(df))], dtype=np.int64)
    _, ids = np.unique(roots, return_inverse=True)
    return ids.astype(np.int64)


def _class_counts(df: pd.DataFrame, groups: np.ndarray) -> dict[str, int]:
    return {CLASS_NAMES[lab]: int(len(np.unique(groups[df["label"].to_numpy() == lab])))
            for lab in (1, 0)}


def kfold_assign(df: pd.DataFrame, k: int, seed: int, *, grouped: bool = True) -> np.ndarray:
    """Validation fold (0..k-1) per row: StratifiedGroupKFold over ``link_groups`` (seeded).

    ``grouped=False`` is the image-level fallback: only identical contents are kept together.
    """
    # imported here: scikit-learn (with scipy) costs ~1.2 s to import, and every Ray process that
    # unpickles a PreparedData imports this module without splitting anything
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    groups = link_groups(df, by_subject=grouped)
    counts = _class_counts(df, groups)
    unit = "subject group(s)" if grouped else "distinct image(s)"
    if min(counts.values()) < k:
        raise UserError(f"data.folds = {k} needs at least {k} {unit} per class, but ALL has "
                        f"{counts['all']} and HEM has {counts['hem']}: lower data.folds to at most "
                        f"{max(2, min(counts.values()))} or add subjects")
    labels = df["label"].to_numpy()
    if not grouped:  # image level: StratifiedKFold over distinct contents, copies follow
        _, first = np.unique(groups, return_index=True)
        fold_of_group = np.full(len(first), -1, dtype=np.int64)
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        for f, (_, val) in enumerate(splitter.split(first, labels[first])):
            fold_of_group[val] = f
        return fold_of_group[groups]
    folds = np.full(len(df), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, val) in enumerate(splitter.split(np.zeros(len(df)), labels, groups)):
        folds[val] = f
    return folds


def official_assign(df: pd.DataFrame, layout: str, root: str = "") -> np.ndarray:
    """Validation fold per row from the C-NMC ``training_data/fold_k`` folders."""
    where = f"{root}: " if root else ""
    if layout != "kaggle":
        raise UserError(f"{where}data.split = official needs the Kaggle C-NMC tree "
                        f"(training_data/fold_0..2); this data is in the {layout} layout: use "
                        "data.split=kfold")
    present = sorted(set(df["split"]))
    if present != ["fold_0", "fold_1", "fold_2"]:
        raise UserError(f"{where}data.split = official needs training_data/fold_0, fold_1 and "
                        f"fold_2; found {', '.join(present)}: use data.split=kfold")
    return df["split"].str.slice(5).astype("int64").to_numpy()


def holdout_assign(df: pd.DataFrame, fractions: list[float], seed: int, *,
                   grouped: bool = True) -> np.ndarray:
    """Part per row: 0 train, 1 val, 2 test; whole groups, per class, close to ``fractions``.

    Groups are visited in a seeded random order; each goes to the part with the largest relative
    shortfall that it still fits in (else the largest shortfall). Every part gets at least one group
    of each class.
    """
    groups = link_groups(df, by_subject=grouped)
    counts = _class_counts(df, groups)
    if min(counts.values()) < 3:
        raise UserError(f"data.split = holdout needs at least 3 subject groups per class (train, "
                        f"val, test), but ALL has {counts['all']} and HEM has {counts['hem']}: add "
                        "subjects or use data.split=kfold")
    rng = np.random.default_rng(seed)
    part_of_group = np.full(groups.max(initial=-1) + 1, -1, dtype=np.int64)
    labels = df["label"].to_numpy()
    frac = np.asarray(fractions, dtype=float)
    # A group's class is its majority label (groups of one class in all sane data).
    gsize = np.bincount(groups)
    gall = np.bincount(groups, weights=labels == 1)
    glabel = (gall * 2 >= gsize).astype(int)
    for lab in (0, 1):
        ids = np.flatnonzero(glabel == lab)
        ids = ids[rng.permutation(len(ids))]
        target = frac * gsize[ids].sum()
        cur = np.zeros(3)
        assign = {}
        for g in ids:
            short = (target - cur) / target
            fits = cur + gsize[g] <= target
            choice = int(np.argmax(np.where(fits, short, -np.inf))) if fits.any() \
                else int(np.argmax(short))
            assign[g] = choice
            cur[choice] += gsize[g]
        for p in (2, 1, 0):  # an empty part takes the smallest group of the fullest part
            if not any(v == p for v in assign.values()):
                donor = int(np.argmax([sum(1 for v in assign.values() if v == q) for q in range(3)]))
                g = min((g for g, v in assign.items() if v == donor), key=lambda g: gsize[g])
                assign[g] = p
        for g, p in assign.items():
            part_of_group[g] = p
    return part_of_group[groups]


def _canonical(subject: str) -> str:
    return next((min(g) for g in KNOWN_LINKED_SUBJECTS if subject in g), subject)


def find_leaks(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, list]:
    """What two frames share: {"subjects": [...], "linked": ["H3~H10", ...] (known C-NMC links),
    "hashes": [(hash, path_in_a, path_in_b), ...]}."""
    sa, sb = set(a["subject"]) - {""}, set(b["subject"]) - {""}
    subj = sorted(sa & sb, key=subject_key)
    cb: dict[str, set[str]] = {}
    for s in sb - sa:
        cb.setdefault(_canonical(s), set()).add(s)
    linked = sorted(f"{s}~{t}" for s in sa - sb for t in cb.get(_canonical(s), ()))
    common = set(a["hash"]) & set(b["hash"])
    pa = a[a["hash"].isin(common)].drop_duplicates("hash").set_index("hash")["path"]
    pb = b[b["hash"].isin(common)].drop_duplicates("hash").set_index("hash")["path"]
    return {"subjects": subj, "linked": linked,
            "hashes": [(h, pa[h], pb[h]) for h in sorted(common)]}


def audit_split(train_df: pd.DataFrame, val_df: pd.DataFrame, what: str) -> None:
    """Raise ``UserError`` naming the offenders when a subject or an image content is on both sides."""
    leaks = find_leaks(train_df, val_df)
    if not any(leaks.values()):
        return
    parts = []
    if leaks["subjects"]:
        s = leaks["subjects"]
        parts.append(f"{len(s)} subject(s) on both sides: {', '.join(s[:10])}"
                     f"{' ...' if len(s) > 10 else ''}")
    if leaks["linked"]:
        s = leaks["linked"]
        parts.append(f"{len(s)} pair(s) of subject ids that the C-NMC release links by identical "
                     f"images on opposite sides: {', '.join(s[:10])}")
    if leaks["hashes"]:
        h = leaks["hashes"]
        parts.append(f"{len(h)} identical image(s) on both sides, e.g. "
                     + "; ".join(f"{x} == {y}" for _, x, y in h[:3]))
    raise UserError(f"{what}: leakage refused: {' and '.join(parts)}; use data.split=kfold (grouped "
                    "by subject and content) or remove the duplicated images")
