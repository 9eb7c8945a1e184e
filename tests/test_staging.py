"""Fold checkpoint staging: copies left by dead fold workers are swept, live ones never."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import pytest
from search_helpers import stage_in_a_process_that_exits

from leuk_ray import staging
from leuk_ray.staging import STAGING, new_staging_dir, staging_root, sweep_stale_staging


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_staging_dirs_live_in_a_private_folder_and_name_their_owner(tmp_root):
    d = new_staging_dir(3)
    assert d.parent == staging_root() == tmp_root / f"{STAGING}_{os.getuid()}"
    assert staging_root().stat().st_mode & 0o777 == 0o700
    assert d.name.startswith("fold3_") and f"_{os.getpid()}_" in d.name


def test_sweep_removes_only_copies_of_exited_processes_on_this_host(tmp_root):
    dead = stage_in_a_process_that_exits(tmp_root, fold=1)
    assert dead.parent == staging_root() and (dead / "fold_1.pt").exists()
    mine = new_staging_dir(0)  # a live process (this one): its upload may still be reading
    (mine / "fold_0.pt").write_bytes(b"y")
    # another container sharing the temp dir: its process ids mean nothing here
    other_host = staging_root() / f"fold0_otherhost_{dead_pid()}_abc"
    other_host.mkdir()
    stranger = staging_root() / "notes"  # not ours
    stranger.mkdir()
    assert sweep_stale_staging() == [dead]
    assert not dead.exists()
    assert (mine / "fold_0.pt").exists() and other_host.exists() and stranger.exists()
    assert sweep_stale_staging() == []


def test_host_names_and_suffixes_with_underscores_are_parsed(tmp_root, monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "gpu_node_7.cluster")
    mine = new_staging_dir(0)
    stale = staging_root() / f"fold2_{staging._host()}_{dead_pid()}_a_b_"
    stale.mkdir()
    assert sweep_stale_staging() == [stale] and mine.exists()


def test_a_staging_folder_that_is_not_ours_is_neither_used_nor_swept(tmp_root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    planted = elsewhere / f"fold0_{staging._host()}_{dead_pid()}_x"
    planted.mkdir()
    staging_root().symlink_to(elsewhere, target_is_directory=True)
    d = new_staging_dir(1)  # falls back to a private temp dir of its own
    assert d.parent == tmp_root and d.name.startswith("leuk_ray_fold1_")
    assert sweep_stale_staging() == [] and planted.exists()


def test_sweep_without_a_staging_folder_does_nothing(tmp_root):
    assert sweep_stale_staging() == [] and not staging_root().exists()
