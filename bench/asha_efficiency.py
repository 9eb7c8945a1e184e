"""Search efficiency: ASHA + Optuna vs the same trials without pruning, on the same data.

Runs on the CPU at small size: the real C-NMC sample, --smoke-test settings (test_efficientnet,
64 px, 240 images, 2 folds), the smoke search space, N trials x E epochs, the same Optuna seed.
Counts fold-epochs spent (sum over trials.csv of epochs x folds) and the best mean-fold F1 of the
completed trials, for search.scheduler=asha (grace period G, reduction factor R) and =none.
With several Optuna seeds (``--seeds 0,1,2``) each seed is one pair of searches, and the last line
gives the totals over the seeds and the mean F1 difference (one seed at 64 px is noisy).

    python bench/asha_efficiency.py [--trials 6] [--epochs 4] [--grace 1] [--rf 2] [--seeds 0]
Last line: fold-epochs ratio ASHA / none and the (mean) F1 difference.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from _common import DATA, PY, run, trials


def summary(rows: list[dict]) -> tuple[int, float, float]:
    spent = sum(int(float(r["epochs"] or 0)) * int(float(r["folds"] or 0)) for r in rows)
    done = [float(r["mean_val_f1"]) for r in rows if r["status"] == "completed"
            and r["mean_val_f1"]]
    every = [float(r["mean_val_f1"]) for r in rows if r["mean_val_f1"]]
    return spent, max(done, default=float("nan")), max(every, default=float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--grace", type=int, default=1, help="ASHA grace period (epochs)")
    ap.add_argument("--rf", type=float, default=2.0, help="ASHA reduction factor")
    ap.add_argument("--seeds", default="0", help="Optuna seeds, comma-separated: one pair per seed")
    ap.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)))
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="leuk_bench_asha_"))
    env = {"LEUK_RAY_CACHE_DIR": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    print(f"CPU benchmark, small size: {a.trials} trials x 2 folds x up to {a.epochs} epochs, "
          f"test_efficientnet at 64 px, 240 real C-NMC images, smoke space, {a.cpus} cores; "
          f"ASHA grace {a.grace}, reduction factor {a.rf:g}; Optuna seeds {seeds}")
    spent_tot = {"asha": 0, "none": 0}
    diffs = []
    for seed in seeds:
        out = {}
        for sched in ("asha", "none"):
            name = f"{sched}_s{seed}"
            wall = run([PY, "-m", "leuk_ray.search", "--data", str(DATA), "--smoke-test",
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
                  f"wall {wall:.0f}s", flush=True)
            out[sched] = (spent, best)
            spent_tot[sched] += spent
        (sa, fa), (sn, fn) = out["asha"], out["none"]
        diffs.append(fa - fn)
        print(f"seed {seed}: ASHA/none fold-epochs {sa / sn:.2f} ({sa} / {sn}); best F1 ASHA - none "
              f"{fa - fn:+.4f}", flush=True)
    sa, sn = spent_tot["asha"], spent_tot["none"]
    print(f"ASHA/none fold-epochs ratio: {sa / sn:.2f} ({sa} / {sn}); best F1 ASHA - none: "
          f"{sum(diffs) / len(diffs):+.4f} (mean of {len(diffs)} seeds: "
          f"{', '.join(f'{d:+.4f}' for d in diffs)})")


if __name__ == "__main__":
    main()
