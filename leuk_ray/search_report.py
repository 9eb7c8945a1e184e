"""``python -m leuk_ray.search_report SEARCH_DIR``: a search's story as ``search_report.md`` + PNGs.

Written at the end of every search (and on demand, also while one runs) from the search's Optuna
study (``study.db`` or ``search.storage``): how the best score evolved, every trial's learning
curve with the pruned ones marked where ASHA stopped them, which parameters mattered (Optuna's
fANOVA importances), score against each parameter, and the best trial against the space's first
point (the seed recipe). Plots are drawn with matplotlib from the study's trials.
"""
from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

from leuk_ray.cli import run_main
from leuk_ray.config import config_from_yaml_with_extras
from leuk_ray.errors import UserError
from leuk_ray.storage import RunFiles, resolve_storage

REPORT = "search_report.md"
PLOTS = ("history.png", "curves.png", "importance.png", "slices.png")


def load_search_study(files: RunFiles) -> tuple[optuna.Study, Any]:
    """The study of the search in ``files`` and the search's config."""
    from leuk_ray.study import STUDY_FILE, open_storage, study_path, study_url

    if not files.pull("config.yaml"):
        raise UserError(f"{files.uri}: not a search directory (no config.yaml)")
    files.pull(STUDY_FILE)
    cfg, _ = config_from_yaml_with_extras(files.local / "config.yaml")
    url = study_url(cfg, files)
    if not cfg.search.storage and not study_path(files).exists():
        raise UserError(f"{files.uri}: no {STUDY_FILE} (the search has not proposed a trial yet, or "
                        "it was made before leuk-ray kept its study)")
    try:
        study = optuna.load_study(study_name=files.name, storage=open_storage(url))
    except KeyError:
        raise UserError(f"{files.uri}: the study database holds no study named '{files.name}'") \
            from None
    return study, cfg


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _score(t: optuna.trial.FrozenTrial) -> float | None:
    v = t.value if t.value is not None else t.user_attrs.get("mean_val_f1")
    return float(v) if v is not None and math.isfinite(v) else None


