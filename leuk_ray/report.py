"""The evaluation report: four PNG plots and a short report.md that shows them with the key numbers.

    write_report(artifact_dir / "report", title="...", metrics=test_metrics, y_true=y,
                 prob_all=p, threshold=thr, fold_scores=scores, subjects=subj,
                 comparison={"fold 0": m0, "ensemble": m, "ensemble + TTA": m_tta},
                 calibration={"plain": cal.to_dict(), "tta": None}, model=model_info,
                 ci=bootstrap_ci(...), columns={"out-of-fold": oof_metrics})

``metrics``, ``ci`` and ``columns`` come from ``leuk_ray.metrics`` (computed by the caller: this
module only draws and tabulates; the reliability diagram uses ``metrics.reliability_bins``, the
binning of the ECE). Rows labelled -1 are left out. A test set with one class has no
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

from leuk_ray.metrics import expected_calibration_error, labelled, reliability_bins  # noqa: E402

CLASS_NAMES = ("hem", "all")
PLOTS = ("roc.png", "confusion.png", "folds.png", "calibration.png")


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


def plot_calibration(path: Path, y: np.ndarray, p: np.ndarray) -> float:
    """Reliability diagram: observed fraction of ALL against mean P(ALL) per bin, and bin counts.

    The bins are ``leuk_ray.metrics.reliability_bins``, the same ones the ECE is computed on; the
    ECE in the title is computed from them here. Returns that ECE."""
    r = reliability_bins(y, p)
    ece = expected_calibration_error(y, p)
    filled = r.count > 0
    width = r.edges[1] - r.edges[0]
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect")
    ax.bar(r.edges[:-1][filled], r.frac_all[filled], width=width, align="edge", color="C0",
           alpha=0.25, edgecolor="C0", label="fraction ALL per bin")
    ax.plot(r.mean_prob[filled], r.frac_all[filled], "o-", color="C0", lw=2,
            label="at the bin's mean P(ALL)")
    ax.set(ylabel="fraction ALL", xlim=(0, 1), ylim=(0, 1),
           title=f"calibration: ECE {_fmt(ece, 3)} ({r.count.size} bins of P(ALL))")
    ax.legend(loc="upper left", fontsize=8)
    axh.bar(r.edges[:-1], r.count, width=width, align="edge", color="grey", edgecolor="white")
    axh.set(xlabel="predicted P(ALL)", ylabel="images", xlim=(0, 1))
    _save(fig, path)
    return ece


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


def _weights_text(w: Any) -> str:
    """The manifest's "weights" entry (``WeightsInfo``: architecture, source, file, sha256)."""
    if not isinstance(w, dict):
        return _fmt(w)
    source = str(w.get("source") or "?")
    if source == "none":
        return "none (random initialisation)"
    text = source + (f", file {w['file']}" if w.get("file") else "")
    if w.get("architecture"):
        text += f", for {w['architecture']}"
    if w.get("sha256"):
        text += f", sha256 {str(w['sha256'])[:12]}"
    return text


def _model_section(model: dict) -> list[str]:
    left = model.get("left_out_undecodable") or 0
    unusable = model.get("unusable_files") or 0
    rows = [
        ("backbone", f"{model.get('backbone', '?')} (head {model.get('head', '?')})"),
        ("starting weights", _weights_text(model.get("weights"))),
        ("image size", f"{model.get('image_size', '?')} px"),
        ("trained on", f"{model.get('train_images', '?')} images of "
                       f"{model.get('train_subjects', '?')} subjects, {model.get('folds', '?')} "
                       f"fold models" + (f" ({left} undecodable image(s) left out)" if left
                                         else "")
                       + (f"; {unusable} unusable file(s) in the data set aside"
                          if unusable else "")),
        ("data", f"{model.get('data', '?')} (split {model.get('split', '?')})"),
        ("smoke test", "YES: a tiny test model, not for use" if model.get("smoke_test")
         else "no"),
        ("leuk-ray version", model.get("leuk_ray_version", "?")),
    ]
    return ["## Model", ""] + _table(["", ""], rows)


def _ci_text(ci: dict | None, key: str) -> str:
    c = (ci or {}).get(key) or {}
    if c.get("low") is None:
        return "n/a"
    return f"{c['low']:.4f} to {c['high']:.4f}"


