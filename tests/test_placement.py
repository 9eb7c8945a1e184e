"""Issue 14 items 6-8: where fold workers go and what they may wait for.

Fast checks count placements on described nodes and read the Ray Train settings a trainer is
built with. The slow ones start real Ray: a cluster with fake GPUs (``ray.cluster_utils.Cluster``
nodes with ``num_gpus``; CUDA itself is unavailable here, so training runs with
``train.device=cpu`` and the GPU check of item 6 is exercised with ``train.device=auto``), a fold
that stops early while the other trains on, and a trial that exhausts ``ray.max_failures``.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from search_helpers import csv_rows, search_cmd

from leuk_ray.config import load_config
from leuk_ray.errors import UserError
from leuk_ray.placement import MIB, _why_not, trials_that_fit

ROOT = Path(__file__).resolve().parents[1]
DRIVER = {"CPU": 0.01}


# ------------------------------------------------------------------ fast checks (no Ray started)
def test_concurrency_counts_how_workers_pack_onto_nodes_not_cluster_totals():
    """Three 1-CPU nodes hold 3 CPUs, enough for two trials of 2 x 0.6 CPU by the totals (what
    the concurrency was computed from), but a 0.6-CPU worker fits once per node: one trial."""
    nodes = [{"CPU": 1.0}] * 3
    assert trials_that_fit(nodes, {"CPU": 0.6}, 2, "PACK", DRIVER) == 1
    assert trials_that_fit(nodes, {"CPU": 0.45}, 2, "PACK", DRIVER) == 3


def test_gpu_shares_strategies_and_driver_memory():
    head = {"CPU": 2.0, "memory": 20e3 * MIB, "TRAIN_DRIVER": 1.0}
    gpu1 = {"CPU": 4.0, "GPU": 1.0, "memory": 12e3 * MIB}
    nodes = [head, gpu1, gpu1, gpu1]
    whole, half = {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 0.5}
    driver = {"CPU": 0.01, "memory": 2048.0 * MIB, "TRAIN_DRIVER": 0.01}
    assert trials_that_fit(nodes, whole, 3, "PACK", driver) == 1
    assert trials_that_fit(nodes, half, 3, "PACK", driver) == 2      # two folds share a GPU
    assert trials_that_fit(nodes, whole, 3, "STRICT_PACK", driver) == 0  # 1 GPU per node
    assert trials_that_fit(nodes, half, 2, "STRICT_PACK", driver) == 3
    assert trials_that_fit(nodes, half, 3, "STRICT_SPREAD", driver) == 2
    # memory for the drivers on the head bounds the trials too: 5 GiB holds two 2-GiB drivers
    small_head = {**head, "memory": 5 * 1024.0 * MIB}
    cpu_nodes = [small_head, {"CPU": 64.0, "memory": 1e5 * MIB}]
    assert trials_that_fit(cpu_nodes, {"CPU": 1.0}, 2, "PACK", driver) == 2


def test_why_a_trial_does_not_fit_names_what_is_missing():
    nodes = [{"CPU": 1.0}, {"CPU": 2.0, "GPU": 2.0}]
    msg = _why_not(nodes, {"CPU": 1.0, "GPU": 3.0}, 2, "PACK", DRIVER, "the cluster")
    assert "GPU 3 per worker, the most on one node is 2" in msg and "ray.gpus_per_worker" in msg
    msg = _why_not(nodes, {"CPU": 1.0, "GPU": 1.0}, 3, "STRICT_PACK", DRIVER, "the cluster")
    assert "STRICT_PACK" in msg and "holds is 2" in msg
    msg = _why_not([{"CPU": 4.0, "memory": 1024.0 * MIB}], {"CPU": 1.0}, 2, "PACK",
                   {"CPU": 0.01, "memory": 2048.0 * MIB}, "the cluster")
    assert "ray.driver_memory_mb" in msg and "memory 2048 MiB" in msg


def test_autoscaling_is_read_from_the_launcher_config(tmp_path, monkeypatch):
    """The cluster launcher leaves its config on the head: this repository's cluster.yaml scales
    (GPU node types from 0 up); without such a file (a local Ray, a fixed cluster) nothing does.
    A read-only autoscaler runs on fixed clusters too, so its status is no sign."""
    from leuk_ray import placement

    monkeypatch.setattr(placement, "BOOTSTRAP_CONFIG", ROOT / "cluster.yaml")
    types, scales = placement._autoscaler_node_types()  # noqa: SLF001
    assert scales and {"CPU": 4.0, "GPU": 1.0} in types
    monkeypatch.setattr(placement, "BOOTSTRAP_CONFIG", tmp_path / "absent.yaml")
    assert placement._autoscaler_node_types() == ([], False)  # noqa: SLF001


def test_trainer_settings_follow_the_config(ray_data, tmp_path, monkeypatch):
    """Item 7: the gloo timeout was Ray's default 30 min. Item 8: Ray Train's worker-group start
    timeout was its 60 s default and its retries unbounded; placement was always PACK."""
    from leuk_ray.data import prepare_data
    from leuk_ray.fold_trainer import WORKER_START_TIMEOUT_ENV, make_trainer

    monkeypatch.delenv(WORKER_START_TIMEOUT_ENV, raising=False)
    cfg = load_config(smoke=True, overrides=[
        f"data.root={ray_data}", "ray.collective_timeout_s=7200", "ray.worker_start_timeout_s=900",
        "ray.start_retries=3", "ray.placement_strategy=STRICT_SPREAD", "ray.gpus_per_worker=0.5"])
    trainer = make_trainer(cfg, prepare_data(cfg.data), storage_path=str(tmp_path), name="t")
    assert trainer.backend_config.timeout_s == 7200
    assert trainer.scaling_config.placement_strategy == "STRICT_SPREAD"
    assert trainer.scaling_config.resources_per_worker == {"CPU": 0.45, "GPU": 0.5}
    assert trainer.run_config.failure_config.controller_failure_limit == 3
    assert os.environ[WORKER_START_TIMEOUT_ENV] == "900"


def test_final_failures_name_the_setting_that_ran_out():
    """Item 8: placement that never succeeds ended in Ray's generic timeout text after endless
    60 s retries; exhausted restarts ended in Ray's error without naming ray.max_failures."""
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from leuk_ray.fold_trainer import describe_failure

    cfg = load_config(overrides=["ray.gpus_per_worker=1", "ray.cpus_per_worker=4",
                                 "ray.start_retries=1", "ray.worker_start_timeout_s=900"])
    msg = describe_failure(ControllerError(WorkerGroupStartupTimeoutError(3)), cfg)
    assert msg.startswith("the fold workers {'CPU': 4.0, 'GPU': 1.0} could not be placed within "
                          "ray.worker_start_timeout_s=900s in 2 tries"), msg
    err = WorkerGroupError("boom", {0: RuntimeError("Traceback ...\nOSError: disk full"),
                                    1: RuntimeError("x\nRuntimeError: fold 1 waited longer than "
                                                    "ray.collective_timeout_s=5s")})
    msg = describe_failure(err, cfg)
    assert msg == ("the fold workers failed 3 time(s), more than ray.max_failures=2 restarts "
                   "allow: RuntimeError: fold 1 waited longer than ray.collective_timeout_s=5s; "
                   "OSError: disk full")


