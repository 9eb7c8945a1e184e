"""The node-level decoded-image cache (leuk_ray.data.cache): built once, shared, with fallbacks."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from leuk_ray.config import DataConfig
from leuk_ray.data import cache, fold_datasets, prepare_data, read_image
from leuk_ray.data.cache import CachedImages, image_cache, image_cache_dir, node_cache

SIZE = 32


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LEUK_RAY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


def dcfg(root: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), image_size=SIZE, folds=3, **kw)


def _files(d: Path) -> list[Path]:
    return sorted(d.glob("*.npy"))


def test_built_once_then_reused(synth_root: Path, cache_dir: Path, capsys) -> None:
    d = dcfg(synth_root)
    p = prepare_data(d)
    before = cache.DECODE_COUNT
    images, bad = image_cache(d, p)
    assert cache.DECODE_COUNT - before == len(p.train) and not bad
    assert isinstance(images, CachedImages) and len(images) == len(p.train)
    assert image_cache_dir() == cache_dir
    (npy,) = _files(cache_dir)
    assert images.source == f"node cache {npy}"
    assert len(list(cache_dir.glob("*.json"))) == 1
    st = npy.stat()
    assert "image cache: decoded" in capsys.readouterr().out

    again, bad2 = image_cache(d, p)
    assert cache.DECODE_COUNT - before == len(p.train)  # nothing decoded the second time
    st2 = npy.stat()
    assert (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns) and _files(cache_dir) == [npy]
    assert "image cache: opened" in capsys.readouterr().out
    first = p.train["path"].iloc[0]
    assert isinstance(again[first], np.memmap) and not again[first].flags.writeable
    assert np.array_equal(again[first], images[first])

    # A changed file (new size/mtime) gives a new key: a new file, decoded again.
    Path(first).write_bytes(Path(first).read_bytes())
    os.utime(first, ns=(st.st_mtime_ns + 10**9, st.st_mtime_ns + 10**9))
    image_cache(d, p)
    assert len(_files(cache_dir)) == 2 and cache.DECODE_COUNT - before == 2 * len(p.train)


def _race(paths: list[str], barrier, queue) -> None:
    barrier.wait()
    images, bad, built = node_cache(paths, SIZE)
    arr = images.store.array
    queue.put((built, hashlib.sha256(np.ascontiguousarray(arr)).hexdigest(), arr.shape))


def test_two_processes_racing_build_it_once(synth_root: Path, cache_dir: Path) -> None:
    paths = prepare_data(dcfg(synth_root)).train["path"].tolist()
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(paths, barrier, queue)) for _ in range(2)]
    for pr in procs:
        pr.start()
    got = [queue.get(timeout=60) for _ in procs]
    for pr in procs:
        pr.join(timeout=60)
        assert pr.exitcode == 0
    assert sorted(b for b, _, _ in got) == [False, True]  # exactly one of them decoded
    assert got[0][1:] == got[1][1:] and got[0][2] == (len(paths), SIZE, SIZE, 3)
    assert len(_files(cache_dir)) == 1 and not list(cache_dir.glob(".*tmp*"))
    images, _, built = node_cache(paths, SIZE)
    assert not built and hashlib.sha256(np.ascontiguousarray(images.store.array)).hexdigest() == \
        got[0][1]


def test_bad_image_is_listed_not_fatal(synth_root: Path, cache_dir: Path) -> None:
    d = dcfg(synth_root)
    p = prepare_data(d)
    broken = p.train["path"].iloc[3]
    Path(broken).write_bytes(b"BM" + b"\0" * 100)  # indexed as fine, then damaged
    images, bad = image_cache(d, p)
    assert bad == [broken] and broken not in images and len(images) == len(p.train) - 1
    tr, va = fold_datasets(p, 0, d, images=images, bad=bad)
    assert len(tr) + len(va) == len(p.train) - 1 and broken not in tr.paths + va.paths
    assert any("undecodable" in w for w in p.warnings)
    _, bad_again = image_cache(d, p)  # the sidecar remembers it
    assert bad_again == [broken]


def test_over_budget_falls_back_with_message(synth_root: Path, cache_dir: Path, capsys) -> None:
    d = dcfg(synth_root, cache="auto", cache_mb=0)
    p = prepare_data(d)
    images, bad = image_cache(d, p)
    out = capsys.readouterr().out
    assert images is None and bad == []
    assert out.count("\n") == 1 and "image cache off" in out and "data.cache_mb = 0" in out
    assert not cache_dir.exists()
    tr, _ = fold_datasets(p, 0, d, images=images)
    assert tr[0][0].shape == (SIZE, SIZE, 3)  # decoded per item

    on = dcfg(synth_root, cache="on", cache_mb=0)  # on: built anyway, said so
    images, _ = image_cache(on, p)
    assert isinstance(images, CachedImages) and len(_files(cache_dir)) == 1
    assert "built anyway" in capsys.readouterr().out
    assert image_cache(dcfg(synth_root, cache="off"), p) == (None, [])


def test_unwritable_cache_dir_falls_back(synth_root: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("LEUK_RAY_CACHE_DIR", str(blocker))  # mkdir fails, even for root
    d = dcfg(synth_root)
    p = prepare_data(d)
    images, bad = image_cache(d, p)
    out = capsys.readouterr().out
    assert "cannot use the node cache" in out and "LEUK_RAY_CACHE_DIR" in out
    assert out.count("\n") == 1
    assert isinstance(images, CachedImages) and images.source == "memory" and not bad
    assert len(images) == len(p.train)
    path = p.train["path"].iloc[0]
    assert np.array_equal(images[path], read_image(path, SIZE))
    _, va = fold_datasets(p, 0, d, images=images)
    assert va[0][0].shape == (SIZE, SIZE, 3)


def test_dataset_over_memmap_matches_decoding(synth_root: Path, cache_dir: Path) -> None:
    d = dcfg(synth_root)
    p = prepare_data(d)
    images, bad = image_cache(d, p)
    plain_tr, plain_va = fold_datasets(p, 1, d, seed=7)
    tr, va = fold_datasets(p, 1, d, images=images, bad=bad, seed=7)
    assert tr.paths == plain_tr.paths and va.paths == plain_va.paths
    for i in range(len(va)):
        assert torch.equal(va[i][0], plain_va[i][0]) and va[i][1] == plain_va[i][1]
    for i in range(len(tr)):  # same seed, same order of draws: the same augmented tensors
        assert torch.equal(tr[i][0], plain_tr[i][0])

    # The dataset pickles as a file name plus row numbers, not as the images.
    blob = pickle.dumps(va)
    assert len(blob) < cache.cache_bytes(len(va), SIZE) // 4
    va2 = pickle.loads(blob)
    assert all(torch.equal(va2[i][0], va[i][0]) for i in range(len(va)))

    # DataLoader worker processes read it too (forked here; spawned workers unpickle as above).
    loader = torch.utils.data.DataLoader(va, batch_size=8, num_workers=2)
    xs = torch.cat([x for x, _ in loader])
    assert torch.equal(xs, torch.stack([va[i][0] for i in range(len(va))]))


def test_the_interpolation_is_part_of_the_key(synth_root: Path, cache_dir: Path) -> None:
    """The backbone's interpolation (timm's name) resizes the cached pixels: another one is
    another cache file, and per-item decoding resizes the same way."""
    d = dcfg(synth_root)
    p = prepare_data(d)
    paths = p.train["path"].tolist()
    cubic, _ = image_cache(d, p, "bicubic")
    linear, _ = image_cache(d, p, "bilinear")
    assert len(_files(cache_dir)) == 2
    first = paths[0]
    assert np.array_equal(cubic[first], read_image(first, SIZE, "bicubic"))
    assert np.array_equal(linear[first], read_image(first, SIZE, "bilinear"))
    assert not np.array_equal(cubic[first], linear[first])
    _, _, built = node_cache(paths, SIZE, interpolation="bilinear")
    assert not built
    _, va = fold_datasets(p, 0, d, interpolation="bilinear")  # no cache: decoded per item
    assert va.interpolation == "bilinear"
    assert np.array_equal(va[0][0].numpy(), read_image(va.paths[0], SIZE, "bilinear"))