def write_report(report_dir: str | Path, *, title: str, metrics: dict,
                 y_true: Sequence[int] | np.ndarray, prob_all: Sequence[float] | np.ndarray,
                 threshold: float, fold_scores: Sequence[dict],
                 subjects: Sequence[str] | None = None, comparison: dict[str, dict] | None = None,
                 calibration: dict | None = None, model: dict | None = None,
                 ci: dict | None = None, columns: dict[str, dict] | None = None,
                 main_column: str = "value") -> Path:
    """Write roc.png, confusion.png, folds.png, calibration.png and report.md; returns report.md.

    ``metrics`` (of ``y_true``/``prob_all``) fills the key-numbers column ``main_column``, with
    ``ci`` (``leuk_ray.metrics.bootstrap_ci``) beside it; ``columns`` adds more columns of
    metrics (e.g. with TTA, out-of-fold). ``model`` (final's ``describe_model``) fills the Model
    section; when it says smoke test, the first line says so. ``calibration`` is
    {"plain": {temperatures, threshold}, "tta": ... or None}.
    """
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    if subjects is None:
        (y, p), subj = labelled("write_report", y_true, prob_all), None
    else:
        y, p, subj = labelled("write_report", y_true, prob_all, [str(s) for s in subjects])
    pred = (p >= threshold).astype(np.int64)

    has_roc = plot_roc(out / "roc.png", y, p, metrics.get("auc"))
    cm = plot_confusion(out / "confusion.png", y, p, threshold)
    plot_folds(out / "folds.png", fold_scores)
    plot_calibration(out / "calibration.png", y, p)

    smoke = bool((model or {}).get("smoke_test"))
    first = f"# SMOKE TEST MODEL, not for use: {title}" if smoke else f"# {title}"
    md = [first, ""]
    if model:
        md += _model_section(model) + [""]
    n_subj = len(set(subj) - {""}) if subj is not None else None
    md += [f"{main_column}: {int(y.size)} labelled images ({int((y == 1).sum())} ALL, "
           f"{int((y == 0).sum())} HEM)"
           + (f" of {n_subj} subjects" if n_subj is not None else "") + ".", ""]
    for name, m in (columns or {}).items():
        if m.get("n") is not None and m["n"] != y.size:
            md += [f"{name}: {m['n']} labelled images.", ""]
    md += ["## Key numbers", ""]
    names = [("weighted F1", "f1"), ("accuracy", "accuracy"), ("ROC-AUC", "auc"),
             ("sensitivity (ALL recall)", "sensitivity"),
             ("specificity (HEM recall)", "specificity"),
             ("expected calibration error", "ece")]
    header = ["metric", main_column]
    if ci:
        header.append(f"{int(round(100 * ci.get('level', 0.95)))}% CI (bootstrap over "
                      f"{ci.get('n_subjects')} subjects, {ci.get('n_boot')} resamples)")
    header += list(columns or {})
    rows = []
    for label, key in names:
        row: list[Any] = [label, metrics.get(key)]
        if ci:
            row.append(_ci_text(ci, key) if key != "ece" else "")
        row += [m.get(key) for m in (columns or {}).values()]
        rows.append(row)
    md += _table(header, rows)
    md += ["", f"Decision threshold on P(ALL): {_fmt(float(threshold))}."]
    if ci:
        md += ["", f"Confidence intervals: percentile intervals of {ci.get('n_boot')} bootstrap "
                   f"resamples of the {ci.get('n_subjects')} subjects (all images of a drawn "
                   f"subject, {ci.get('n_images')} images in all; seed {ci.get('seed')})."]
    if columns:
        md += ["", "Out-of-fold: each training image scored by the one fold model that did not "
                   "train on it (temperature-scaled per fold); the test columns score the "
                   "ensemble."]
    if calibration:
        md += ["", "## Calibration", ""]
        md += _calibration_lines(calibration)
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


def _calibration_lines(calibration: dict) -> list[str]:
    lines = ["Each fold model's P(ALL) is temperature-scaled with its own temperature (fitted on "
             "its out-of-fold images), the ensemble's P(ALL) is the mean of the scaled fold "
             "probabilities, and the threshold was chosen on the scaled out-of-fold "
             "probabilities (never on the test set).", ""]
    rows = []
    for kind, label in (("plain", "without TTA"), ("tta", "with TTA")):
        c = calibration.get(kind)
        if c:
            rows.append((label, ", ".join(f"{T:.3f}" for T in c["temperatures"]),
                         float(c["threshold"])))
    return lines + _table(["outputs", "temperature per fold", "threshold"], rows)
