"""Helpers shared by the search benchmarks (run the command lines, read Tune's results)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cnmc"
PY = sys.executable


def run(cmd: list[str], env: dict | None = None, log: Path | None = None) -> float:
    """Run ``cmd`` in the repository root; return its wall time (s). Output goes to ``log``."""
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as out:
        r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out,
                           stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        tail = Path(log).read_text()[-3000:] if log else ""
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{tail}")
    return wall


# The two sizes the search benchmarks run at (the flags go to both leuk_ray.search and
# leuk_ray.train). "lite0": the realistic tier, the lite0 preset (ImageNet EfficientNet-Lite0 from
# the offline weights package, one core and one torch thread per fold worker, so one 2-fold trial
# at a time on 2 cores) at a smaller image size and sample than the preset's final job, no early
# stopping (both runs then do exactly the same fold-epochs), the lite0 search space. "smoke": the
# --smoke-test tier (tiny random-init test_efficientnet, 64 px, 240 images, 0.45 CPU per fold
# worker, so two trials at once), kept to compare with the earlier results.
def tier_args(tier: str, *, image_size: int, max_images: int) -> list[str]:
    if tier == "smoke":
        return ["--smoke-test"]
    if tier != "lite0":
        raise SystemExit(f"unknown tier {tier!r}: lite0 or smoke")
    # 0.95 CPU: a 2-fold trial and its driver's 0.01 CPU fit the 2 cores (2 x 1.0 would not)
    sets = {"data.image_size": image_size, "data.max_images": max_images, "train.patience": 0,
            "ray.cpus_per_worker": 0.95, "search.space": "search_spaces/lite0.yaml"}
    return ["--preset", "lite0", *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]]


def trials(exp_dir: Path) -> list[dict]:
    with open(exp_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


def results(exp_dir: Path) -> list[list[dict]]:
    """Every trial's reported results in order (Tune's result.json, one JSON line per epoch)."""
    out = []
    for p in sorted(exp_dir.glob("*/result.json")):
        if p.parent.name == "folds":
            continue
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        if rows:
            out.append(rows)
    return out


def first_results(exp_dir: Path) -> list[dict]:
    """The first reported result of every trial."""
    return [rows[0] for rows in results(exp_dir)]


# Which kind of process a command line belongs to, first match wins (Ray names its worker
# processes after the actor class: "ray::RayTrainWorker.run_train_fn" and the like).
PROCESS_KINDS = [
    ("fold workers (RayTrainWorker)", "ray::RayTrainWorker"),
    ("Train controllers", "ray::TrainController"),
    ("trial drivers (Tune ImplicitFunc)", "ray::ImplicitFunc"),
    ("Ray Train helper: SynchronizationActor", "ray::SynchronizationActor"),
    ("Ray Train helper: DatasetManager", "ray::DatasetManager"),
    ("Ray Train helper: PlacementGroupCleaner", "ray::PlacementGroupCleaner"),
    ("Ray Train helper: PreemptionWatcher", "ray::PreemptionWatcher"),
    ("Ray helper: _QueueActor", "ray::_QueueActor"),
    ("search driver", "leuk_ray.search"),
    ("bare engine", "leuk_ray.train"),
    ("Ray: raylet", "raylet"),
    ("Ray: GCS", "gcs_server"),
    ("Ray: dashboard and its modules", "dashboard"),
    ("Ray: idle or other workers, agents, monitors", "ray"),
]


class CpuMeter:
    """CPU seconds (user + system) spent by every process while it runs, grouped by kind.

    Polls /proc every ``interval`` s from a thread; a process first seen after the start counts
    from 0, so processes shorter than the interval are missed (a few ms of Ray's helpers).
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.tick = os.sysconf("SC_CLK_TCK")
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._initial = True

    def _sample(self) -> None:
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            pid = int(d)
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
            if pid not in self.first:
                self.first[pid] = cpu if self._initial else 0.0
            self.last[pid] = (cpu, cmd or self.last.get(pid, (0, ""))[1])
        self._initial = False

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "CpuMeter":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def by_kind(self) -> dict[str, tuple[float, int]]:
        """{kind: (CPU seconds, processes)} over the processes that used CPU meanwhile."""
        out: dict[str, tuple[float, int]] = {}
        for pid, (cpu, cmd) in self.last.items():
            used = cpu - self.first[pid]
            if used <= 0:
                continue
            kind = next((k for k, pat in PROCESS_KINDS if pat in cmd), "other")
            s, n = out.get(kind, (0.0, 0))
            out[kind] = (s + used, n + 1)
        return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))
