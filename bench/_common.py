"""Helpers shared by the search benchmarks (run the command lines, read Tune's results)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
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


def trials(exp_dir: Path) -> list[dict]:
    with open(exp_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


def first_results(exp_dir: Path) -> list[dict]:
    """The first reported result of every trial (Tune's result.json, one JSON line per epoch)."""
    out = []
    for p in sorted(exp_dir.glob("*/result.json")):
        if p.parent.name == "folds":
            continue
        for line in p.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
                break
    return out
