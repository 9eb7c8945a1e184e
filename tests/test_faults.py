"""Fault tolerance, proven on a real local Ray: killed workers, killed drivers, exploding learning
rates, a killed final job, unwritable storage.

Slow: each test starts Ray. Processes are killed for real (SIGKILL), nothing is mocked, and only
those of the Ray the test started (found by session, see ``session_pids``). Machinery tests: they
run on the synthetic ``ray_data`` tree, so a fresh clone without ../shared runs them too.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from search_helpers import (csv_rows, fold_checkpoints, search_cmd, session_pids,
                            stage_in_a_process_that_exits)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

GOOD = "{train.lr: 3.0e-3, train.weight_decay: 0.01}"
SPACE = """
params:
  train.lr:           {type: loguniform, low: 1.0e-4, high: 10.0}
  train.weight_decay: {type: uniform, low: 0.0, high: 1.0}
first:
"""


def _space(tmp_path: Path, *points: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(SPACE + "".join(f"  - {pt}\n" for pt in points))
    return p


def _search(data: Path, storage: Path, name: str, space: Path, *extra: str) -> list[str]:
    return search_cmd(data, storage, name, space, "--set", "search.scheduler=none", *extra)


def _wait(cond, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"condition not met in {timeout}s (process rc={proc and proc.poll()})\n"
                         + tail)


def _reported_epochs(exp: Path) -> dict[str, list[int]]:
    out = {}
    for d in exp.glob("trial_fn_*"):
        f = d / "result.json"
        lines = f.read_text().splitlines() if f.exists() else []
        out[d.name.split("_")[2]] = [json.loads(x)["epoch"] for x in lines]
    return out


def _seen(seen: set[str], dirs) -> set[str]:
    """``seen`` plus the checkpoint dir names in ``dirs`` (one per reported epoch): Ray Train
    keeps only the latest (``CheckpointConfig(num_to_keep=1)``), so they are counted as they
    appear."""
    for names in dirs:
        seen.update(n for n in names if not n.endswith(".json"))  # not Ray's snapshot file
    return seen


def _wait_gone(session: int, pattern: str, timeout: float = 60) -> None:
    """Wait until session ``session`` (a command started with start_new_session=True) has no
    process whose command line contains ``pattern``."""
    deadline = time.time() + timeout
    while session_pids(session, pattern) and time.time() < deadline:
        time.sleep(0.5)


@pytest.mark.slow
def test_killed_fold_worker_resumes_from_its_checkpoint(ray_data, tmp_path):
    """SIGKILL one fold worker mid-run: Ray Train restarts the worker group, each fold resumes
    after its last checkpointed epoch, and the trial finishes with every epoch reported once."""
    storage, log = tmp_path / "results", tmp_path / "search.log"
    exp = storage / "w"
    # 12 epochs: enough left after the second for the kill to land mid-run (an epoch is ~1 s)
    cmd = _search(ray_data, storage, "w", _space(tmp_path, GOOD), "--num-samples", "1",
                  "--set", "data.max_images=400", "--set", "train.epochs=12")
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT,
                                start_new_session=True)
        try:
            # two epochs checkpointed, so the kill lands in a later epoch. Watched through Ray
            # Train's checkpoint dirs (written as each epoch is reported), not Tune's result.json,
            # which is flushed late: at ~1 s an epoch, the run could be over by then.
            seen: set[str] = set()
            _wait(lambda: len(_seen(seen, fold_checkpoints(exp).values())) >= 2, 400, proc, log)
            workers = session_pids(proc.pid, "RayTrainWorker")  # of this search's Ray only
            assert workers, "no Ray Train worker process found in the search's session"
            os.kill(workers[0], signal.SIGKILL)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    rows = csv_rows(exp / "trials.csv")
    assert len(rows) == 1 and rows[0]["status"] == "completed", rows
    assert int(rows[0]["epochs"]) == 12
    # the restarted workers loaded their fold checkpoints, from before the last epoch
    resumed = [int(x.split()[0]) for x in text.split("resuming after epoch ")[1:]]
    assert resumed and max(resumed) < 12, f"the kill did not land mid-run: {resumed}"
    (epochs,) = _reported_epochs(exp).values()
    # no epoch beyond the last checkpoint was trained (and reported) twice
    assert epochs == sorted(set(epochs)) and epochs[-1] == 12, epochs


@pytest.mark.slow
def test_killed_driver_resumes_and_exploding_trial_is_pruned(ray_data, tmp_path):
    """SIGKILL the search driver after its first trial finished; --resume runs the rest. The
    second trial's learning rate makes the weights diverge: it ends pruned with the reason, and
    the best config is the first trial's."""
    storage, log = tmp_path / "results", tmp_path / "first.log"
    exp = storage / "d"
    space = _space(tmp_path, GOOD, "{train.lr: 10.0, train.weight_decay: 1.0}")
    cmd = _search(ray_data, storage, "d", space, "--num-samples", "2",
                  "--set", "data.max_images=160", "--set", "train.scheduler=none")
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT,
                                start_new_session=True)
        try:
            _wait(lambda: any(r["status"] == "completed" for r in csv_rows(exp / "trials.csv")),
                  400, proc, log)
            # No grace period: Tune saves its experiment state at most every 10 s, so the driver
            # usually dies before Tune has recorded the trial as ended and --resume restarts it.
            # The restarted trial must find its folds finished and train nothing.
            os.kill(proc.pid, signal.SIGKILL)  # the driver only: Ray's own processes are orphaned
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    _wait_gone(proc.pid, "RayTrainWorker")  # Ray's reaper takes the orphaned cluster down
    first = {r["trial_id"]: r for r in csv_rows(exp / "trials.csv") if r["status"] == "completed"}
    before = fold_checkpoints(exp)

    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=ROOT, env=ENV,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    rows = {row["trial_id"]: row for row in csv_rows(exp / "trials.csv")}
    assert len(rows) == 2  # the union of trials is --num-samples
    for tid, row in first.items():  # finished trials kept, not rerun
        assert rows[tid]["mean_val_f1"] == row["mean_val_f1"]
        assert fold_checkpoints(exp)[tid] == before[tid]
    bad = next(row for row in rows.values() if float(row["train.lr"]) > 1)
    good = next(row for row in rows.values() if float(row["train.lr"]) < 1)
    assert bad["status"] == "pruned" and "non-finite" in bad["reason"], bad
    assert good["status"] == "completed"
    best = yaml.safe_load((exp / "best_config.yaml").read_text())
    assert best["trial_id"] == good["trial_id"]
    assert best["cv_score"] == pytest.approx(float(good["mean_val_f1"]))
    states = {round(float(o["params_train/lr"]), 6): o["state"]
              for o in csv_rows(exp / "optuna_trials.csv")}
    assert states[10.0] == "PRUNED" and states[0.003] == "COMPLETE"


