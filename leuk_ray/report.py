"""The evaluation report: four PNG plots and a short report.md that shows them with the key numbers.

    write_report(artifact_dir / "report", title="...", metrics=test_metrics, y_true=y,
                 prob_all=p, threshold=thr, fold_scores=scores, subjects=subj,
                 comparison={"fold 0": m0, "ensemble": m, "ensemble + TTA": m_tta}, temperature=T)

``metrics`` is ``leuk_ray.metrics.classification_metrics`` output (computed by the caller: this
module only draws and tabulates). Rows labelled -1 are left out. A test set with one class has no
ROC curve: roc.png then says so and report.md carries a note.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CLASS_NAMES = ("hem", "all")
PLOTS = ("roc.png", "confusion.png", "folds.png", "calibration.png")
_BINS = 10


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out


def _roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-p, kind="stable")
    ys, ps = y[order], p[order]
    distinct = np.r_[np.nonzero(np.diff(ps))[0], ys.size - 1]  # last index of each score
    tps = np.cumsum(ys)[distinct]
    fps = (distinct + 1) - tps
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


def plot_roc(path: Path, y: np.ndarray, p: np.ndarray, auc: float | None) -> bool:
    """ROC curve; returns False (and draws a note) when it is undefined (one class)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ok = np.unique(y).size == 2
    if ok:
        fpr, tpr = _roc_points(y, p)
        ax.plot(fpr, tpr, lw=2, label=f"ensemble (AUC {_fmt(auc, 3)})")
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "ROC undefined:\nthe test set has one class", ha="center", va="center")
    ax.set(xlabel="false positive rate (HEM called ALL)", ylabel="true positive rate (ALL)",
           xlim=(0, 1), ylim=(0, 1.01), title="ROC")
    _save(fig, path)
    return ok


def plot_confusion(path: Path, y: np.ndarray, p: np.ndarray, threshold: float) -> np.ndarray:
    pred = (p >= threshold).astype(int)
    cm = np.array([[int(((y == t) & (pred == q)).sum()) for q in (0, 1)] for t in (0, 1)])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    for t in (0, 1):
        for q in (0, 1):
            ax.text(q, t, str(cm[t, q]), ha="center", va="center",
                    color="white" if cm[t, q] > cm.max() / 2 else "black", fontsize=14)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES,
           xlabel="predicted", ylabel="true", title=f"confusion (threshold {threshold:.3f})")
    _save(fig, path)
    return cm


def _fold_series(fold_scores: Sequence[dict]) -> dict[str, list[float]]:
    keys: list[str] = []
    for s in fold_scores:
        for k, v in s.items():
            if k not in keys and k != "fold" and isinstance(v, (int, float)) and \
                    not isinstance(v, bool) and k.split("_")[-1] in ("f1", "accuracy", "auc"):
                keys.append(k)
    return {k: [float(s[k]) if isinstance(s.get(k), (int, float)) else math.nan
                for s in fold_scores] for k in keys[:6]}


def plot_folds(path: Path, fold_scores: Sequence[dict]) -> None:
    series = _fold_series(fold_scores)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(fold_scores) + 2), 4))
    x = np.arange(len(fold_scores))
    width = 0.8 / max(1, len(series))
    for j, (k, vals) in enumerate(series.items()):
        bars = ax.bar(x + (j - (len(series) - 1) / 2) * width, vals, width, label=k)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set(xticks=x, xticklabels=[f"fold {s.get('fold', i)}" for i, s in enumerate(fold_scores)],
           ylim=(0, 1.25), ylabel="score", title="per-fold scores")
    if series:
        ax.legend(fontsize=8, loc="upper center", ncol=min(3, len(series)))
    else:
        ax.text(0.5, 0.5, "no per-fold scores", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)


