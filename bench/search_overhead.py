"""Search overhead: a small real search vs the bare engine doing the same fold-epochs in turn.

Runs on the CPU at small size (this is not the GPU benchmark): the real C-NMC sample, --smoke-test
settings (tiny test_efficientnet, 64 px, 240 images, 2 folds, 1 torch thread per process),
2 trials x 2 folds x 3 epochs, no pruning (search.scheduler=none, so both do the same
fold-epochs), data.cache=on with a fresh node cache directory (the first trial builds it).

- search: ``python -m leuk_ray.search`` wall time (Ray start-up included), Ray given the
  machine's cores (--num-cpus);
- bare: ``python -m leuk_ray.train`` once per trial, one after another (same config, same threads).

efficiency = bare time / (search wall time x parallel slots), slots = min(cores, fold workers
running at once). Also: from a trial's start (Tune starting its function) to the first training
step of its last fold, read from the fold workers' ``worker_start_ts``/``first_step_ts``/
``report_ts`` metrics and Tune's ``time_total_s`` of the first report; and the CPU seconds spent
meanwhile by every kind of process (fold workers, Train controllers, trial drivers, Ray Train's
helper actors, Ray itself), read from /proc: on a machine this small the start-up is CPU-bound.

    python bench/search_overhead.py [--trials 2] [--epochs 3] [--set KEY=VALUE ...]
Last line: the efficiency.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from _common import DATA, PY, CpuMeter, first_results, run, trials


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides for both runs, e.g. model.backbone=efficientnet_b0 "
                         "data.image_size=128 data.max_images=600 (more work per trial)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="leuk_bench_so_"))
    sets = ["--set", f"train.epochs={a.epochs}", "--set", f"data.folds={a.folds}",
            # 'on' quoted: --set values are YAML, where a bare on reads as True
            "--set", "data.cache='on'", "--set", "search.scheduler=none"]
    for kv in a.extra:
        sets += ["--set", kv]
    print(f"CPU benchmark, small size: {a.trials} trials x {a.folds} folds x {a.epochs} epochs, "
          f"smoke-test config (test_efficientnet, 64 px, 240 real C-NMC images) with "
          f"{', '.join(a.extra) or 'no other overrides'}; {a.cpus} cores, cache on")

    env = {"LEUK_RAY_CACHE_DIR": str(tmp / "cache_search"), "OMP_NUM_THREADS": "1"}
    with CpuMeter() as meter:
        wall = run([PY, "-m", "leuk_ray.search", "--data", str(DATA), "--smoke-test",
                    "--num-samples", str(a.trials), "--storage-path", str(tmp / "runs"),
                    "--name", "so", "--num-cpus", str(a.cpus), *sets],
                   env=env, log=tmp / "search.log")
    exp = tmp / "runs" / "so"
    rows = trials(exp)
    fold_epochs = sum(int(float(r["epochs"])) * int(float(r["folds"])) for r in rows)
    firsts = first_results(exp)
    starts, ray_up = [], []
    for r in firsts:
        trial_start = r["report_ts"] - r["time_total_s"]
        starts.append(r["first_step_ts"] - trial_start)
        ray_up.append(r["worker_start_ts"] - trial_start)

    benv = {"LEUK_RAY_CACHE_DIR": str(tmp / "cache_bare"), "OMP_NUM_THREADS": "1"}
    bare = 0.0
    for i in range(a.trials):
        bare += run([PY, "-m", "leuk_ray.train", "--data", str(DATA), "--smoke-test",
                     "--out", str(tmp / f"bare{i}"), *sets], env=benv, log=tmp / f"bare{i}.log")
    concurrent = min(a.trials * a.folds, a.cpus)  # 0.45 CPU per fold worker: all trials at once
    slots = min(a.cpus, concurrent)
    eff = bare / (wall * slots)
    print(f"search: {len(rows)} trials, {fold_epochs} fold-epochs, wall {wall:.1f}s "
          f"(log {tmp / 'search.log'})")
    print(f"bare engine: {a.trials} runs one after another, {bare:.1f}s")
    if starts:
        print(f"trial start -> first fold worker running (Ray worker start-up): median "
              f"{statistics.median(ray_up):.1f}s (per trial: {', '.join(f'{x:.1f}' for x in ray_up)})")
        print(f"trial start -> first training step of its last fold: median "
              f"{statistics.median(starts):.1f}s (per trial: {', '.join(f'{x:.1f}' for x in starts)}); "
              f"beyond Ray's worker start-up: "
              f"{statistics.median(s - u for s, u in zip(starts, ray_up)):.1f}s")
    kinds = meter.by_kind()
    total = sum(c for c, _ in kinds.values())
    print(f"CPU during the search: {total:.1f} s of {wall * a.cpus:.1f} s available "
          f"({total / (wall * a.cpus):.0%} busy); by process kind (CPU s, processes):")
    for kind, (cpu, n) in kinds.items():
        print(f"  {cpu:7.1f} s  {n:3d}  {kind}")
    print(f"parallel slots: {slots}")
    print(f"search efficiency = bare / (search wall x slots) = {bare:.1f} / ({wall:.1f} x {slots}) "
          f"= {eff:.2f}")


if __name__ == "__main__":
    main()
