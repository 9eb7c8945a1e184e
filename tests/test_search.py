"""The search end to end on a real local Ray, real Optuna and real timm (no mocks).

Slow: each search starts Ray and a TorchTrainer per trial. Trials run one at a time here so the
ASHA decisions are reproducible (CPU training is deterministic). The searches are machinery: they
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
from search_helpers import csv_rows, fold_checkpoints, search_cmd

ROOT = Path(__file__).resolve().parents[1]

# seed 000-like good point first, then a learning rate too small to learn anything in 6 epochs:
# ASHA must stop that one at its first rung (epoch 2) because it is below the first trial there.
SPACE = """
params:
  train.lr:              {type: loguniform, low: 1.0e-7, high: 1.0e-2}
  train.focal_gamma:     {type: uniform, low: 0.0, high: 3.0}
  train.label_smoothing: {type: uniform, low: 0.0, high: 0.2}
  model.dropout:         {type: uniform, low: 0.0, high: 0.5}
first:
  - {train.lr: 3.0e-3, train.focal_gamma: 1.5, train.label_smoothing: 0.05, model.dropout: 0.2}
  - {train.lr: 1.0e-7, train.focal_gamma: 1.5, train.label_smoothing: 0.05, model.dropout: 0.2}
"""


def _cmd(data: Path, storage: Path, name: str, space: Path, *extra: str) -> list[str]:
    return search_cmd(data, storage, name, space, "--set", "data.max_images=160", *extra)


def _ended(path: Path) -> int:
    return sum(r["status"] in ("completed", "pruned", "failed") for r in csv_rows(path))


# what a search prints (our lines, one prefix each): anything else on its console is a library's
OURS = ("search '", "data:", "Ray:", "resuming", "[trial ", "status:", "warning:", "note:",
        "2 trials", "best trial", "  train.", "results:", "trials:", "best config:", "dashboard:",
        "report:", "curves:", "live view:", "next:", "search interrupted")


def top_id(rows: list[dict]) -> str:
    done = [x for x in rows if x["status"] == "completed"]
    return max(done, key=lambda x: float(x["mean_val_f1"]))["trial_id"]


def check_dashboard(exp: Path, n_trials: int) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "leuk_ray.dashboard", str(exp), "--port",
                             str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline, studies = time.time() + 60, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as f:
                    studies = json.load(f)["study_summaries"]
                break
            except OSError:
                time.sleep(0.5)
        assert studies, proc.stdout.read() if proc.poll() is not None else "no answer"
        (study,) = studies
        assert study["study_name"] == exp.name
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}",
                                    timeout=10) as f:
            detail = json.load(f)
        assert len(detail["trials"]) == n_trials
        assert {t["state"] for t in detail["trials"]} <= {"Complete", "Pruned"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def check_tensorboard(exp: Path, rows: list[dict]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = ("train_loss", "val_loss", "val_f1", "val_auc", "lr")
    expected = {f"fold_{i}/{c}" for i in (0, 1) for c in curves}
    expected |= {"mean/val_f1_best", "mean/val_f1", "mean/val_loss", "mean/val_auc"}
    for row in rows:
        (trial_dir,) = [d for d in exp.glob(f"trial_fn_{row['trial_id']}_*") if d.is_dir()]
        steps: dict[str, set[int]] = {}
        for events in sorted(trial_dir.glob("events.out.tfevents.*")):  # one file per run of it
            acc = EventAccumulator(str(events))
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                steps.setdefault(tag, set()).update(e.step for e in acc.Scalars(tag))
        assert set(steps) == expected, (row["trial_id"], sorted(steps))
        assert steps["mean/val_f1_best"] == set(range(1, int(row["epochs"]) + 1)), steps


@pytest.mark.slow
def test_search_prunes_resumes_after_the_experiment_moved_and_writes_results(ray_data, tmp_path):
    """A search interrupted after its first trial (Ctrl+C), moved, and resumed from its new place;
    its storage given as a URI (issue 14.1/14.2: file://, the code path of s3://: a local mirror,
    uploads through pyarrow). The resumed search keeps its ASHA rungs (the tiny learning rate it
    runs is pruned against the first trial's), finished trials are not trained again, and
    everything it writes is beside the moved experiment, nothing where it first ran. Then all it
    wrote is checked: trials.csv, the study, optuna_trials.csv, fold checkpoints, the report and
    its plots, TensorBoard curves, the live view, best_config.yaml, folds.csv, a quiet console."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    first, storage = tmp_path / "a", tmp_path / "b"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_cmd(ray_data, f"file://{first}", "s1", space, "--num-samples", "2"),
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)
    deadline = time.time() + 400
    while _ended(first / "s1" / "trials.csv") < 1 and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(1)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl+C: Tune saves its state and stops
    proc.wait(timeout=120)
    assert (first / "s1" / "config.yaml").is_file()  # pushed through the URI
    before = csv_rows(first / "s1" / "trials.csv")
    ended_before = {r["trial_id"]: r for r in before if r["status"] in ("completed", "pruned")}
    assert ended_before, before
    lines_before = fold_checkpoints(first / "s1")

    storage.mkdir()
    os.replace(first / "s1", storage / "s1")
    exp = storage / "s1"
    # a search whose name exists is refused without --resume
    again = subprocess.run(_cmd(ray_data, f"file://{storage}", "s1", space), capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr

    r = subprocess.run(_cmd(ray_data, f"file://{storage}", "s1", space, "--resume"),
                       capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert not (first / "s1").exists()  # nothing written where the search first ran
    rows = csv_rows(exp / "trials.csv")
    # exactly --num-samples trials, none repeated, finished ones kept as they were
    assert len(rows) == 2 and len({row["trial_id"] for row in rows}) == 2
    checkpoints = fold_checkpoints(exp)
    for tid, row in ended_before.items():
        now = next(x for x in rows if x["trial_id"] == tid)
        assert now["mean_val_f1"] == row["mean_val_f1"] and now["status"] == row["status"]
        if row["status"] == "completed":
            assert checkpoints[tid] == lines_before[tid]  # not rerun
    # issue 14.10: what the search keeps of its trials' fold checkpoints once they ended: a
    # completed trial one checkpoint of metrics (no weights: final retrains), a pruned one nothing
    for row in rows:
        if row["status"] == "pruned":
            assert row["trial_id"] not in checkpoints, row
        else:
            kept = max(c for c in checkpoints[row["trial_id"]]  # the latest (timestamp names)
                       if (exp / "folds" / row["trial_id"] / c).is_dir())
            for fold in (0, 1):
                state = torch.load(exp / "folds" / row["trial_id"] / kept / f"fold_{fold}.pt",
                                   weights_only=True)
                assert state["done"] and state["best_metrics"]["f1"] == pytest.approx(
                    float(row[f"fold_{fold}_val_f1"]))
                assert state.get("model") is None and state["best_state"] is None
    # every trial has a score per fold; the tiny learning rate was pruned by ASHA
    for row in rows:
        assert row["status"] in ("completed", "pruned"), row
        assert row["fold_0_val_f1"] and row["fold_1_val_f1"]
        f = [float(row["fold_0_val_f1"]), float(row["fold_1_val_f1"])]
        assert float(row["mean_val_f1"]) == pytest.approx(sum(f) / 2)
    tiny = next(x for x in rows if float(x["train.lr"]) < 1e-6)
    assert tiny["status"] == "pruned" and "ASHA" in tiny["reason"]
    assert int(tiny["epochs"]) < 6
    # Optuna was told the truth: ASHA-stopped trials are PRUNED, not COMPLETE
    ot = csv_rows(exp / "optuna_trials.csv")
    states = {round(float(o["params_train/lr"]), 12): o["state"] for o in ot}
    for row in rows:
        expected = "COMPLETE" if row["status"] == "completed" else "PRUNED"
        assert states[round(float(row["train.lr"]), 12)] == expected
    # issue 15: the study in study.db holds the same trials as trials.csv, in the same states and
    # with the same scores, continued (not restarted) by --resume; each carries its Tune id,
    # status, reason, epochs and fold scores
    import optuna

    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{exp / 'study.db'}")
    by_tune = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert sorted(by_tune) == sorted(row["trial_id"] for row in rows)
    for row in rows:
        t = by_tune[row["trial_id"]]
        assert t.state.name == {"completed": "COMPLETE", "pruned": "PRUNED"}[row["status"]]
        assert t.value == pytest.approx(float(row["mean_val_f1"]))
        assert t.user_attrs["status"] == row["status"] and t.user_attrs["reason"] == row["reason"]
        assert t.user_attrs["epochs"] == int(row["epochs"]) == max(t.intermediate_values)
        assert t.user_attrs["fold_val_f1"] == pytest.approx(
            [float(row["fold_0_val_f1"]), float(row["fold_1_val_f1"])])
    # the search report, with its plots
    report = (exp / "search_report.md").read_text()
    assert f"`{top_id(rows)}`" in report and "## Learning curves" in report
    for png in ("history.png", "curves.png", "importance.png", "slices.png"):
        assert (exp / png).stat().st_size > 5000, png
    # the console of a search: only leuk-ray's lines (no Ray, Tune or Optuna chatter, no colours)
    out = r.stdout + r.stderr
    for noise in ("(RayTrainWorker", "(raylet)", "PlacementGroupCleaner", "\x1b[",
                  "Configuration for experiment", "INFO", "results with TensorBoard",
                  "to see TensorBoard", "[I 20"):
        assert noise not in out, (noise, out[-3000:])
    assert all(line.startswith(OURS) for line in out.splitlines() if line.strip()), out[-3000:]
    # the live view: optuna-dashboard on loopback answers with this study and its trials
    check_dashboard(exp, n_trials=2)
    # TensorBoard: one command printed; each trial's event files hold its training curves at the
    # absolute epoch (continued across the resume), and nothing that is not a training curve
    assert r.stdout.count("tensorboard --logdir") == 1
    check_tensorboard(exp, rows)
    # best_config.yaml: the full resolved config of the best completed trial plus its CV score
    best = yaml.safe_load((exp / "best_config.yaml").read_text())
    done = [x for x in rows if x["status"] == "completed"]
    top = max(done, key=lambda x: float(x["mean_val_f1"]))
    assert best["trial_id"] == top["trial_id"]
    assert best["cv_score"] == pytest.approx(float(top["mean_val_f1"]))
    assert best["train"]["lr"] == pytest.approx(float(top["train.lr"]))
    assert best["model"]["backbone"] == "test_efficientnet" and best["data"]["folds"] == 2
    assert len(best["cv_fold_scores"]) == 2
    assert "best trial" in r.stdout and str(exp / "best_config.yaml") in r.stdout
    assert best["search_dir"] == f"file://{exp}"
    # the exact split is recorded, and it is grouped by subject
    folds = csv_rows(exp / "folds.csv")
    by_subject: dict[str, set[str]] = {}
    for f in folds:
        by_subject.setdefault(f["subject"], set()).add(f["fold"])
    assert all(len(v) == 1 for v in by_subject.values())
    json.dumps(best)  # plain YAML types only


# ------------------------------------------------------------------ fast checks (no Ray started)
def test_fold_checkpoints_of_pruned_and_failed_trials_are_dropped_after_they_ended(tmp_path):
    """Issue 14.10: folds/<trial> was never cleaned. A pruned or failed trial's fold checkpoints
    go once its workers are surely gone (DROP_AFTER_S after it ended); a completed trial's stay
    (a resumed search must find it finished), as do those of trials still running."""
    from leuk_ray.results import DROP_AFTER_S, SearchProgress, drop_fold_checkpoints
    from leuk_ray.storage import RunFiles

    files = RunFiles(str(tmp_path), "s")
    for tid in ("old", "new", "done", "running"):
        (tmp_path / "s" / "folds" / tid / "checkpoint_000001").mkdir(parents=True)
        (tmp_path / "s" / "folds" / tid / "checkpoint_000001" / "fold_0.pt").write_bytes(b"x")
    progress = SearchProgress([], 2)
    progress.files = files  # bound from the trials' storage in a search
    progress.to_drop = {"old": time.time() - DROP_AFTER_S - 1, "new": time.time()}
    progress.drop_ended()
    assert sorted(fold_checkpoints(tmp_path / "s")) == ["done", "new", "running"]
    assert progress.to_drop.keys() == {"new"}
    progress.drop_ended(0)  # when the search ends
    assert sorted(fold_checkpoints(tmp_path / "s")) == ["done", "running"]
    drop_fold_checkpoints(f"file://{tmp_path}/s/folds", "running")  # a URI: through pyarrow
    drop_fold_checkpoints(f"{tmp_path}/s/folds", "gone")  # nothing there: nothing to do
    assert sorted(fold_checkpoints(tmp_path / "s")) == ["done"]


def test_sampler_sets_constant_liar_explicitly():
    """Issue 14.11: parallel trials must not depend on Optuna's default (changed in Optuna 5)."""
    from leuk_ray.study import make_sampler

    assert make_sampler(3)._constant_liar is True  # noqa: SLF001


def test_new_search_stores_data_root_absolute(synth_root, tmp_path, monkeypatch):
    """Issue 14.11: a relative --data is stored resolved, so best_config.yaml works from any
    folder (`final --from` run elsewhere)."""
    from leuk_ray.config import load_config
    from leuk_ray.search import _setup

    monkeypatch.chdir(synth_root.parent)
    cfg, _, _, _ = _setup(load_config(None, [f"data.root={synth_root.name}"], smoke=True),
                          space=None, storage_path=str(tmp_path / "results"), name="s",
                          num_samples=None, resume=False, smoke=True)
    assert cfg.data.root == str(synth_root.resolve())


def test_num_samples_zero_is_refused(synth_root, tmp_path):
    """Issue 14.11: --num-samples 0 was silently replaced by search.num_samples."""
    from leuk_ray.config import load_config
    from leuk_ray.errors import UserError
    from leuk_ray.search import run_search

    cfg = load_config(None, [f"data.root={synth_root}"], smoke=True)
    with pytest.raises(UserError, match="--num-samples 0: use a positive number"):
        run_search(cfg, storage_path=str(tmp_path / "r"), name="s", num_samples=0, smoke=True)
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_retired_search_metric_is_ignored_with_a_warning(tmp_path, capsys):
    """Issue 14.11: search.metric was a knob nothing read. It is gone; the configs older versions
    saved (which all carry it) still load, with a warning."""
    from leuk_ray.config import Config, config_from_yaml_with_extras

    old = tmp_path / "best_config.yaml"
    old.write_text("cv_score: 0.8\nsearch: {metric: mean_val_f1, seed: 3}\n")
    cfg, extras = config_from_yaml_with_extras(old)
    assert cfg.search.seed == 3 and extras == {"cv_score": 0.8}
    assert not hasattr(Config().search, "metric")
    err = capsys.readouterr().err
    assert "search.metric is no longer used" in err and str(old) in err


@pytest.mark.slow
def test_search_with_a_boolean_choice_writes_a_typed_best_config(synth_root, tmp_path):
    """Issue 14.3: the best config came from trials.csv text, so a searched boolean became the
    string 'True' and the end of the search failed (`train.amp = 'True' has the wrong type`).
    Issue 14.11: a relative --data is stored absolute in best_config.yaml."""
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  train.amp: {type: choice, values: [true, false]}\n"
                     "first:\n  - {train.amp: true}\n")
    storage = tmp_path / "results"
    data = os.path.relpath(synth_root, ROOT)
    r = subprocess.run(search_cmd(Path(data), storage, "b1", space, "--num-samples", "1",
                                  "--set", "train.epochs=2"),
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    best = yaml.safe_load((storage / "b1" / "best_config.yaml").read_text())
    assert best["train"]["amp"] is True
    assert best["data"]["root"] == str(synth_root.resolve())
    assert isinstance(best["cv_score"], float) and len(best["cv_fold_scores"]) == 2
    rows = csv_rows(storage / "b1" / "trials.csv")
    assert [row["status"] for row in rows] == ["completed"] and best["trial_id"] == rows[0]["trial_id"]
    assert "train.amp=True" in r.stdout


@pytest.mark.slow
def test_reproducible_searches_agree_and_run_search_is_a_python_api(ray_data, tmp_path):
    """Issue 15: with search.reproducible=true (one trial at a time, deterministic kernels; it
    overrides the max_concurrent asked for) two runs of one search agree trial by trial: the
    same parameters (two ``first:`` points and one Optuna sample), the same ASHA decisions, the
    same scores, so the same winner. Issue 14 (shape): one of the two runs is ``run_search``,
    what the command does callable from a notebook: it returns the trials' typed rows and the
    best config as a ``Config``, not text to parse, and agrees with the command."""
    import ray

    from leuk_ray.config import Config, load_config
    from leuk_ray.search import SearchResult, run_search

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    storage = tmp_path / "results"
    sets = ["train.epochs=4", "search.seed=3", "search.reproducible=true",
            "search.max_concurrent=2"]
    cfg = load_config(None, [f"data.root={ray_data}", *sets], smoke=True)
    try:
        res = run_search(cfg, space=space, storage_path=str(storage), name="r1", num_samples=3,
                         num_cpus=2, smoke=True)
    finally:
        ray.shutdown()
    assert isinstance(res, SearchResult) and not res.interrupted
    assert res.uri == str(storage / "r1") and len(res.rows) == 3
    assert res.count("completed") + res.count("pruned") == 3 and res.count("pruned") >= 1
    assert isinstance(res.best_config, Config) and res.best is not None
    assert isinstance(res.best["mean_val_f1"], float) and isinstance(res.best["train.lr"], float)
    assert res.best_config.train.lr == res.best["train.lr"]
    saved = yaml.safe_load((storage / "r1" / "best_config.yaml").read_text())
    assert saved["trial_id"] == res.best["trial_id"]
    assert cfg.search.name == "" and cfg.search.max_concurrent == 2  # the caller's config is kept

    r = subprocess.run(search_cmd(ray_data, storage, "r2", space, "--num-samples", "3",
                                  *[a for s in sets for a in ("--set", s)]),
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    runs = {}
    keys = ("train.lr", "train.focal_gamma", "train.label_smoothing", "model.dropout", "status",
            "epochs", "mean_val_f1")
    for name in ("r1", "r2"):
        resolved = yaml.safe_load((storage / name / "config.yaml").read_text())
        assert resolved["search"]["max_concurrent"] == 1
        assert str(resolved["train"]["deterministic"]).lower() == "true"
        rows = csv_rows(storage / name / "trials.csv")
        runs[name] = ([tuple(row[k] for k in keys) for row in rows],
                      yaml.safe_load((storage / name / "best_config.yaml").read_text()))
    (rows1, best1), (rows2, best2) = runs["r1"], runs["r2"]
    assert len(rows1) == 3 and rows1 == rows2
    assert best1["cv_score"] == best2["cv_score"] and best1["train"] == best2["train"]
    assert best1["model"] == best2["model"]


@pytest.mark.slow
def test_a_mistake_every_trial_hits_in_its_workers_is_one_error_line(synth_root, tmp_path):
    """Issue 13: a user error raised inside the fold workers (here a searched combination the
    engine refuses: a Keras head's BatchNorm with one image per step) failed every trial and the
    search ended with 'no trial completed' and exit 1. It is one error line and exit 2, and the
    trials it ran are still in trials.csv."""
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  model.head: {type: choice, values: [keras]}\n"
                     "  train.batch_size: {type: choice, values: [1]}\n")
    storage = tmp_path / "results"
    r = subprocess.run(search_cmd(synth_root, storage, "m1", space, "--num-samples", "2",
                                  "--set", "train.epochs=2"),
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 2, r.stdout[-4000:] + r.stderr[-4000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: every trial failed (2; "), r.stderr
    assert "train.batch_size = 1 with model.head = keras" in lines[0]
    rows = csv_rows(storage / "m1" / "trials.csv")
    assert [row["status"] for row in rows] == ["failed", "failed"], rows
    assert "no trial completed" not in r.stdout
