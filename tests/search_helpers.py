"""Helpers shared by the end-to-end search tests (test_search, test_faults)."""
from __future__ import annotations

import csv
import sys
from pathlib import Path


def search_cmd(data: Path, storage: Path, name: str, space: Path, *extra: str) -> list[str]:
    """``python -m leuk_ray.search`` at smoke size, one trial at a time, on 2 CPUs."""
    return [sys.executable, "-m", "leuk_ray.search", "--smoke-test", "--data", str(data),
            "--space", str(space), "--storage-path", str(storage), "--name", name,
            "--set", "search.max_concurrent=1", "--num-cpus", "2", *extra]


def csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV such as trials.csv; none while it does not exist yet."""
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def fold_checkpoints(exp: Path) -> dict[str, set[str]]:
    """trial id -> its fold checkpoint dirs: a trial trained again would add new ones."""
    return {d.name: {c.name for c in d.glob("checkpoint_*")} for d in (exp / "folds").glob("*")}