def plot_history(trials: list, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    best, xs, ys = -math.inf, [], []
    for t in trials:
        s = _score(t)
        if s is None:
            continue
        done = t.state == optuna.trial.TrialState.COMPLETE
        ax.scatter(t.number, s, c="tab:blue" if done else "tab:gray",
                   marker="o" if done else "x", zorder=3)
        if done:
            best = max(best, s)
        if best > -math.inf:
            xs.append(t.number)
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", c="tab:red", label="best completed so far")
    ax.scatter([], [], c="tab:blue", label="completed")
    ax.scatter([], [], c="tab:gray", marker="x", label="pruned (score when stopped)")
    ax.set(xlabel="trial", ylabel="mean-over-folds val F1", title="Optimisation history")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(trials: list, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        iv = sorted(t.intermediate_values.items())
        if not iv:
            continue
        x, y = zip(*iv)
        if t.state == optuna.trial.TrialState.PRUNED:
            ax.plot(x, y, c="tab:gray", ls="--", lw=1, alpha=0.8)
            ax.scatter(x[-1], y[-1], c="tab:gray", marker="x", zorder=3)
        else:
            ax.plot(x, y, lw=1.5, label=f"trial {t.number}")
    ax.plot([], [], c="tab:gray", ls="--", label="pruned (x: where ASHA stopped it)")
    ax.set(xlabel="epoch", ylabel="mean-over-folds val F1",
           title="Learning curves (intermediate values)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's fANOVA importances over the completed trials ({} with fewer than 2)."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < 2:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return dict(optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)))
        except (RuntimeError, ValueError):  # e.g. every completed trial has the same params
            return {}


def plot_importance(imp: dict[str, float], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * max(len(imp), 1)))
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names], color="tab:blue")
    if not imp:
        ax.text(0.5, 0.5, "needs 2 or more completed trials", ha="center", transform=ax.transAxes)
    ax.set(xlabel="importance (fANOVA, completed trials)", title="Parameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_slices(trials: list, params: list[str], path: Path) -> None:
    plt = _plt()
    n = max(len(params), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), squeeze=False)
    for ax, p in zip(axes[0], params):
        for t in trials:
            s = _score(t)
            if s is None or p not in t.params:
                continue
            done = t.state == optuna.trial.TrialState.COMPLETE
            ax.scatter(t.params[p], s, c="tab:blue" if done else "tab:gray",
                       marker="o" if done else "x")
        if any(getattr(t.distributions.get(p), "log", False) for t in trials):
            ax.set_xscale("log")  # a loguniform parameter (the learning rate)
        ax.set(xlabel=p, ylabel="mean val F1")
    fig.suptitle("Score against each parameter (x: pruned)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def first_point_trial(study: optuna.Study, first: list[dict]) -> optuna.trial.FrozenTrial | None:
    """The trial that evaluated the space's first ``first:`` point (seed 000's recipe)."""
    if not first:
        return None
    want = {k.replace(".", "/"): v for k, v in first[0].items()}
    for t in study.trials:
        if t.params and all(_close(t.params.get(k), v) for k, v in want.items()):
            return t
    return None


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return a == b


def write_report(files: RunFiles) -> Path:
    """``search_report.md`` and its PNGs in the run's (local) files; pushed for s3://."""
    study, cfg = load_search_study(files)
    trials = [t for t in study.trials if t.state != optuna.trial.TrialState.WAITING]
    out = files.local
    params = sorted({p for t in trials for p in t.params})
    imp = importances(study)
    plot_history(trials, out / PLOTS[0])
    plot_curves(trials, out / PLOTS[1])
    plot_importance(imp, out / PLOTS[2])
    plot_slices(trials, params, out / PLOTS[3])

    states = optuna.trial.TrialState
    count = {s: sum(t.state == s for t in trials) for s in
             (states.COMPLETE, states.PRUNED, states.FAIL, states.RUNNING)}
    done = [t for t in trials if t.state == states.COMPLETE and _score(t) is not None]
    best = max(done, key=_score) if done else None
    space_path = files.local / "space.yaml"
    first: list[dict] = []
    if space_path.exists():
        import yaml

        first = (yaml.safe_load(space_path.read_text()) or {}).get("first") or []
    seed = first_point_trial(study, first)

    lines = [f"# Search report: {files.name}", "",
             f"{len(trials)} trials: {count[states.COMPLETE]} completed, {count[states.PRUNED]} "
             f"pruned, {count[states.FAIL]} failed, {count[states.RUNNING]} running. "
             f"Each trial trains {cfg.data.folds} subject-grouped folds for up to "
             f"{cfg.train.epochs} epochs; its score is the mean over folds of each fold's best "
             "validation weighted F1 (mean val F1). ASHA "
             + (f"(grace {cfg.search.grace_period} epochs, reduction factor "
                f"{cfg.search.reduction_factor:g}) stops trials whose score at a rung is below "
                "the best 1/reduction-factor of the trials that reached it: those are *pruned*."
                if cfg.search.scheduler == "asha" else "was off: every trial ran to its end."),
             ""]
    if best:
        folds = best.user_attrs.get("fold_val_f1") or []
        lines += ["## Best trial", "",
                  f"Trial {best.number} (Tune trial `{best.user_attrs.get('tune_trial_id', '?')}`): "
                  f"mean val F1 **{_score(best):.4f}** (folds "
                  f"{', '.join(f'{x:.4f}' for x in folds if x is not None)}) after "
                  f"{best.user_attrs.get('epochs', '?')} epochs.", ""]
        if seed is not None:
            lines += ["Against the space's first point (the seed recipe):", "",
                      "| | best trial | first point |", "|---|---|---|"]
            for p in params:
                lines.append(f"| `{p.replace('/', '.')}` | {_fmt(best.params.get(p))} | "
                             f"{_fmt(seed.params.get(p))} |")
            s = _score(seed)
            lines += [f"| mean val F1 | {_score(best):.4f} | "
                      f"{'-' if s is None else f'{s:.4f}'} ({seed.state.name.lower()}) |", ""]
        lines += ["Next: `python -m leuk_ray.final --from " + files.uri + "`", ""]
    else:
        lines += ["No trial has completed yet.", ""]
    lines += ["## Optimisation history", "",
              "Each trial's score in the order trials were proposed; the red line is the best "
              "completed trial so far. A pruned trial shows the score it had when it was stopped.",
              "", f"![history]({PLOTS[0]})", "",
              "## Learning curves", "",
              "The mean val F1 of every trial after each epoch. Dashed grey lines are pruned "
              "trials, ending where ASHA stopped them.", "", f"![curves]({PLOTS[1]})", "",
              "## Which parameters mattered", "",
              "fANOVA importances fitted on the completed trials (how much of the score's "
              "variance each parameter explains; they sum to 1). With few trials they are rough.",
              "", f"![importance]({PLOTS[2]})", ""]
    if imp:
        lines += ["| parameter | importance |", "|---|---|"] + [
            f"| `{k.replace('/', '.')}` | {v:.3f} |" for k, v in imp.items()] + [""]
    lines += ["## Score against each parameter", "", f"![slices]({PLOTS[3]})", "",
              "## All trials", "", "| trial | Tune id | status | epochs | mean val F1 | "
              + " | ".join(f"`{p.replace('/', '.')}`" for p in params) + " | reason |",
              "|" + "---|" * (5 + len(params) + 1)]
    for t in trials:
        s = _score(t)
        lines.append(f"| {t.number} | `{t.user_attrs.get('tune_trial_id', '')}` | "
                     f"{t.user_attrs.get('status', t.state.name.lower())} | "
                     f"{t.user_attrs.get('epochs', '')} | {'' if s is None else f'{s:.4f}'} | "
                     + " | ".join(_fmt(t.params.get(p, "")) for p in params)
                     + f" | {t.user_attrs.get('reason', '')} |")
    lines.append("")
    (out / REPORT).write_text("\n".join(lines))
    files.push(REPORT, *PLOTS)
    return out / REPORT


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m leuk_ray.search_report",
        description="Write search_report.md (and its PNGs) for a search directory, from its Optuna "
                    "study; works while the search runs too.")
    p.add_argument("search_dir", metavar="SEARCH_DIR", help="a search's directory (or s3://...)")
    args = p.parse_args(argv)
    files = RunFiles.from_path(resolve_storage(args.search_dir))
    path = write_report(files)
    print(f"report: {files.uri}/{REPORT}" if files.remote else f"report: {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
