"""ONNX Runtime vs torch eager on the CPU: the exported ensemble graph against predict's path.

The same artifact (random-init ``--backbone`` x ``--folds`` at ``--size`` px, per-fold
temperatures) and the same uint8 images, already decoded and resized (what both take):

- torch eager: ``leuk_ray.predict.predict_images`` (normalisation, fold models, calibration), fp32;
- ONNX Runtime: the file ``python -m leuk_ray.export`` writes, CPUExecutionProvider.

Both with ``--threads`` intra-op threads; images/s at each batch size, best of ``--repeats`` passes
over ``--n`` real C-NMC cells, after one warm-up pass. Also checks the two agree within 1e-4.

    python bench/onnx_vs_torch.py [--n 64] [--batches 1,16] [--threads 2] [--size 192]
Last line: ONNX Runtime / torch eager images/s at each batch size.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _serving import bench_artifact, cell_paths

from leuk_ray.artifact import load_artifact
from leuk_ray.data import read_image
from leuk_ray.export import export_onnx
from leuk_ray.predict import predict_images


def best_rate(fn, images: np.ndarray, batch: int, repeats: int) -> tuple[float, np.ndarray]:
    out = np.concatenate([fn(images[i:i + batch]) for i in range(0, len(images), batch)])  # warm
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            fn(images[i:i + batch])
        best = max(best, len(images) / (time.perf_counter() - t0))
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--work", default=None, help="where the artifact and ONNX file go")
    a = ap.parse_args()
    import onnxruntime as ort
    work = Path(a.work or tempfile.mkdtemp(prefix="onnx_bench_"))
    art = bench_artifact(work / f"{a.backbone}-{a.size}-{a.folds}", a.backbone, a.size, a.folds)
    torch.set_num_threads(a.threads)
    ens = load_artifact(art, device="cpu")
    t0 = time.perf_counter()
    onnx_path = export_onnx(ens, work / "model.onnx")
    print(f"exported {onnx_path} ({onnx_path.stat().st_size / 2**20:.1f} MiB) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    prep = ens.preprocessing
    images = np.stack([read_image(p, prep.image_size, prep.interpolation)
                       for p in cell_paths(a.n)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def run_torch(x: np.ndarray) -> np.ndarray:
        return np.array([r.prob_all for r in predict_images(ens, [""] * len(x), x,
                                                            batch_size=len(x))])

    def run_ort(x: np.ndarray) -> np.ndarray:
        return sess.run(["prob_all"], {"images": x})[0]

    print(f"{a.backbone} x {a.folds} folds at {a.size} px, {a.n} real C-NMC cells, "
          f"{a.threads} threads, torch {torch.__version__}, onnxruntime {ort.__version__}")
    print("| batch | torch eager img/s | ONNX Runtime img/s | ratio | max abs diff |")
    print("|---|---|---|---|---|")
    ratios = []
    for b in (int(x) for x in a.batches.split(",")):
        rt, pt = best_rate(run_torch, images, b, a.repeats)
        ro, po = best_rate(run_ort, images, b, a.repeats)
        diff = float(np.abs(pt - po).max())
        assert diff <= 1e-4, f"ONNX Runtime differs from torch by {diff}"
        ratios.append((b, ro / rt))
        print(f"| {b} | {rt:.1f} | {ro:.1f} | {ro / rt:.2f}x | {diff:.1e} |", flush=True)
    print("ONNX Runtime / torch eager images/s on CPU: " +
          ", ".join(f"batch {b}: {r:.2f}x" for b, r in ratios))


if __name__ == "__main__":
    main()
