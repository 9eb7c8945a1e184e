"""GPU benchmark: EfficientNet-B3 at 300 px, AMP, channels-last, on one GPU.

Only where CUDA is available (never in CI; it prints that no GPU is available and exits 0 otherwise):
1. training and inference images/s of one model (random uint8 batches normalised on the device by
   to_model_input, bf16/fp16 autocast as the engine picks, channels_last);
2. k folds sharing the GPU (k processes training at once, as Ray's fractional GPU workers do:
   ray.gpus_per_worker = 1/k) vs one fold alone: aggregate training images/s;
3. the input pipeline (CellDataset over the node cache, seed000 augmentations, DataLoader with
   --workers processes, pinned memory) images/s vs what the GPU consumes in training.

    python bench/gpu.py [--batch 64] [--steps 30] [--folds 3] [--workers N] [--data DIR]
Last line: the k-folds-shared / one-fold aggregate training throughput ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_rate(batch: int, steps: int, size: int = 300, train: bool = True) -> float:
    from leuk_ray.config import ModelConfig
    from leuk_ray.data.transforms import resolve_preprocessing, to_model_input
    from leuk_ray.engine import autocast, make_grad_scaler, select_amp_dtype
    from leuk_ray.model import create_model

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    amp = select_amp_dtype(dev, True)
    model = create_model(ModelConfig(backbone="efficientnet_b3", pretrained=False)).to(dev)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = make_grad_scaler(dev, amp)
    x8 = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8).pin_memory()  # BHWC
    y = torch.randint(0, 2, (batch,), device=dev)
    model.train(train)
    prep = resolve_preprocessing("efficientnet_b3", size)

    def step() -> None:
        x = to_model_input(x8, dev, channels_last=True, prep=prep)
        if train:
            with autocast(dev, amp):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            with torch.no_grad(), autocast(dev, amp):
                model(x)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def _fold_proc(batch: int, steps: int, q) -> None:
    q.put(train_rate(batch, steps))


def shared_rate(k: int, batch: int, steps: int) -> float:
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_fold_proc, args=(batch, steps, q)) for _ in range(k)]
    for p in ps:
        p.start()
    rates = [q.get() for _ in ps]
    for p in ps:
        p.join()
    return sum(rates)  # each process's rate over overlapping windows: an approximation


def pipeline_rate(data: Path, batch: int, workers: int, n_batches: int) -> float:
    from leuk_ray.data.cache import node_cache
    from leuk_ray.data.dataset import CellDataset
    from leuk_ray.data.transforms import train_transform
    from leuk_ray.engine import make_loader

    files = sorted(str(p) for p in (data / "train").rglob("*.png"))
    images, _, _ = node_cache(files, 300)
    ds = CellDataset(files, [0] * len(files), 300, train_transform("seed000", 300, seed=0),
                     images=images.rows(files))
    loader = make_loader(ds, batch_size=batch, device=torch.device("cuda"), num_workers=workers,
                         train=True, generator=torch.Generator().manual_seed(0))
    seen, t0, it = 0, None, 0
    while it < n_batches:
        for x, _ in loader:
            x = x.cuda(non_blocking=True)
            if t0 is None:
                t0 = time.perf_counter()
            else:
                seen += x.shape[0]
            it += 1
            if it >= n_batches:
                break
    torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cnmc"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no GPU is available (torch.cuda.is_available() is False): GPU benchmark not run")
        return
    name = torch.cuda.get_device_name(0)
    print(f"GPU benchmark on {name}: EfficientNet-B3 (random init), 300 px, AMP, channels_last, "
          f"batch {a.batch}")
    tr = train_rate(a.batch, a.steps)
    inf = train_rate(a.batch * 2, a.steps, train=False)
    print(f"one model: training {tr:.0f} images/s, inference {inf:.0f} images/s")
    shared = shared_rate(a.folds, a.batch, a.steps)
    print(f"{a.folds} folds sharing the GPU: {shared:.0f} images/s in all "
          f"({shared / a.folds:.0f} each) vs one fold alone {tr:.0f}")
    pipe = pipeline_rate(Path(a.data), a.batch, a.workers, 40)
    print(f"input pipeline ({a.workers} loader workers, node cache, seed000): {pipe:.0f} images/s "
          f"vs training consumption {tr:.0f} images/s ({pipe / tr:.2f}x)")
    print(f"k folds shared / one fold, aggregate training images/s: {shared / tr:.2f}x")


if __name__ == "__main__":
    main()
