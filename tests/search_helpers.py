"""Helpers shared by the end-to-end search tests (test_search, test_faults)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    # Ray Train also keeps checkpoint_manager_snapshot.json there: directories only
    return {d.name: {c.name for c in d.glob("checkpoint_*") if c.is_dir()}
            for d in (exp / "folds").glob("*")}


def session_pids(session: int, pattern: str) -> list[int]:
    """The processes of session ``session`` whose command line contains ``pattern``.

    A command a test starts with ``start_new_session=True`` heads a session whose id is its pid;
    the local Ray it starts (GCS, raylet, and the workers the raylet spawns, named ``ray::<Actor>``)
    stays in that session, also after the driver dies. So this finds the processes of the test's
    own Ray and never those of another Ray on the same host.
    """
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getsid(int(d.name)) != session:
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to inspect
            continue
        if pattern in cmd:
            out.append(int(d.name))
    return out


def stage_in_a_process_that_exits(tmp: Path, fold: int = 0) -> Path:
    """What a fold worker killed mid-upload leaves: a staged checkpoint (``leuk_ray.staging``)
    under temp dir ``tmp`` whose owning process has exited."""
    code = ("from leuk_ray.staging import new_staging_dir; d = new_staging_dir("
            f"{fold}); (d / 'fold_{fold}.pt').write_bytes(b'x' * 1000); print(d)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(tmp)},
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return Path(out.strip())