@pytest.mark.slow
@pytest.mark.parametrize("upload", ["async", "sync"])
def test_finished_fold_run_restarted_trains_nothing_and_keeps_its_checkpoints(ray_data, tmp_path,
                                                                              upload):
    """The deterministic core of "finished trials are not rerun": a fold run started again under
    the same name after it finished (what a resumed search does with a trial whose end Tune had
    not yet recorded) trains no epoch, writes no checkpoint, and returns the same metrics. With
    either ``ray.checkpoint_upload``, every epoch's checkpoint is stored before the run ends and
    the fold workers' local copies are gone (at ~128 MiB per fold and epoch for a B3, a leak fills
    a node's disk)."""
    import tempfile

    import ray

    from leuk_ray.cluster import PREEMPTION_WATCHER_ENV, connect
    from leuk_ray.config import load_config
    from leuk_ray.data import prepare_data
    from leuk_ray.fold_trainer import run_folds
    from leuk_ray.staging import staging_root

    cfg = load_config(smoke=True, overrides=[f"data.root={ray_data}", "data.max_images=120",
                                             "train.epochs=2", "train.scheduler=none",
                                             f"ray.checkpoint_upload={upload}"])
    prepared = prepare_data(cfg.data)
    # a copy that a fold worker killed mid-upload left on this node: the next fold worker sweeps it
    stale = stage_in_a_process_that_exits(Path(tempfile.gettempdir()))
    local_copies = set(staging_root().iterdir()) - {stale}
    # ray.init() sets RAY_AUTH_MODE=token in this process's environment (and connect() turns Ray
    # Train's preemption watcher off), which every Ray cluster a later test starts from this
    # process would inherit: put them back as they were
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", PREEMPTION_WATCHER_ENV)}
    connect(num_cpus=2)  # a local Ray, as search and final start it
    try:
        first = run_folds(cfg, prepared, storage_path=str(tmp_path), name="f")
        before = {c.name for c in (tmp_path / "f").glob("checkpoint_*")}
        again = run_folds(cfg, prepared, storage_path=str(tmp_path), name="f")
        started = {a["ActorClassName"].rsplit(".", 1)[-1] for a in ray._private.state.actors().values()}
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # a local instance is one machine no cloud preempts: no watcher process per worker group
    assert "TrainController" in started and "PreemptionWatcher" not in started, started
    assert first.metrics["trial_finished"] and first.metrics["epoch"] == 2
    assert not stale.exists()
    assert set(staging_root().iterdir()) <= local_copies  # the workers' copies are gone
    # each fold wrote a checkpoint file after each epoch (both epochs trained)
    assert [first.metrics[f"fold_{i}_cost_rounds"] for i in (0, 1)] == [1, 1]  # before the last
    assert {c.name for c in (tmp_path / "f").glob("checkpoint_*")} == before
    # issue 14.10: a finished fold keeps in the latest checkpoint its best weights and validation
    # probabilities (what final needs), no model or optimiser to train on
    for fold in (0, 1):
        state = torch.load(first.checkpoint_dir / f"fold_{fold}.pt", weights_only=True)
        assert state["done"] and not {"model", "optimizer"} & state.keys()
        assert state["best_state"] and len(state["best_probs"]) == len(state["val_rows"]["path"])
    assert again.checkpoint_dir is not None and again.checkpoint_dir.name in before
    for key in ("mean_val_f1", "epoch", "fold_0_val_f1", "fold_1_val_f1", "trial_finished"):
        assert again.metrics[key] == first.metrics[key], key


