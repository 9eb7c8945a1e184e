"""Atomic writes (leuk_ray.atomic): readers see the old file or the new one, never a part."""
from __future__ import annotations

import pytest

from leuk_ray.atomic import replacing, write_text


def test_a_write_replaces_the_file_only_when_it_completes(tmp_path):
    target = tmp_path / "sub" / "trials.csv"
    write_text(target, "old\n")                        # creates the folder too
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            assert target.read_text() == "old\n"       # not visible before the block ends
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    with replacing(target, fsync=True) as tmp:
        tmp.write_text("new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["trials.csv"]  # no temp left