def plot_calibration(path: Path, y: np.ndarray, p: np.ndarray, ece: float | None) -> None:
    """Reliability diagram: mean P(ALL) vs observed fraction of ALL per bin, and bin counts."""
    idx = np.clip((p * _BINS).astype(int), 0, _BINS - 1)
    mids, fracs, counts = [], [], np.bincount(idx, minlength=_BINS)
    for b in range(_BINS):
        m = idx == b
        if m.any():
            mids.append(p[m].mean())
            fracs.append(y[m].mean())
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect")
    ax.plot(mids, fracs, "o-", lw=2, label="ensemble")
    ax.set(ylabel="fraction ALL", ylim=(0, 1), title=f"calibration (ECE {_fmt(ece, 3)})")
    ax.legend(loc="upper left")
    axh.bar((np.arange(_BINS) + 0.5) / _BINS, counts, width=0.9 / _BINS, color="grey")
    axh.set(xlabel="predicted P(ALL)", ylabel="images", xlim=(0, 1))
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_subject(metrics: dict, y: np.ndarray, pred: np.ndarray,
                 subjects: np.ndarray | None) -> list[tuple[str, Any, Any]]:
    acc = dict(metrics.get("per_subject_accuracy") or {})
    counts: dict[str, int] = {}
    if subjects is not None:
        for s in sorted(set(subjects) - {""}):
            m = subjects == s
            counts[s] = int(m.sum())
            acc.setdefault(s, float((pred[m] == y[m]).mean()))
    return [(s, counts.get(s, ""), acc[s]) for s in sorted(acc)]


def write_report(report_dir: str | Path, *, title: str, metrics: dict,
                 y_true: Sequence[int] | np.ndarray, prob_all: Sequence[float] | np.ndarray,
                 threshold: float, fold_scores: Sequence[dict],
                 subjects: Sequence[str] | None = None, comparison: dict[str, dict] | None = None,
                 temperature: float | None = None) -> Path:
    """Write roc.png, confusion.png, folds.png, calibration.png and report.md; returns report.md."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    y_all = np.asarray(y_true, dtype=np.int64).ravel()
    p_all = np.asarray(prob_all, dtype=np.float64).ravel()
    if y_all.shape != p_all.shape:
        raise ValueError(f"write_report: {y_all.size} labels but {p_all.size} probabilities")
    keep = y_all >= 0
    y, p = y_all[keep], p_all[keep]
    subj = np.asarray([str(s) for s in subjects], dtype=object)[keep] if subjects is not None \
        else None
    pred = (p >= threshold).astype(np.int64)

    has_roc = plot_roc(out / "roc.png", y, p, metrics.get("auc"))
    cm = plot_confusion(out / "confusion.png", y, p, threshold)
    plot_folds(out / "folds.png", fold_scores)
    plot_calibration(out / "calibration.png", y, p, metrics.get("ece"))

    md = [f"# {title}", "", f"{int(y.size)} labelled test images "
          f"({int((y == 1).sum())} ALL, {int((y == 0).sum())} HEM).", "", "## Key numbers", ""]
    md += _table(["metric", "value"], [
        ("weighted F1", metrics.get("f1")), ("accuracy", metrics.get("accuracy")),
        ("ROC-AUC", metrics.get("auc")), ("sensitivity (ALL recall)", metrics.get("sensitivity")),
        ("specificity (HEM recall)", metrics.get("specificity")),
        ("expected calibration error", metrics.get("ece")),
        ("decision threshold on P(ALL)", float(threshold)),
        ("temperature", None if temperature is None else float(temperature))])
    md += ["", "## Per class", ""]
    md += _table(["class", "precision", "recall", "F1"], [
        (c, metrics.get(f"precision_{c}"), metrics.get(f"recall_{c}"), metrics.get(f"f1_{c}"))
        for c in ("all", "hem")])
    if comparison:
        md += ["", "## Models compared", ""]
        md += _table(["model", "weighted F1", "accuracy", "AUC", "sensitivity", "specificity",
                      "ECE"], [(name, m.get("f1"), m.get("accuracy"), m.get("auc"),
                                m.get("sensitivity"), m.get("specificity"), m.get("ece"))
                               for name, m in comparison.items()])
    md += ["", "## Plots", ""]
    if not has_roc:
        md += ["Note: the test set holds one class only, so the ROC curve and AUC are undefined.",
               ""]
    md += ["![ROC](roc.png) ![confusion matrix](confusion.png)", "",
           "![per-fold scores](folds.png) ![calibration](calibration.png)", "",
           f"Confusion matrix (rows true, columns predicted; hem, all): {cm.tolist()}."]
    md += ["", "## Folds", ""]
    keys = sorted({k for s in fold_scores for k in s if k != "fold" and k != "file"})
    md += _table(["fold"] + keys, [[s.get("fold", i)] + [s.get(k) for k in keys]
                                   for i, s in enumerate(fold_scores)])
    rows = _per_subject(metrics, y, pred, subj)
    if rows:
        md += ["", "## Per-subject accuracy", ""]
        md += _table(["subject", "images", "accuracy"], rows)
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
