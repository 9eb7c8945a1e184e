"""Search efficiency: ASHA + Optuna vs the same trials without pruning, on the same data.

Runs on the CPU. Default: the realistic tier (``--tier lite0``, see ``_common.tier_args``): the
lite0 preset (ImageNet EfficientNet-Lite0) at ``--image-size`` px on ``--max-images`` real C-NMC
images, 2 subject-grouped folds, no early stopping, the lite0 search space, one trial at a time
(one core per fold worker). ``--tier smoke``: the earlier tiny random-init model at 64 px.

Per Optuna seed (``--seeds 0,1,2``) two real searches of N trials x up to E epochs:
``search.scheduler=none`` (every trial runs to the end: its full learning curves) and
``search.scheduler=asha`` with grace period G and reduction factor R. Counted: fold-epochs spent
(sum over trials.csv of epochs x folds) and the best mean-fold F1 of the completed trials.

Replay: the unpruned run's curves are also fed, trial by trial in the order they ran, through
Ray Tune's own ``ASHAScheduler`` for every (grace, reduction factor) in ``--grid``. Trials ran one
at a time, so this is what ASHA would have decided on those same trials (Optuna's later proposals
in a real ASHA run differ, because it sees pruned trials; the real ASHA run measures that).

    python bench/asha_efficiency.py [--tier lite0] [--trials 8] [--epochs 8] [--grace 2] [--rf 2]
        [--seeds 0,1,2] [--asha-seeds 0] [--grid 1x2,2x2,1x3,...] [--workdir DIR]
Last line: fold-epochs ratio ASHA / none of the real runs and the mean F1 difference.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from _common import DATA, PY, results, run, tier_args, trials

SCORE = "mean_val_f1"


def summary(rows: list[dict]) -> tuple[int, float, float]:
    spent = sum(int(float(r["epochs"] or 0)) * int(float(r["folds"] or 0)) for r in rows)
    done = [float(r[SCORE]) for r in rows if r["status"] == "completed" and r[SCORE]]
    every = [float(r[SCORE]) for r in rows if r[SCORE]]
    return spent, max(done, default=float("nan")), max(every, default=float("nan"))


def ended(exp_dir: Path, n: int) -> bool:
    """The search in ``exp_dir`` already ran: ``n`` trials, every one of them ended. False when
    there is none; a search there that did not end, or had another number of trials, stops the
    benchmark (leuk_ray.search would refuse the name)."""
    if not exp_dir.exists():
        return False
    rows = trials(exp_dir) if (exp_dir / "trials.csv").exists() else []
    if len(rows) == n and all(r["status"] in ("completed", "pruned", "failed") for r in rows):
        return True
    raise SystemExit(f"{exp_dir} holds a search that did not end with {n} trials: delete it, or "
                     "resume it with python -m leuk_ray.search --resume")


# what ASHA may rank trials by at its rungs (the trial is always scored by SCORE): key -> what it is
PRUNE_ON = {
    "f1": "mean over folds of each fold's best validation F1 so far (the search's score)",
    "auc": "mean over folds of each fold's best validation ROC-AUC so far",
    "auc_last": "this epoch's validation ROC-AUC, mean over folds",
}


def _with_prune_keys(reports: list[dict]) -> list[dict]:
    """Each report with the PRUNE_ON keys added (an undefined AUC counts as chance, 0.5)."""
    out, best = [], {}
    for r in reports:
        k = int(r["folds"])
        aucs = [r.get(f"fold_{i}_val_auc_last") for i in range(k)]
        aucs = [0.5 if a is None or math.isnan(a) else float(a) for a in aucs]
        for i, a in enumerate(aucs):
            best[i] = max(best.get(i, 0.0), a)
        out.append({**r, "f1": r[SCORE], "auc": sum(best.values()) / k,
                    "auc_last": sum(aucs) / k})
    return out


def replay(curves: list[list[dict]], max_t: int, grace: int, rf: float,
           prune_on: str = "f1") -> tuple[int, float, int]:
    """Ray Tune's ASHAScheduler (as leuk-ray's search builds it) decided on these curves, one trial
    after another, ranking at its rungs by ``prune_on`` (a PRUNE_ON key): (fold-epochs spent, best
    completed mean F1, trials completed)."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    sched = ASHAScheduler(time_attr="epoch", metric=prune_on, mode="max", max_t=max_t,
                          grace_period=min(grace, max_t), reduction_factor=rf)
    spent, best, completed = 0, float("-inf"), 0
    for i, reports in enumerate(curves):
        reports = _with_prune_keys(reports)
        trial = SimpleNamespace(trial_id=f"t{i}")
        sched.on_trial_add(None, trial)
        folds = int(reports[0]["folds"])
        for r in reports:
            action = sched.on_trial_result(None, trial, r)
            if r["epoch"] >= max_t:  # ran to the end
                spent += r["epoch"] * folds
                best, completed = max(best, r[SCORE]), completed + 1
                sched.on_trial_remove(None, trial)
                break
            if action == TrialScheduler.STOP:
                spent += r["epoch"] * folds
                sched.on_trial_remove(None, trial)
                break
    return spent, best, completed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tier", default="lite0", choices=("lite0", "smoke"))
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--grace", type=int, default=2,
                    help="ASHA grace period (epochs), real runs (search.grace_period's default)")
    ap.add_argument("--rf", type=float, default=2.0,
                    help="ASHA reduction factor, real runs (search.reduction_factor's default)")
    ap.add_argument("--grid", default="1x2,2x2,1x3,2x3,3x2,1x4",
                    help="GRACExRF pairs replayed on the unpruned curves")
    ap.add_argument("--prune-on", default="f1",
                    help="what the replays rank trials by at ASHA's rungs, comma-separated: "
                         + "; ".join(f"{k}: {v}" for k, v in PRUNE_ON.items()))
    ap.add_argument("--seeds", default="0", help="Optuna seeds, comma-separated: one pair per seed")
    ap.add_argument("--image-size", type=int, default=128, help="lite0 tier only")
    ap.add_argument("--max-images", type=int, default=500, help="lite0 tier only")
    ap.add_argument("--asha-seeds", default=None,
                    help="seeds that also get a real ASHA search (default: every seed; the others "
                         "get the unpruned run and its replay only)")
    ap.add_argument("--workdir", default=None,
                    help="keep the searches in this folder (default: a new temp folder); a search "
                         "that already ran there with every trial ended is read, not run again "
                         "(run with the same settings: they are not checked)")
    ap.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)))
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    asha_seeds = seeds if a.asha_seeds is None else [int(x) for x in a.asha_seeds.split(",")
                                                     if x.strip()]
    pairs = [(int(g), float(r)) for g, r in (p.split("x") for p in a.grid.split(",") if p)]
    prune_on = [x.strip() for x in a.prune_on.split(",") if x.strip()]
    if unknown := [x for x in prune_on if x not in PRUNE_ON]:
        ap.error(f"--prune-on {','.join(unknown)}: use {', '.join(PRUNE_ON)}")
    grid = [(g, rf, p) for p in prune_on for g, rf in pairs]
    tmp = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="leuk_bench_asha_"))
    print(f"searches in {tmp}", flush=True)
    env = {"LEUK_RAY_CACHE_DIR": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    size = (f"lite0 preset at {a.image_size} px, {a.max_images} images" if a.tier == "lite0"
            else "test_efficientnet at 64 px, 240 images, smoke space")
    print(f"CPU benchmark: {a.trials} trials x 2 folds x up to {a.epochs} epochs, {size}, real "
          f"C-NMC sample, {a.cpus} cores; real ASHA runs: grace {a.grace}, reduction factor "
          f"{a.rf:g} (seeds {asha_seeds}); Optuna seeds {seeds}", flush=True)
    spent_tot = {"asha": 0, "none": 0}
    diffs = []
    replays: dict[tuple[int, float, str], list[tuple[int, int, float, float]]] = {
        g: [] for g in grid}
    for seed in seeds:
        out = {}
        for sched in ("none", "asha") if seed in asha_seeds else ("none",):
            name = f"{sched}_s{seed}"
            done = ended(tmp / "runs" / name, a.trials)
            wall = float("nan") if done else run([PY, "-m", "leuk_ray.search", "--data", str(DATA),
                        *tier_args(a.tier, image_size=a.image_size, max_images=a.max_images),
                        "--num-samples", str(a.trials), "--storage-path", str(tmp / "runs"),
                        "--name", name, "--num-cpus", str(a.cpus),
                        "--set", f"train.epochs={a.epochs}", "--set", f"search.scheduler={sched}",
                        "--set", f"search.grace_period={a.grace}",
                        "--set", f"search.reduction_factor={a.rf}", "--set", f"search.seed={seed}",
                        "--set", "data.cache='on'"],  # quoted: YAML reads a bare on as True
                       env=env, log=tmp / f"{name}.log")
            rows = trials(tmp / "runs" / name)
            spent, best, best_any = summary(rows)
            status = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}"
                               for s in ("completed", "pruned", "failed"))
            print(f"seed {seed} {sched:5s}: {len(rows)} trials ({status}), {spent} fold-epochs, "
                  f"best completed mean F1 {best:.4f} (best of any trial {best_any:.4f}), "
                  + ("ran earlier, read from the work dir" if done else f"wall {wall:.0f}s"),
                  flush=True)
            out[sched] = (spent, best)
            if sched == "none":
                curves = results(tmp / "runs" / name)
                curves.sort(key=lambda c: c[0]["report_ts"] - c[0]["time_total_s"])  # run order
                for g, rf, p in grid:
                    s_r, b_r, n_r = replay(curves, a.epochs, g, rf, p)
                    replays[(g, rf, p)].append((s_r, spent, b_r, best))
                    print(f"  replay grace {g} rf {rf:g} on {p}: {s_r / spent:.2f} of the "
                          "fold-epochs "
                          f"({s_r} / {spent}), {n_r} completed, best F1 {b_r:.4f} "
                          f"({b_r - best:+.4f})", flush=True)
        if "asha" in out:
            (sa, fa), (sn, fn) = out["asha"], out["none"]
            spent_tot["asha"] += sa
            spent_tot["none"] += sn
            diffs.append(fa - fn)
            print(f"seed {seed}: ASHA/none fold-epochs {sa / sn:.2f} ({sa} / {sn}); best F1 "
                  f"ASHA - none {fa - fn:+.4f}", flush=True)
    print(f"replayed on the unpruned curves, over {len(seeds)} seed(s) (fold-epochs ratio, mean "
          f"best-F1 difference, worst):")
    for (g, rf, p), xs in replays.items():
        ratio = sum(x[0] for x in xs) / sum(x[1] for x in xs)
        d = [x[2] - x[3] for x in xs]
        print(f"  grace {g} rf {rf:g} on {p}: {ratio:.2f}, {sum(d) / len(d):+.4f}, {min(d):+.4f}")
    if diffs:
        sa, sn = spent_tot["asha"], spent_tot["none"]
        print(f"ASHA/none fold-epochs ratio: {sa / sn:.2f} ({sa} / {sn}); best F1 ASHA - none: "
              f"{sum(diffs) / len(diffs):+.4f} (mean of {len(diffs)} seeds: "
              f"{', '.join(f'{d:+.4f}' for d in diffs)})")


if __name__ == "__main__":
    main()
