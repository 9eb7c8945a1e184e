"""Fold checkpoint staging: copies left by dead fold workers are swept, live ones never."""
from __future__ import annotations

import os
import tempfile

import pytest
from search_helpers import stage_in_a_process_that_exits

from leuk_ray.staging import STAGING, new_staging_dir, staging_root, sweep_stale_staging


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_staging_dirs_live_in_one_folder_and_name_their_owner(tmp_root):
    d = new_staging_dir(3)
    assert d.parent == staging_root() == tmp_root / STAGING
    assert d.name.startswith("fold3_") and f"_{os.getpid()}_" in d.name


def test_sweep_removes_only_copies_of_exited_processes_on_this_host(tmp_root):
    dead = stage_in_a_process_that_exits(tmp_root, fold=1)
    assert dead.parent == staging_root() and (dead / "fold_1.pt").exists()
    mine = new_staging_dir(0)  # a live process (this one): its upload may still be reading
    (mine / "fold_0.pt").write_bytes(b"y")
    # another container sharing the temp dir: its process ids mean nothing here
    other_host = staging_root() / f"fold0_otherhost_{dead.name.split('_')[2]}_abc"
    other_host.mkdir()
    stranger = staging_root() / "notes"  # not ours
    stranger.mkdir()
    assert sweep_stale_staging() == [dead]
    assert not dead.exists()
    assert (mine / "fold_0.pt").exists() and other_host.exists() and stranger.exists()
    assert sweep_stale_staging() == []


def test_sweep_without_a_staging_folder_does_nothing(tmp_root):
    assert sweep_stale_staging() == [] and not staging_root().exists()
