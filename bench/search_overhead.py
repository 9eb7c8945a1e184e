"""Search overhead: a real search vs the bare engine doing the same fold-epochs in turn.

Runs on the CPU. Default: the realistic tier (``--tier lite0``, see ``_common.tier_args``): the
lite0 preset (ImageNet EfficientNet-Lite0 from the offline package) on the real C-NMC sample at
``--image-size`` px and ``--max-images`` images, 2 folds, one core and one torch thread per fold
worker (so one trial at a time fills 2 cores), no early stopping and no pruning
(search.scheduler=none: both runs do the same fold-epochs), a fresh node cache (the first trial
builds it). ``--tier smoke`` is the earlier tiny random-init model at 64 px.

- search: ``python -m leuk_ray.search`` wall time (Ray start-up included), Ray given the
  machine's cores (--num-cpus);
- bare: ``python -m leuk_ray.train`` (the same config without Ray) once per trial, one after
  another, one torch thread; its CPU time is read from /proc too.

efficiency = bare time / (search wall time x parallel slots), slots = fold workers that run at
once (min(cores, trials at once x folds)).

Split of the search's wall time, from the trials' reports (Tune's result.json): Ray's start-up
before the first trial; per trial, its start (trial start -> first training step of its last fold;
Ray's own part: -> the first fold worker running), its training rounds (one round = every fold's
epoch, run side by side) and the rest (its first round's excess over a steady one, its end and the
hand-over to the next trial). Per fold worker and round, what leuk-ray adds to the training path:
exchanging the folds' metrics, writing the checkpoint file, ``ray.train.report`` (with
``ray.checkpoint_upload=sync`` also the copy to storage). ``--compare KEY=VALUE`` runs the search a
second time with that override, side by side (e.g. ``--compare ray.checkpoint_upload=sync``).

    python bench/search_overhead.py [--tier lite0] [--trials 2] [--epochs 5] [--image-size 128]
        [--max-images 500] [--compare KEY=VALUE] [--set KEY=VALUE ...]
Last line: the efficiency.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import DATA, PY, CpuMeter, results, run, tier_args, trials


def search_run(a, tmp: Path, name: str, sets: list[str]) -> dict:
    env = {"LEUK_RAY_CACHE_DIR": str(tmp / f"cache_{name}"), "OMP_NUM_THREADS": "1"}
    launched = time.time()
    with CpuMeter() as meter:
        wall = run([PY, "-m", "leuk_ray.search", "--data", str(DATA),
                    *tier_args(a.tier, image_size=a.image_size, max_images=a.max_images),
                    "--num-samples", str(a.trials), "--storage-path", str(tmp / "runs"),
                    "--name", name, "--num-cpus", str(a.cpus), *sets],
                   env=env, log=tmp / f"{name}.log")
    exp = tmp / "runs" / name
    rows = trials(exp)
    per_trial = results(exp)
    fold_epochs = sum(int(float(r["epochs"])) * int(float(r["folds"])) for r in rows)
    starts, ray_up, rounds, firsts, cost = [], [], [], [], {}
    trial_starts = []
    for reports in per_trial:
        r0 = reports[0]
        t_start = r0["report_ts"] - r0["time_total_s"]
        trial_starts.append(t_start)
        starts.append(r0["first_step_ts"] - t_start)
        ray_up.append(r0["worker_start_ts"] - t_start)
        firsts.append(r0["report_ts"] - r0["first_step_ts"])
        ts = [r["report_ts"] for r in reports]
        rounds += [b - x for x, b in zip(ts, ts[1:])]
        last, k = reports[-1], int(reports[-1]["folds"])
        for i in range(k):  # summed over the rounds before the last report
            n = last.get(f"fold_{i}_cost_rounds", 0) or 0
            for key in ("gather_s", "save_s", "report_s", "saved_mb"):
                if n:
                    cost.setdefault(key, []).append(last[f"fold_{i}_cost_{key}"] / n)
    steady = statistics.median(rounds) if rounds else float("nan")
    epochs = sum(len(x) for x in per_trial)
    ray_start = min(trial_starts) - launched if trial_starts else float("nan")
    trained = epochs * steady
    fixed = (wall - ray_start - trained) / max(1, len(per_trial))
    return {"name": name, "wall": wall, "rows": rows, "fold_epochs": fold_epochs,
            "starts": starts, "ray_up": ray_up, "steady": steady, "firsts": firsts,
            "ray_start": ray_start, "fixed": fixed, "epochs": epochs,
            "cost": {k: statistics.mean(v) for k, v in cost.items()},
            "kinds": meter.by_kind(), "log": tmp / f"{name}.log"}


def show(s: dict, a, bare_round: float) -> None:
    print(f"--- search {s['name']}: {len(s['rows'])} trials, {s['fold_epochs']} fold-epochs, "
          f"wall {s['wall']:.1f} s (log {s['log']})")
    print(f"  Ray and search start-up before the first trial: {s['ray_start']:.1f} s")
    print(f"  per trial: start -> first fold worker running (Ray) median "
          f"{statistics.median(s['ray_up']):.1f} s; -> last fold's first step median "
          f"{statistics.median(s['starts']):.1f} s (ours: "
          f"{statistics.median(x - u for x, u in zip(s['starts'], s['ray_up'])):.1f} s)")
    print(f"  a steady round (every fold's epoch side by side): median {s['steady']:.2f} s "
          f"(bare engine: {bare_round:.2f} s per fold-epoch); first rounds "
          f"{', '.join(f'{x:.1f}' for x in s['firsts'])} s")
    print(f"  per-trial fixed cost (wall - Ray start-up - rounds x steady round) / trials: "
          f"{s['fixed']:.1f} s")
    c = s["cost"]
    if c:
        print(f"  per fold worker and round, on its training path: metric exchange (waiting "
              f"included) {c['gather_s']:.3f} s, checkpoint file {c['save_s']:.3f} s "
              f"({c['saved_mb']:.1f} MiB), ray.train.report {c['report_s']:.3f} s")
    total = sum(cpu for cpu, _ in s["kinds"].values())
    print(f"  CPU during the search: {total:.1f} s of {s['wall'] * a.cpus:.1f} s available "
          f"({total / (s['wall'] * a.cpus):.0%} busy); by process kind (CPU s, per trial, "
          f"processes):")
    for kind, (cpu, n) in s["kinds"].items():
        print(f"    {cpu:7.1f} s  {cpu / a.trials:6.1f} s  {n:3d}  {kind}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tier", default="lite0", choices=("lite0", "smoke"))
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=128, help="lite0 tier only")
    ap.add_argument("--max-images", type=int, default=500, help="lite0 tier only")
    ap.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--compare", metavar="KEY=VALUE", default=None,
                    help="run the search a second time with this override (before/after)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides for every run")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="leuk_bench_so_"))
    sets = ["--set", f"train.epochs={a.epochs}", "--set", f"data.folds={a.folds}",
            # 'on' quoted: --set values are YAML, where a bare on reads as True
            "--set", "data.cache='on'", "--set", "search.scheduler=none"]
    for kv in a.extra:
        sets += ["--set", kv]
    size = (f"lite0 preset at {a.image_size} px, {a.max_images} images" if a.tier == "lite0"
            else "smoke-test config (test_efficientnet, 64 px, 240 images)")
    print(f"CPU benchmark: {a.trials} trials x {a.folds} folds x {a.epochs} epochs, {size}, real "
          f"C-NMC sample, {', '.join(a.extra) or 'no other overrides'}; {a.cpus} cores, cache on")

    runs = [search_run(a, tmp, "search", sets)]
    if a.compare:
        runs.append(search_run(a, tmp, "compare", [*sets, "--set", a.compare]))

    benv = {"LEUK_RAY_CACHE_DIR": str(tmp / "cache_bare"), "OMP_NUM_THREADS": "1"}
    bare = 0.0
    with CpuMeter() as meter:
        for i in range(a.trials):
            bare += run([PY, "-m", "leuk_ray.train", "--data", str(DATA),
                         *tier_args(a.tier, image_size=a.image_size, max_images=a.max_images),
                         "--out", str(tmp / f"bare{i}"), *sets], env=benv,
                        log=tmp / f"bare{i}.log")
    bare_cpu = sum(cpu for cpu, _ in meter.by_kind().values())
    fold_epochs = runs[0]["fold_epochs"]
    print(f"bare engine: {a.trials} runs one after another, {bare:.1f} s wall, {bare_cpu:.1f} s "
          f"CPU, {fold_epochs} fold-epochs: {bare / fold_epochs:.2f} s per fold-epoch "
          f"(its imports, cache and model included)")
    per_trial_folds = a.folds
    at_once = 1 if a.tier == "lite0" else a.trials  # 1.0 CPU vs 0.45 CPU per fold worker
    slots = min(a.cpus, at_once * per_trial_folds)
    for s in runs:
        show(s, a, bare / fold_epochs)
    print(f"parallel slots: {slots}")
    effs = [(s["name"], bare / (s["wall"] * slots), s["wall"]) for s in runs]
    if len(effs) > 1:
        print(f"efficiency {effs[1][0]} ({a.compare}): {bare:.1f} / ({effs[1][2]:.1f} x {slots}) "
              f"= {effs[1][1]:.2f}; search / compare wall: {effs[0][2] / effs[1][2]:.3f}")
    print(f"search efficiency = bare / (search wall x slots) = {bare:.1f} / ({effs[0][2]:.1f} x "
          f"{slots}) = {effs[0][1]:.2f}")


if __name__ == "__main__":
    main()