@pytest.mark.slow
def test_killed_final_leaves_no_artifact_and_rerun_completes(ray_data, tmp_path):
    art, log = tmp_path / "artifact", tmp_path / "final.log"
    runs = tmp_path / ".artifact.runs"
    cmd = [sys.executable, "-m", "leuk_ray.final", "--smoke-test", "--data", str(ray_data),
           "--out", str(art), "--set", "data.max_images=400", "--set", "train.epochs=12",
           "--no-tta", "--num-cpus", "2"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT,
                                start_new_session=True)
        try:
            seen: set[str] = set()
            _wait(lambda: len(_seen(seen, [{c.name for c in runs.glob("final-*/checkpoint_*")}]))
                  >= 2, 400, proc, log)
            os.killpg(proc.pid, signal.SIGKILL)  # the whole job: driver, Ray and its workers
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    _wait_gone(proc.pid, "RayTrainWorker")
    assert not art.exists()  # nothing that looks like an artifact
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "resuming after epoch" in r.stdout + r.stderr  # the rerun continued the folds
    manifest = json.loads((art / "manifest.json").read_text())
    assert len(manifest["folds"]) == 2 and (art / "fold_1.pt").exists()


@pytest.mark.parametrize("case", ["unwritable", "disk_full"])
def test_bad_storage_fails_before_any_training(synth_root, tmp_path, case):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    storage = blocker / "results" if case == "unwritable" else tmp_path / "results"
    env = {**ENV, "LEUK_RAY_MIN_FREE_MB": "1e12"} if case == "disk_full" else ENV
    r = subprocess.run([sys.executable, "-m", "leuk_ray.search", "--smoke-test", "--data",
                        str(synth_root), "--storage-path", str(storage), "--name", "x"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(storage) in lines[0], r.stderr
    assert ("cannot write there" if case == "unwritable" else "MiB free") in lines[0]
    assert "Started a local Ray" not in r.stdout + r.stderr  # refused before Ray or training


def test_session_pids_finds_only_the_processes_of_the_given_session(tmp_path):
    """Issue 14: a fault test kills a Ray Train worker of the Ray it started, never one that merely
    has the same name elsewhere on the host (another test run, another user's Ray)."""
    sleep = [sys.executable, "-c", "import time; time.sleep(60)", "ray::RayTrainWorker.decoy"]
    outside = subprocess.Popen(sleep)  # same name, in pytest's own session: not the test's Ray
    inside = subprocess.Popen(sleep, start_new_session=True)
    try:
        deadline = time.time() + 10  # until both have exec'd (cmdline filled)
        while not session_pids(inside.pid, "RayTrainWorker") and time.time() < deadline:
            time.sleep(0.05)
        assert session_pids(inside.pid, "RayTrainWorker") == [inside.pid]
        assert outside.pid not in session_pids(inside.pid, "")
        assert session_pids(inside.pid, "no such process name") == []
    finally:
        for p in (outside, inside):
            p.kill()
            p.wait()