@pytest.mark.parametrize("override", ["ray.collective_timeout_s=0", "ray.worker_start_timeout_s=1",
                                      "ray.placement_strategy=pack", "ray.driver_memory_mb=-1",
                                      "ray.autoscaling=maybe"])
def test_new_ray_keys_are_validated(override):
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"{key} = .* is (out of range|not allowed)"):
        load_config(overrides=[override])


# ------------------------------------------------------------------------- slow: real Ray clusters
@pytest.fixture
def gpu_cluster(token_auth):
    """A head without GPUs and one node with 2 fake GPUs, joined in this process."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield gpu_node.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()


def _run(ray_data: Path, tmp_path: Path, name: str, *overrides: str):
    from leuk_ray.data import prepare_data
    from leuk_ray.fold_trainer import run_folds

    cfg = load_config(smoke=True, overrides=[f"data.root={ray_data}", "train.epochs=1",
                                             "ray.max_failures=0", *overrides])
    return run_folds(cfg, prepare_data(cfg.data), storage_path=str(tmp_path), name=name)


@pytest.mark.slow
def test_fake_gpus_one_per_fold_shares_pack_and_unusable_cuda_fails(gpu_cluster, ray_data,
                                                                    tmp_path, capsys):
    gpu_node = gpu_cluster
    # one whole GPU per fold: each fold its own GPU id, both on the GPU node
    out = _run(ray_data, tmp_path, "whole", "ray.gpus_per_worker=1", "train.device=cpu").metrics
    assert {out["fold_0_node"], out["fold_1_node"]} == {gpu_node}
    assert sorted([out["fold_0_gpus"], out["fold_1_gpus"]]) == ["0", "1"]
    # half a GPU each, STRICT_PACK: the two folds share one GPU
    out = _run(ray_data, tmp_path, "half", "ray.gpus_per_worker=0.5", "train.device=cpu",
               "ray.placement_strategy=STRICT_PACK").metrics
    assert out["fold_0_gpus"] == out["fold_1_gpus"] and out["fold_0_gpus"] in ("0", "1")
    assert out["trial_finished"]
    # item 6: Ray gave the worker a GPU but CUDA is unusable in it (here: no GPU at all behind the
    # fake one); train.device=auto used to train on the CPU silently. Now the run ends, unretried.
    with pytest.raises(UserError, match=r"ray.gpus_per_worker=0.5 gave fold \d GPU \d on .*but "
                                        r"CUDA is unusable.*train.device=cpu"):
        _run(ray_data, tmp_path, "auto", "ray.gpus_per_worker=0.5", "ray.max_failures=2")
    # item 8: a fold worker no node can hold is refused before Ray Train starts
    with pytest.raises(UserError, match="GPU 3 per worker, the most on one node is 2"):
        _run(ray_data, tmp_path, "big", "ray.gpus_per_worker=3", "train.device=cpu")
    assert not (tmp_path / "big").exists()
    # ... unless the cluster autoscales: then it is a warning (not started here: it would wait)
    from leuk_ray.placement import check_placement

    cfg = load_config(smoke=True, overrides=["ray.gpus_per_worker=3", "ray.autoscaling=true"])
    assert check_placement(cfg, 2) == 1
    assert "warning: no node of the cluster now holds one fold worker" in capsys.readouterr().out


@pytest.mark.slow
def test_a_fold_that_stops_early_waits_for_the_other_under_ray(ray_data, tmp_path):
    """Item 7: the early-stopped fold keeps gathering with the fold that trains on (in the same
    process group, bounded by ray.collective_timeout_s) until both are done."""
    import ray

    from leuk_ray.cluster import PREEMPTION_WATCHER_ENV, connect

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", PREEMPTION_WATCHER_ENV)}
    connect(num_cpus=2)
    try:
        # on this data fold 0 stops after epoch 4 and fold 1 trains to epoch 8 (patience 1)
        out = _run(ray_data, tmp_path, "es", "train.epochs=8", "train.patience=1",
                   "train.lr=3e-3", "train.scheduler=none").metrics
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    epochs = sorted([out["fold_0_epoch"], out["fold_1_epoch"]])
    assert epochs[0] < epochs[1], out  # one fold stopped early and waited for the other
    assert out["trial_finished"] and out["folds_done"] == 2 and out["epoch"] == epochs[1]


@pytest.mark.slow
def test_trial_that_exhausts_max_failures_fails_once_with_the_reason(ray_data, tmp_path):
    """Item 8: a trial whose fold workers keep failing (here: the fold that stopped early waits
    longer than ray.collective_timeout_s for the other's epoch, item 7) fails after
    ray.max_failures restarts, with a reason naming both; Tune's retry (ray.trial_max_failures)
    does not train it again."""
    space = tmp_path / "space.yaml"
    # at 256 px fold 1 stops after epoch 2 and fold 0 trains epoch 3, ~2.7 s: a 1 s wait bound
    # times out there, again after the restart (which resumes after epoch 2)
    space.write_text("params:\n  train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
                     "first:\n  - {train.lr: 1.0e-3}\n")
    storage = tmp_path / "results"
    r = subprocess.run(search_cmd(ray_data, storage, "x", space, "--num-samples", "1",
                                  "--set", "train.epochs=8", "--set", "train.patience=1",
                                  "--set", "train.scheduler=none", "--set", "search.scheduler=none",
                                  "--set", "data.image_size=256",
                                  "--set", "ray.collective_timeout_s=1",
                                  "--set", "ray.max_failures=1",
                                  "--set", "ray.trial_max_failures=1"),
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 1, r.stdout[-4000:] + r.stderr[-3000:]
    (row,) = csv_rows(storage / "x" / "trials.csv")
    assert row["status"] == "failed", row
    assert "failed 2 time(s), more than ray.max_failures=1" in row["reason"], row
    assert "ray.collective_timeout_s=1s" in row["reason"], row
    # Tune retried the trial once (ray.trial_max_failures=1): it failed again at once, untrained
    (trial_dir,) = (storage / "x").glob("trial_fn_*")
    errors = (trial_dir / "error.txt").read_text()
    assert errors.count("Failure #") == 2 and errors.count("ray.max_failures=1") == 2, errors
    assert r.stdout.count("fold 0: resuming") <= 1  # one Ray Train restart, none after Tune's
