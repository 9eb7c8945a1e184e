"""Memory-mapped node cache vs the Ray object store for the decoded images (why memmap).

Runs on the CPU at small size: the first 300 training images of the real C-NMC sample at 300 px
(77 MiB). Measures, for a reader that needs the whole array (a fold worker):
- memmap: build the file once (decode, not repeated later), then open it in a new process and
  touch every page (warm page cache: no copy, shared);
- object store: ray.put of the decoded array (a copy into plasma, once per owner), then ray.get
  in a task on the same node (zero-copy) touching every page. Ray is imported only here.
The object dies with its owner (the process that put it), so each trial would pay the decode and
the put again unless a detached actor owned it; the file outlives every process.

    python bench/cache_store.py
Last line: ray.put + first get time / memmap open-and-touch time.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402

from leuk_ray.data.cache import node_cache  # noqa: E402

TOUCH = """
import sys, time, numpy as np
t0 = time.perf_counter(); a = np.load(sys.argv[1], mmap_mode="r")
s = int(a[:, ::16, ::16].sum()); print(time.perf_counter() - t0)
"""


def main() -> None:
    data = ROOT.parent / "shared" / "data" / "cnmc" / "train"
    files = sorted(str(p) for p in data.rglob("*.png"))[:300]
    tmp = Path(tempfile.mkdtemp(prefix="leuk_bench_store_"))
    t0 = time.perf_counter()
    images, _, _ = node_cache(files, 300, directory=tmp)
    build = time.perf_counter() - t0
    path = images.store.path
    opens = [float(subprocess.check_output([sys.executable, "-c", TOUCH, path]).decode())
             for _ in range(3)]
    arr = np.ascontiguousarray(images.store.array)
    print(f"CPU benchmark, small size: {len(files)} real images at 300 px, {arr.nbytes / 2**20:.0f} MiB")
    print(f"memmap: build once {build:.2f}s (decode + write); open + touch in a new process "
          f"{min(opens) * 1000:.1f} ms (best of 3)")

    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    def touch(a):
        t0 = time.perf_counter()
        s = int(a[:, ::16, ::16].sum())
        return time.perf_counter() - t0, a.flags.writeable, s

    t0 = time.perf_counter()
    ref = ray.put(arr)
    put = time.perf_counter() - t0
    ray.get(touch.remote(ref))  # warm the worker
    t0 = time.perf_counter()
    inner, writeable, _ = ray.get(touch.remote(ref))
    get = time.perf_counter() - t0
    ray.shutdown()
    print(f"object store: ray.put {put * 1000:.1f} ms (a copy into plasma); a task's get + touch "
          f"{get * 1000:.1f} ms round trip ({inner * 1000:.1f} ms inside, zero-copy, writeable "
          f"{writeable}); needs a running Ray, lost with its owner")
    print(f"object store put+get / memmap open+touch: {(put + get) / min(opens):.2f}x")


if __name__ == "__main__":
    main()
