"""Leak-free splits: rows are grouped by subject AND content hash (union-find), then split by group.

Two images with identical pixels under different subject ids make those subjects one group, as do
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


def official_assign(df: pd.DataFrame, layout: str, root: str = "", *, grouped: bool = True
                    ) -> tuple[np.ndarray, list[str]]:
    """(validation fold per row from the C-NMC ``training_data/fold_k`` folders, warnings).

    The release puts subjects it links (``KNOWN_LINKED_SUBJECTS``, identical images) in different
    official folds. Each such group (``link_groups``) is kept together in the fold that holds most
    of its images (ties: the lower fold), with one warning per group naming the subjects and folds.
    """
    where = f"{root}: " if root else ""
    if layout != "kaggle":
        raise UserError(f"{where}data.split = official needs the Kaggle C-NMC tree "
                        f"(training_data/fold_0..2); this data is in the {layout} layout: use "
                        "data.split=kfold")
    present = sorted(set(df["split"]))
    if present != ["fold_0", "fold_1", "fold_2"]:
        raise UserError(f"{where}data.split = official needs training_data/fold_0, fold_1 and "
                        f"fold_2; found {', '.join(present)}: use data.split=kfold")
    folds = df["split"].str.slice(5).astype("int64").to_numpy()
    return _keep_groups_together(df, folds, grouped)


def _keep_groups_together(df: pd.DataFrame, folds: np.ndarray, grouped: bool
                          ) -> tuple[np.ndarray, list[str]]:
    groups = link_groups(df, by_subject=grouped)
    by_content = link_groups(df, by_subject=grouped, known_links=False)
    spread = pd.Series(folds).groupby(groups).nunique()
    out, warnings = folds.copy(), []
    members = pd.Series(np.arange(len(df))).groupby(groups).indices
    for g in spread.index[spread > 1]:
        idx = members[g]
        rows = df.iloc[idx]
        keep = int(np.argmax(np.bincount(folds[idx])))
        moved = rows[folds[idx] != keep].assign(fold=folds[idx][folds[idx] != keep])
        out[idx] = keep
        via = []
        if grouped:
            subjects = sorted(set(rows["subject"]) - {""}, key=subject_key)
            if (rows.groupby("hash")["subject"].nunique() > 1).any():
                via.append("identical images")
            if len(np.unique(by_content[idx])) > 1:
                via.append("known C-NMC subject link")
            name = f"subjects {'+'.join(subjects)} ({' and '.join(via)})"
        else:
            name = f"identical images {' == '.join(sorted(rows['path'])[:3])}"
        what = "; ".join(f"{len(m)} image(s) of {s or 'no subject'} from fold_{f}"
                         for (s, f), m in moved.groupby(["subject", "fold"], sort=True))
        span = ", ".join(f"fold_{f}" for f in sorted(set(folds[idx].tolist())))
        warnings.append(f"WARNING: data.split = official: {name} span official folds {span}; "
                        f"kept together in fold_{keep} (moved {what}), so these folds differ "
                        "from the published C-NMC ones")
    return out, warnings


def holdout_assign(df: pd.DataFrame, fractions: list[float], seed: int, *,
                   grouped: bool = True) -> np.ndarray:
    """Part per row: 0 train, 1 val, 2 test; whole groups (``link_groups``), close to ``fractions``.

    The parts minimise, as far as a seeded search finds, the sum over parts of |images - fraction
    x all images| (the realised fractions' absolute deviation), then the same per class
    (stratification: weighted 0.5, so a class may stray where a few large subjects leave no other
    way to meet the fractions), with small squared terms spreading an unavoidable deviation over
    the parts. The search: per-class greedy fills from several seeded random orders, each improved
    by moving or swapping groups between parts while that lowers the cost; the best wins. Every
    part keeps at least one group of each class. ``holdout_warning`` says when a part is far off.
    """
    groups = link_groups(df, by_subject=grouped)
    counts = _class_counts(df, groups)
    if min(counts.values()) < 3:
        raise UserError(f"data.split = holdout needs at least 3 subject groups per class (train, "
                        f"val, test), but ALL has {counts['all']} and HEM has {counts['hem']}: add "
                        "subjects or use data.split=kfold")
    labels = df["label"].to_numpy()
    # A group's class is its majority label (groups of one class in all sane data).
    gsize = np.bincount(groups).astype(float)
    gall = np.bincount(groups, weights=labels == 1)
    glabel = (gall * 2 >= gsize).astype(np.int64)
    part_of_group = _partition(gsize, glabel, np.asarray(fractions, dtype=float),
                               np.random.default_rng(seed))
    return part_of_group[groups]


_CLASS_WEIGHT = 0.5    # per-class deviation, relative to the overall deviation
_SQUARED_WEIGHT = 1e-3  # x deviation^2 / images: ties broken towards an even spread
_CLASS_SQUARED_WEIGHT = 0.5  # x class deviation^2 / images: a class's shortfall spread over parts
_KICKS = 30             # perturbations (a random swap, then the local search) per restart
_MAX_PAIRS = 4_000_000  # swaps between parts with more group pairs are skipped (tiny groups)


def _partition(sizes: np.ndarray, label: np.ndarray, frac: np.ndarray, rng: np.random.Generator,
               restarts: int = 8) -> np.ndarray:
    """Part (0..2) per group (``sizes`` images of class ``label``, 0/1) with a low ``_cost``."""
    best, best_cost = np.zeros(0, dtype=np.int64), np.inf
    for _ in range(restarts if len(sizes) <= 2000 else 1):
        part = np.empty(len(sizes), dtype=np.int64)
        for lab in (0, 1):
            ids = np.flatnonzero(label == lab)
            target, cur = frac * sizes[ids].sum(), np.zeros(3)
            for g in ids[rng.permutation(len(ids))]:  # to the part with the largest shortfall
                part[g] = p = int(np.argmax(target - cur))
                cur[p] += sizes[g]
            for p in range(3):  # an empty part takes the smallest group of the part with the most
                if not (part[ids] == p).any():
                    donor = int(np.argmax(np.bincount(part[ids], minlength=3)))
                    cand = ids[part[ids] == donor]
                    part[cand[np.argmin(sizes[cand])]] = p
        part = _improve(sizes, label, frac, part)
        cost = _cost(sizes, label, frac, part)
        for _ in range(_KICKS if len(sizes) <= 300 else 0):  # iterated local search
            trial = _improve(sizes, label, frac, _kick(part, label, rng))
            trial_cost = _cost(sizes, label, frac, trial)
            if trial_cost < cost - 1e-9:
                part, cost = trial, trial_cost
        if cost < best_cost - 1e-9:
            best, best_cost = part, cost
    return best


def _kick(part: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``part`` with two groups of one class, in different parts, swapped (a random pick)."""
    out = part.copy()
    ids = np.flatnonzero(label == rng.integers(2))
    g = ids[rng.integers(len(ids))]
    others = ids[part[ids] != part[g]]
    if len(others):
        h = others[rng.integers(len(others))]
        out[g], out[h] = part[h], part[g]
    return out


def _cost(sizes: np.ndarray, label: np.ndarray, frac: np.ndarray, part: np.ndarray) -> float:
    """Realised fractions' absolute deviation (in images), then per class; squared ties."""
    n = max(1.0, sizes.sum())
    dev = np.bincount(part, weights=sizes, minlength=3) - frac * sizes.sum()
    cost = np.abs(dev).sum() + _SQUARED_WEIGHT * (dev ** 2).sum() / n
    for lab in (0, 1):
        m = label == lab
        dc = np.bincount(part[m], weights=sizes[m], minlength=3) - frac * sizes[m].sum()
        cost += _CLASS_WEIGHT * np.abs(dc).sum() + _CLASS_SQUARED_WEIGHT * (dc ** 2).sum() / n
    return float(cost)


def _improve(sizes: np.ndarray, label: np.ndarray, frac: np.ndarray, part: np.ndarray
             ) -> np.ndarray:
    """Local search: apply the best single move or pairwise swap of groups between two parts while
    it lowers ``_cost``, never leaving a part without a group of each class."""
    part = part.copy()
    total = sizes.sum()
    target = frac * total
    ctarget = np.array([frac * sizes[label == lab].sum() for lab in (0, 1)])  # [class, part]
    for _ in range(20 * len(sizes) + 100):  # each step lowers the cost; this only bounds the time
        cur = np.bincount(part, weights=sizes, minlength=3)
        ccur = np.array([np.bincount(part[label == lab], weights=sizes[label == lab], minlength=3)
                         for lab in (0, 1)])
        ngroups = np.array([np.bincount(part[label == lab], minlength=3) for lab in (0, 1)])
        members = [np.flatnonzero(part == p) for p in range(3)]
        best, step = -1e-9, None
        for a, b in ((0, 1), (0, 2), (1, 2)):
            ga, gb = members[a], members[b]
            none = ga[:0]
            tries = [(ga, gb)] if len(ga) * len(gb) <= _MAX_PAIRS else [(ga, none), (none, gb)]
            for xa, xb in tries:  # the second form: moves only
                delta = _delta(sizes, label, xa, xb, a, b, cur, ccur, target, ctarget, ngroups,
                               total)
                i, j = np.unravel_index(int(np.argmin(delta)), delta.shape)
                if delta[i, j] < best:
                    best = delta[i, j]
                    step = ((np.append(xa, -1)[i], b), (np.append(xb, -1)[j], a))
        if step is None:
            return part
        for g, p in step:
            if g >= 0:
                part[g] = p
    return part


def _delta(sizes: np.ndarray, label: np.ndarray, ga: np.ndarray, gb: np.ndarray, a: int, b: int,
           cur: np.ndarray, ccur: np.ndarray, target: np.ndarray, ctarget: np.ndarray,
           ngroups: np.ndarray, total: float) -> np.ndarray:
    """Change of ``_cost`` when group ga[i] goes a -> b and gb[j] goes b -> a, for every (i, j);
    the last row and column stand for "no group" (plain moves). Forbidden exchanges are +inf."""
    sa, sb = np.append(sizes[ga], 0.0), np.append(sizes[gb], 0.0)
    la, lb = np.append(label[ga], -1), np.append(label[gb], -1)
    d = sa[:, None] - sb[None, :]  # what a gives b

    def change(now: np.ndarray, goal: np.ndarray, give: np.ndarray, weight: float,
               squared: bool = False) -> np.ndarray:
        new_a, new_b = now[a] - give - goal[a], now[b] + give - goal[b]
        old_a, old_b = now[a] - goal[a], now[b] - goal[b]
        if squared:
            return weight * (new_a ** 2 + new_b ** 2 - old_a ** 2 - old_b ** 2)
        return weight * (np.abs(new_a) + np.abs(new_b) - abs(old_a) - abs(old_b))

    delta = change(cur, target, d, 1.0) + change(cur, target, d, _SQUARED_WEIGHT / max(1.0, total),
                                                 squared=True)
    ok = np.ones(d.shape, dtype=bool)
    for lab in (0, 1):
        give = (sa * (la == lab))[:, None] - (sb * (lb == lab))[None, :]
        delta = delta + change(ccur[lab], ctarget[lab], give, _CLASS_WEIGHT) \
            + change(ccur[lab], ctarget[lab], give, _CLASS_SQUARED_WEIGHT / max(1.0, total),
                     squared=True)
        # a part may not lose its last group of a class
        loses_a = (la == lab)[:, None] & (lb != lab)[None, :]
        loses_b = (lb == lab)[None, :] & (la != lab)[:, None]
        ok &= ~(loses_a & (ngroups[lab, a] < 2)) & ~(loses_b & (ngroups[lab, b] < 2))
    return np.where(ok, delta, np.inf)


HOLDOUT_TOLERANCE = 0.05


def holdout_warning(part: np.ndarray, fractions: list[float], grouped: bool = True) -> str | None:
    """A warning when a part's share of the images (0 train, 1 val, 2 test) is more than
    ``HOLDOUT_TOLERANCE`` off its target fraction; None when all are close."""
    n = np.bincount(part, minlength=3)
    got = n / max(1, n.sum())
    off = [name for name, g, t in zip(("train", "val", "test"), got, fractions)
           if abs(g - t) > HOLDOUT_TOLERANCE + 1e-12]
    if not off:
        return None
    unit = "subject groups" if grouped else "identical images"
    return (f"WARNING: data.holdout = {'/'.join(f'{f:.2f}' for f in fractions)} realised "
            f"{'/'.join(f'{g:.2f}' for g in got)} (train/val/test: {n[0]}/{n[1]}/{n[2]} images): "
            f"{' and '.join(off)} more than {HOLDOUT_TOLERANCE * 100:.0f} points off, because "
            f"whole {unit} stay on one side and a few are large; add subjects, change "
            "data.holdout or use data.split=kfold")


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
