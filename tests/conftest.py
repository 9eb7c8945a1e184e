"""Shared fixtures: the real C-NMC sample beside the checkout and small synthetic trees."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CNMC = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnmc"


@pytest.fixture(autouse=True, scope="session")
def _hash_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Keep the index hash cache out of the user's ~/.cache during tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LEUK_RAY_CACHE_DIR", str(tmp_path_factory.mktemp("leuk_ray_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def cnmc_root() -> Path:
    """The real 1,253-image C-NMC sample at ../shared/data/cnmc, for tests about real images
    (skipped when absent, or when LEUK_RAY_NO_SHARED=1 hides it to test as a fresh clone would)."""
    if os.environ.get("LEUK_RAY_NO_SHARED") == "1":
        pytest.skip("LEUK_RAY_NO_SHARED=1: the real C-NMC sample is hidden")
    if not (CNMC / "train").is_dir():
        pytest.skip(f"real C-NMC sample not found at {CNMC} (expected ../shared/data/cnmc beside "
                    "the checkout, with train/ and test/)")
    return CNMC


@pytest.fixture
def token_auth():
    """Token auth for a Ray cluster this process starts (``ray.cluster_utils``) and joins.

    Ray 2.60 gives a new local cluster token auth, and once this process has joined one (an
    in-process ``ray.init()`` of an earlier test) its own gRPC servers keep asking callers for the
    token: a cluster started without it then cancels every actor the process creates ("cancelled
    before it started running"). So such clusters use token auth too, whatever test ran before,
    as a real 2.60 cluster does; the process's cached Ray config is refreshed to match.
    """
    from ray._private.authentication.authentication_token_setup import (
        ensure_token_if_auth_enabled,
    )
    from ray._raylet import Config

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")
    ensure_token_if_auth_enabled(create_token_if_missing=True)  # ~/.ray/auth_token, as ray.init
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        Config.initialize("")


@pytest.fixture(scope="session")
def _synth_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from leuk_ray.data.synth import make_synthetic
    return make_synthetic(tmp_path_factory.mktemp("synth_master") / "data", n=120, size=48, seed=3)


@pytest.fixture(scope="session")
def ray_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data of the Ray machinery tests (search, final, faults, multi-node), made once and only
    read: 200 synthetic PNG cells at 48 px in the seed layout, 167 train (6+6 subjects) and 33 test
    (2+2 subjects), so those tests run on a fresh clone without ../shared."""
    from leuk_ray.data.synth import make_synthetic
    return make_synthetic(tmp_path_factory.mktemp("ray_data") / "data", n=200, size=48, seed=5,
                          ext=".png")


@pytest.fixture
def synth_root(_synth_master: Path, tmp_path: Path) -> Path:
    """A fresh copy of a small synthetic seed-layout tree (120 images, 48 px) that a test may edit."""
    return Path(shutil.copytree(_synth_master, tmp_path / "synth"))
