"""What a data folder holds and how it would be split: counts, folds, duplicate groups, leaks."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd

from leuk_ray.config import DataConfig
from leuk_ray.data.index import build_index
from leuk_ray.data.prepare import PreparedData, fold_frames, split_frames
from leuk_ray.data.splits import CLASS_NAMES, find_leaks, link_groups
from leuk_ray.data.subjects import subject_key


def _counts(df: pd.DataFrame) -> dict[str, int]:
    return {CLASS_NAMES[lab]: int((df["label"] == lab).sum()) for lab in (1, 0)}


def duplicate_groups(df: pd.DataFrame) -> list[dict]:
    """Groups of rows linked across subjects (identical contents or known C-NMC subject links),
    and identical contents repeated without a subject id to tell them apart."""
    groups = link_groups(df)
    by_content = link_groups(df, known_links=False)
    dup_hash = df["hash"].duplicated(keep=False).to_numpy()
    n_subj = df["subject"].replace("", np.nan).groupby(groups).nunique()
    wanted = set(np.unique(groups[dup_hash]).tolist()) | set(n_subj.index[n_subj > 1].tolist())
    out = []
    for g, idx in df.groupby(groups).indices.items():
        if g not in wanted:
            continue
        rows = df.iloc[idx]
        subjects = sorted(set(rows["subject"]) - {""}, key=subject_key)
        dup = rows[rows["hash"].duplicated(keep=False)]
        via = ["identical content"] if len(dup) else []
        if len(np.unique(by_content[idx])) > 1:
            via.append("known C-NMC subject link")
        out.append({"subjects": subjects, "n_images": len(rows),
                    "n_duplicated_contents": int(dup["hash"].nunique()),
                    "via": via, "examples": sorted(dup["path"])[:4]})
    return sorted(out, key=lambda d: (-d["n_images"], d["subjects"]))


def fold_summary(p: PreparedData) -> list[dict]:
    out = []
    for f in range(p.n_folds):
        tr, va = fold_frames(p, f)
        out.append({"fold": f, "val_subjects": sorted(set(va["subject"]) - {""}, key=subject_key),
                    "n_val": len(va), "n_train": len(tr), "val_counts": _counts(va),
                    "train_counts": _counts(tr)})
    return out


def leak_list(p: PreparedData) -> list[dict]:
    """Every subject, linked subject pair or content on both sides of a fold or of CV vs test."""
    pairs = [(f"fold {f}", *fold_frames(p, f)) for f in range(p.n_folds)]
    if p.test is not None:
        pairs.append(("test vs cv", p.train, p.test))
    out = []
    for what, a, b in pairs:
        leaks = find_leaks(a, b)
        for s in leaks["subjects"]:
            out.append({"where": what, "kind": "subject", "subject": s})
        for s in leaks["linked"]:
            out.append({"where": what, "kind": "linked_subjects", "subject": s})
        for h, x, y in leaks["hashes"]:
            out.append({"where": what, "kind": "content", "hash": h, "paths": [x, y]})
    return out


def audit(dcfg: DataConfig) -> dict:
    """The audit report of ``dcfg.root`` as a JSON-ready dict (leaks listed, not raised)."""
    ix = build_index(dcfg.root, max_bad_fraction=dcfg.max_bad_fraction)
    p = split_frames(ix, dcfg)
    everything = pd.concat([p.train, p.test] if p.test is not None else [p.train],
                           ignore_index=True)
    per_subject = (everything.groupby(["split", "label", "subject"]).size()
                   .reset_index(name="n"))
    per_subject = per_subject.iloc[sorted(range(len(per_subject)), key=lambda i: (
        per_subject["split"].iat[i], -per_subject["label"].iat[i],
        subject_key(per_subject["subject"].iat[i])))]
    return {
        "root": p.root, "layout": p.layout, "split": dcfg.split, "seed": dcfg.seed,
        "images": len(ix.df), "counts": _counts(ix.df),
        "unlabelled": int((ix.df["label"] < 0).sum()),
        "cv_images": len(p.train), "test_images": 0 if p.test is None else len(p.test),
        "subjects": int(everything.loc[everything["subject"] != "", "subject"].nunique()),
        "grouped_by_subject": p.grouped_by_subject,
        "per_subject": [{"split": r.split, "class": CLASS_NAMES[r.label], "subject": r.subject,
                         "n": int(r.n)} for r in per_subject.itertuples()],
        "folds": fold_summary(p),
        "duplicate_groups": duplicate_groups(everything),
        "leaks": leak_list(p),
        "bad_files": [{"path": a, "reason": r} for a, r in ix.bad_files],
        "warnings": p.warnings,
    }


def format_report(r: dict) -> str:
    """The audit report as text."""
    lines = [f"{r['root']}: {r['layout']} layout, {r['images']} images "
             f"(ALL {r['counts']['all']}, HEM {r['counts']['hem']}"
             f"{', unlabelled %d' % r['unlabelled'] if r['unlabelled'] else ''}), "
             f"{r['subjects']} subjects; CV {r['cv_images']}, test {r['test_images']}"]
    lines.append("\nimages per subject:")
    by = defaultdict(list)
    for row in r["per_subject"]:
        by[(row["split"], row["class"])].append(f"{row['subject'] or '?'}:{row['n']}")
    for (split, cls), items in sorted(by.items()):
        lines.append(f"  {split:>12} {cls}: {len(items)} subjects  {' '.join(items)}")
    lines.append(f"\nfolds ({r['split']}, seed {r['seed']}):")
    for f in r["folds"]:
        c = f["val_counts"]
        lines.append(f"  fold {f['fold']}: val {f['n_val']} (ALL {c['all']}, HEM {c['hem']}), "
                     f"train {f['n_train']}; val subjects: {' '.join(f['val_subjects']) or '-'}")
    lines.append(f"\nduplicate groups: {len(r['duplicate_groups']) or 'none'}")
    for d in r["duplicate_groups"]:
        lines.append(f"  {'+'.join(d['subjects']) or '(no subject)'}: {d['n_images']} images, "
                     f"{d['n_duplicated_contents']} duplicated contents ({', '.join(d['via'])})")
    lines.append(f"\nleaks: {len(r['leaks']) or 'none'}")
    for leak in r["leaks"][:20]:
        what = leak.get("subject") or " == ".join(leak["paths"])
        lines.append(f"  {leak['where']}: {leak['kind']} {what}")
    if r["warnings"]:
        lines.append("\nwarnings:")
        lines += [f"  {w}" for w in r["warnings"]]
    return "\n".join(lines)
