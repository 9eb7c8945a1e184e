"""Multi-node operation, simulated with ray.cluster_utils.Cluster: several Ray nodes on this
machine (fractional CPUs), a search joining through --address, fold workers on different nodes,
and storage that every node must share.

Slow: starts a three-node Ray cluster. Machinery: runs on the synthetic ``ray_data`` tree.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def three_nodes(monkeypatch):
    from ray.cluster_utils import Cluster

    # the nodes start from this process's environment: without token auth, whatever an earlier
    # ray.init() in this pytest process left behind (it sets RAY_AUTH_MODE=token here)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _search(data: Path, storage: Path, name: str, address: str, *extra: str):
    cmd = [sys.executable, "-m", "leuk_ray.search", "--smoke-test", "--data", str(data),
           "--storage-path", str(storage), "--name", name, "--address", address,
           "--num-samples", "1", "--set", "train.epochs=2", "--set", "data.max_images=120",
           # 0.6 CPU per fold worker: at most one fold fits on each 1-CPU node
           "--set", "ray.cpus_per_worker=0.6", *extra]
    # cluster_utils starts its nodes without token auth; a driver that asks for token auth there
    # gets its trial actors cancelled (seen with Ray 2.60), so the driver follows the cluster
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)


@pytest.mark.slow
def test_search_on_three_nodes_spreads_folds_and_needs_shared_storage(three_nodes, ray_data,
                                                                      tmp_path):
    address = three_nodes.address
    # a plain local directory is node-local on a real cluster: refused before any training
    r = _search(ray_data, tmp_path / "local", "s", address)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "node-local path" in r.stderr and "s3://" in r.stderr
    assert not (tmp_path / "local" / "s").exists()

    # declared shared (as an NFS mount would be): every node sees it, the search runs
    storage = tmp_path / "shared"
    r = _search(ray_data, storage, "s", address, "--set", "ray.shared_storage=true")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    (trial,) = (storage / "s").glob("trial_fn_*")
    last = json.loads((trial / "result.json").read_text().splitlines()[-1])
    nodes = {last["fold_0_node"], last["fold_1_node"]}
    assert len(nodes) == 2, "the two fold workers ran on the same node"
    assert nodes <= {n["NodeID"] for n in _alive_nodes(address)}
    # the fold checkpoints of both workers are merged in the shared storage
    ckpts = sorted(p for p in (storage / "s" / "folds").glob("*/checkpoint_*") if p.is_dir())
    assert ckpts and {p.name for p in ckpts[-1].iterdir()} >= {"fold_0.pt", "fold_1.pt"}


def _alive_nodes(address: str) -> list[dict]:
    import ray

    ray.init(address=address)
    try:
        return [n for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()
