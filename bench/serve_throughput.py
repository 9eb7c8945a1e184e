"""Ray Serve vs predict: images/s on the same images and the same machine.

The same artifact (random-init ``--backbone`` x ``--folds`` at ``--size`` px, per-fold
temperatures) and the same ``--n`` real C-NMC cells (files as on disk, 450 px PNGs):

- predict: ``leuk_ray.predict.predict_paths`` in this process (decode, resize, forward), batch
  ``--predict-batch``, best of ``--repeats`` passes after a warm-up pass;
- serve: ``leuk_ray.serve`` on a local Ray (one replica with ``--cpus`` CPUs), ``--clients``
  client threads posting ``--per-request`` image(s) per request over HTTP on 127.0.0.1 until all
  ``--n`` are answered (upload, multipart parsing, decode, resize, batching across clients,
  forward), for each ``--max-batch`` setting (images per forward pass); best of ``--repeats``.

The clients, Serve's HTTP proxy and the replica share the machine, as predict has it alone.

    python bench/serve_throughput.py [--n 128] [--max-batch 1,8,32] [--clients 8] [--cpus 2]
Last line: serve / predict images/s at each max_batch setting.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch
from _serving import bench_artifact, cell_paths

from leuk_ray.artifact import load_artifact
from leuk_ray.predict import predict_paths


def predict_rate(art: Path, paths: list[Path], batch: int, repeats: int) -> float:
    ens = load_artifact(art, device="cpu")
    predict_paths(ens, paths[:batch], batch_size=batch)  # warm-up
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        rows, _ = predict_paths(ens, paths, batch_size=batch)
        best = max(best, len(rows) / (time.perf_counter() - t0))
    return best


def serve_pass(url: str, files: list[tuple[str, bytes]], clients: int, per_request: int) -> float:
    """All ``files`` through ``clients`` threads, ``per_request`` per POST; images/s."""
    chunks = [files[i:i + per_request] for i in range(0, len(files), per_request)]
    lock = threading.Lock()
    errors: list[str] = []

    def client() -> None:
        with requests.Session() as s:
            while True:
                with lock:
                    if not chunks:
                        return
                    chunk = chunks.pop()
                r = s.post(f"{url}/predict", timeout=600,
                           files=[("files", (n, d, "application/octet-stream")) for n, d in chunk])
                if r.status_code != 200 or len(r.json()["predictions"]) != len(chunk):
                    with lock:
                        errors.append(f"{r.status_code}: {r.text[:200]}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} request(s) failed, e.g. {errors[0]}")
    return len(files) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--max-batch", default="1,8,32", help="serve settings to measure")
    ap.add_argument("--predict-batch", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-request", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=2, help="the replica's CPUs (torch threads)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--work", default=None, help="where the artifact goes")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="serve_bench_"))
    art = bench_artifact(work / f"{a.backbone}-{a.size}-{a.folds}", a.backbone, a.size, a.folds)
    paths = cell_paths(a.n)
    files = [(p.name, p.read_bytes()) for p in paths]
    torch.set_num_threads(a.cpus)
    base = predict_rate(art, paths, a.predict_batch, a.repeats)
    print(f"{a.backbone} x {a.folds} folds at {a.size} px, {a.n} real C-NMC cells, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    print(f"predict (in-process, batch {a.predict_batch}, {a.cpus} threads): {base:.1f} images/s",
          flush=True)

    import ray
    from ray import serve

    from leuk_ray.serve import build_app
    ray.init(num_cpus=max(a.cpus, 1), include_dashboard=False, dashboard_host="127.0.0.1",
             log_to_driver=False)
    url = f"http://127.0.0.1:{a.port}"
    results = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": a.port})
        print("| max_batch | clients x images/request | serve img/s | serve / predict |")
        print("|---|---|---|---|")
        for mb in (int(x) for x in a.max_batch.split(",")):
            serve.run(build_app({"model": str(art), "max_batch": mb, "cpus_per_replica": a.cpus,
                                 "max_ongoing_requests": max(64, a.clients * 2)}),
                      name="bench", route_prefix="/")
            serve_pass(url, files[:a.clients * a.per_request], a.clients, a.per_request)  # warm
            rate = max(serve_pass(url, files, a.clients, a.per_request)
                       for _ in range(a.repeats))
            results.append((mb, rate / base))
            print(f"| {mb} | {a.clients} x {a.per_request} | {rate:.1f} | {rate / base:.2f}x |",
                  flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("serve / predict images/s: " +
          ", ".join(f"max_batch {mb}: {r:.2f}x" for mb, r in results))


if __name__ == "__main__":
    main()
