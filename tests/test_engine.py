"""Engine: training, non-finite guard, checkpoints, resume, determinism, AMP, metrics, CLI."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import f1_score
from torch.utils.data import Dataset

from leuk_ray.config import Config
from leuk_ray.engine import (FoldRun, autocast, dihedral_views, epoch_seed, fit_fold,
                             load_checkpoint, make_grad_scaler, make_scheduler, predict_probs,
                             save_checkpoint, select_amp_dtype)
from leuk_ray.errors import NonFiniteLossError, UserError
from leuk_ray.metrics import classification_metrics

REPO = Path(__file__).resolve().parents[1]


class Cells(Dataset):
    """Synthetic uint8 cells: ALL rows bright, HEM rows dark (learnable in a few steps)."""

    def __init__(self, n: int = 16, size: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = np.arange(n, dtype=np.int64) % 2
        x = torch.randint(0, 100, (n, size, size, 3), generator=g, dtype=torch.uint8)  # HWC
        x[torch.from_numpy(self.labels == 1)] += 120
        self.images = x
        self.subjects = [f"S{i % 4}" for i in range(n)]
        self.paths = [f"/data/img_{i}.bmp" for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def tiny_cfg(**train) -> Config:
    cfg = Config()
    cfg.model.backbone = "test_efficientnet"
    cfg.model.pretrained = False
    cfg.data.num_workers = 0
    cfg.data.image_size = 32
    cfg.train.epochs = 3
    cfg.train.batch_size = 8
    cfg.train.lr = 3e-3
    cfg.train.patience = 0
    cfg.train.device = "cpu"
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def quiet(msg: str) -> None:
    pass


def strip_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------ training
def test_tiny_model_overfits_a_handful_of_images():
    ds = Cells(16)
    res = fit_fold(tiny_cfg(epochs=12), ds, ds, log=quiet)
    losses = [r["train_loss"] for r in res.history]
    assert losses[-1] < losses[0] / 5
    assert res.history[0]["val_f1"] < 1.0
    assert res.best_metrics["f1"] == 1.0 and res.best_metrics["accuracy"] == 1.0
    assert res.oof_probs.shape == (16,)
    assert ((res.oof_probs >= 0.5) == (ds.labels == 1)).all()
    assert res.best_metrics["per_subject_accuracy"] == {"S0": 1.0, "S1": 1.0, "S2": 1.0, "S3": 1.0}
    assert set(res.history[0]) >= {"epoch", "train_loss", "val_loss", "val_f1", "val_accuracy",
                                   "val_auc", "lr", "nonfinite_steps", "seconds", "best_epoch",
                                   "best_val_f1"}


def test_early_stopping_and_best_epoch():
    ds = Cells(16)
    logs: list[str] = []
    res = fit_fold(tiny_cfg(epochs=30, patience=2), ds, ds, log=logs.append)
    assert len(res.history) < 30                     # reached F1 = 1.0, which cannot be beaten
    assert res.history[-1]["early_stopped"]
    assert len(res.history) == res.best_epoch + 2
    assert "early stop" in logs[-1] and logs[0].startswith("fold 0 epoch 1/30 train_loss")


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine", "plateau", "none"])
def test_schedulers(scheduler):
    cfg = tiny_cfg(scheduler=scheduler, epochs=2, lr=1e-2, warmup_pct=0.25)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.train.lr)
    sched, per_batch = make_scheduler(cfg, opt, steps_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None and per_batch:
            sched.step()
    if scheduler == "onecycle":
        assert lrs[0] == pytest.approx(1e-2 / 25) and max(lrs) == pytest.approx(1e-2)
        assert int(np.argmax(lrs)) == 4 and lrs[-1] < 1e-4
    elif scheduler == "cosine":
        assert lrs[0] == pytest.approx(1e-2) and lrs[-1] < 1e-3
    else:
        assert not per_batch and set(lrs) == {1e-2}
    if scheduler == "plateau":
        for _ in range(4):
            sched.step(0.5)  # no improvement: x plateau_factor after plateau_patience epochs
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-2)


def test_onecycle_with_warmup_of_exactly_one_step():
    cfg = tiny_cfg(scheduler="onecycle", epochs=1, warmup_pct=0.1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched, _ = make_scheduler(cfg, opt, steps_per_epoch=10)  # torch would divide by zero
    for _ in range(10):
        opt.step()
        sched.step()


def test_keras_head_adamax_plateau_trains():
    cfg = tiny_cfg(optimizer="adamax", scheduler="plateau", epochs=2)
    cfg.model.head = "keras"
    ds = Cells(17)  # 17 % 8 == 1: the last batch of 1 is dropped (BatchNorm1d)
    run = FoldRun(cfg, ds, ds, log=quiet)
    assert run.train_loader.drop_last and run.steps_per_epoch == 2
    assert not run.val_loader.drop_last
    while not run.done:
        row = run.step()
    assert math.isfinite(row["train_loss"]) and row["nonfinite_steps"] == 0
    assert isinstance(run.optimizer, torch.optim.Adamax)


def test_input_errors():
    ds = Cells(16)
    with pytest.raises(UserError, match="training set has 1 image"):
        FoldRun(tiny_cfg(), torch.utils.data.Subset(ds, [0]), ds, log=quiet)
    bad = Cells(16)
    bad.labels = bad.labels.copy()
    bad.labels[0] = -1
    with pytest.raises(UserError, match=r"labels \[-1\]"):
        FoldRun(tiny_cfg(), bad, ds, log=quiet)
    cfg = tiny_cfg(batch_size=1)
    cfg.model.head = "keras"
    with pytest.raises(UserError, match="train.batch_size = 1 with model.head = keras"):
        FoldRun(cfg, ds, ds, log=quiet)


# ------------------------------------------------------------------------------ non-finite guard
def test_nonfinite_loss_trips_after_max_nonfinite():
    ds = Cells(32)  # 4 batches per epoch
    run = FoldRun(tiny_cfg(max_nonfinite=3), ds, ds, log=quiet)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.model.register_forward_hook(lambda m, i, out: out * float("nan"))
    with pytest.raises(NonFiniteLossError,
                       match=r"fold 0: 3 consecutive non-finite losses at epoch 1 \(lr=.*lower "
                             r"train.lr, or clip gradients harder"):
        run.step()
    after = run.model.state_dict()
    for k, v in before.items():
        if "running" not in k and "num_batches" not in k:  # BN statistics move in the forward
            assert torch.equal(v, after[k]), k


def test_single_nonfinite_loss_is_skipped_and_counted():
    ds = Cells(32)
    run = FoldRun(tiny_cfg(max_nonfinite=2, epochs=1), ds, ds, log=quiet)
    calls = {"n": 0}

    def once(module, inputs, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 2 else out

    run.model.register_forward_hook(once)
    row = run.step()
    assert row["nonfinite_steps"] == 1 and math.isfinite(row["train_loss"])
    assert run.nonfinite_run == 0  # reset by the next good step


def test_nonfinite_gradient_trips_too():
    ds = Cells(32)
    run = FoldRun(tiny_cfg(max_nonfinite=2), ds, ds, log=quiet)
    p = next(run.model.parameters())
    p.register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive .*last: gradient norm"):
        run.step()


# --------------------------------------------------------------------- checkpoints and resume
def test_checkpoint_round_trip_weights_only(tmp_path):
    ds = Cells(16)
    run = FoldRun(tiny_cfg(epochs=2), ds, ds, fold=1, log=quiet)
    run.step()
    path = tmp_path / "sub" / "state.pt"
    save_checkpoint(run.state_dict(), path)
    assert not list(path.parent.glob(".*tmp*"))
    state = torch.load(path, map_location="cpu", weights_only=True)  # plain types only
    assert state["epoch"] == 1 and state["fold"] == 1 and len(state["history"]) == 1
    state = load_checkpoint(path)
    again = FoldRun(tiny_cfg(epochs=2), ds, ds, fold=1, state=state, log=quiet)
    assert again.epoch == 1 and not again.done and again.best_epoch == 1
    assert_same_weights(again.model.state_dict(), run.model.state_dict())
    assert again.history == run.history
    with pytest.raises(UserError, match="belongs to fold 1, not fold 0"):
        FoldRun(tiny_cfg(epochs=2), ds, ds, fold=0, state=state, log=quiet)
    with pytest.raises(UserError, match=r"train.lr = 0.003, this run has 0.001"):
        FoldRun(tiny_cfg(epochs=2, lr=1e-3), ds, ds, fold=1, state=state, log=quiet)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="bad.pt: not a readable leuk-ray checkpoint"):
        load_checkpoint(bad)


@pytest.mark.parametrize("head,optimizer,scheduler", [("mlp", "adamw", "onecycle"),
                                                      ("keras", "adamax", "plateau")])
def test_resume_equals_uninterrupted_run(tmp_path, head, optimizer, scheduler):
    ds, val = Cells(24, seed=1), Cells(16, seed=2)
    cfg = tiny_cfg(epochs=3, optimizer=optimizer, scheduler=scheduler, plateau_patience=0)
    cfg.model.head = head
    full = fit_fold(cfg, ds, val, log=quiet)

    first = FoldRun(cfg, ds, val, log=quiet)
    first.step()
    save_checkpoint(first.state_dict(), tmp_path / "s.pt")
    del first
    torch.manual_seed(999)  # whatever happened in between must not matter
    resumed = fit_fold(cfg, ds, val, state=load_checkpoint(tmp_path / "s.pt"), log=quiet)

    assert strip_time(resumed.history) == strip_time(full.history)
    assert resumed.best_epoch == full.best_epoch
    assert resumed.best_metrics == full.best_metrics
    np.testing.assert_array_equal(resumed.oof_probs, full.oof_probs)
    assert_same_weights(resumed.best_state, full.best_state)


def test_same_seed_same_run_other_seed_other_run():
    ds = Cells(16)
    a = fit_fold(tiny_cfg(epochs=2), ds, ds, log=quiet)
    b = fit_fold(tiny_cfg(epochs=2), ds, ds, log=quiet)
    assert strip_time(a.history) == strip_time(b.history)
    assert_same_weights(a.best_state, b.best_state)
    c = fit_fold(tiny_cfg(epochs=2, seed=7), ds, ds, log=quiet)
    assert strip_time(c.history) != strip_time(a.history)
    assert epoch_seed(42, 0, 1) != epoch_seed(42, 0, 2) != epoch_seed(42, 1, 2)


def test_resume_is_exact_with_the_real_dataset_and_augmentations(tmp_path):
    """CellDataset + albumentations (seeded per epoch by the engine), 2 epochs vs 1 + resume."""
    from leuk_ray.data import fold_datasets, prepare_data
    from leuk_ray.data.synth import make_synthetic
    cfg = tiny_cfg(epochs=2)
    cfg.data.root = str(make_synthetic(tmp_path / "data", n=40, size=32))
    cfg.data.folds = 2
    prepared = prepare_data(cfg.data)
    train_ds, val_ds = fold_datasets(prepared, 1, cfg.data)
    assert train_ds.transform is not None
    full = fit_fold(cfg, train_ds, val_ds, fold=1, log=quiet)
    first = FoldRun(cfg, train_ds, val_ds, fold=1, log=quiet)
    first.step()
    state = first.state_dict()
    resumed = fit_fold(cfg, *fold_datasets(prepared, 1, cfg.data), fold=1, state=state, log=quiet)
    assert strip_time(resumed.history) == strip_time(full.history)
    assert_same_weights(resumed.best_state, full.best_state)


def test_on_epoch_callback_gets_metrics_and_run(tmp_path):
    ds = Cells(16)
    seen = []

    def on_epoch(metrics, run):
        seen.append(metrics["epoch"])
        save_checkpoint(run.state_dict(), tmp_path / "state.pt")

    fit_fold(tiny_cfg(epochs=2), ds, ds, on_epoch=on_epoch, log=quiet)
    assert seen == [1, 2] and load_checkpoint(tmp_path / "state.pt")["done"] is True


def _nbytes(obj: object) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def _saved(state: dict) -> dict:
    """``state`` as a checkpoint file holds it (the optimiser's tensors are the live ones)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_checkpoint_holds_what_resume_needs_and_no_more():
    """Issue 14.10: every epoch, every fold saved its model, a second copy of the best weights,
    the optimiser and the probabilities, also after it had finished (~4 copies of the weights).
    Now: a training fold keeps one copy of the weights (the best ones are the model's while the
    last epoch is the best) plus the optimiser; a finished fold keeps its best weights and
    probabilities only, or (a search) its metrics only. Resume stays exact from every epoch."""
    ds, val = Cells(24, seed=1), Cells(16, seed=2)
    cfg = tiny_cfg(epochs=3)
    full = fit_fold(cfg, ds, val, log=quiet)
    run = FoldRun(cfg, ds, val, log=quiet)
    weights = _nbytes(run.model.state_dict())
    states = []
    while not run.done:
        run.step()
        states.append(_saved(run.state_dict()))
    optimizer = _nbytes(run.optimizer.state_dict())
    for e, st in enumerate(states[:-1], 1):
        assert "model" in st and "optimizer" in st and not st["done"]
        # one copy of the weights: the best epoch's are stored only when they are not the model's
        assert st["best_is_model"] == (st["best_epoch"] == e)
        assert (st["best_state"] is None) == st["best_is_model"]
        if st["best_is_model"]:
            assert _nbytes(st) < weights + optimizer + weights / 4
        resumed = fit_fold(cfg, ds, val, state=st, log=quiet)  # exact from every epoch
        assert strip_time(resumed.history) == strip_time(full.history)
        assert_same_weights(resumed.best_state, full.best_state)
        np.testing.assert_array_equal(resumed.oof_probs, full.oof_probs)
    done = states[-1]
    assert done["done"] and not {"model", "optimizer", "scheduler", "scaler"} & done.keys()
    assert_same_weights(done["best_state"], full.best_state)
    assert _nbytes(done) < weights * 1.25
    again = FoldRun(cfg, ds, val, state=done, log=quiet)  # a finished fold: nothing to train
    assert again.done and strip_time(again.history) == strip_time(full.history)
    assert_same_weights(again.result().best_state, full.best_state)
    np.testing.assert_array_equal(again.result().oof_probs, full.oof_probs)
    metrics_only = run.state_dict(best_weights=False)  # what a search trial's finished fold keeps
    assert metrics_only["best_state"] is None and metrics_only["best_probs"] is None
    assert _nbytes(metrics_only) < weights / 10
    assert FoldRun(cfg, ds, val, state=metrics_only, log=quiet).best_metrics == full.best_metrics
    unfinished = {k: v for k, v in states[0].items() if k != "model"}
    with pytest.raises(UserError, match="unfinished run holds no model weights"):
        FoldRun(cfg, ds, val, state=unfinished, log=quiet)


# ------------------------------------------------------------------------------ mixed precision
def test_amp_dtype_selection():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert select_amp_dtype(cpu, True) is None
    assert select_amp_dtype(cuda, False, bf16_supported=True) is None
    assert select_amp_dtype(cuda, True, bf16_supported=True) is torch.bfloat16
    assert select_amp_dtype(cuda, True, bf16_supported=False) is torch.float16
    assert make_grad_scaler(cpu, torch.float16).is_enabled()
    assert not make_grad_scaler(cpu, torch.bfloat16).is_enabled()
    assert not make_grad_scaler(cpu, None).is_enabled()
    run = FoldRun(tiny_cfg(), Cells(16), Cells(16), log=quiet)  # CPU: fp32, no scaler
    assert run.amp_dtype is None and not run.scaler.is_enabled() and not run.channels_last


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_path_on_cpu(tmp_path, dtype):
    """The CUDA AMP code path (autocast + GradScaler for fp16), run on CPU autocast."""
    ds = Cells(16)
    run = FoldRun(tiny_cfg(epochs=2), ds, ds, log=quiet)
    run.amp_dtype = dtype
    run.scaler = make_grad_scaler(run.device, dtype)
    with autocast(run.device, dtype):
        assert run.model(torch.zeros(2, 3, 32, 32)).dtype == dtype
    row = run.step()
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
    state = run.state_dict()
    if dtype == torch.float16:
        assert state["scaler"]["scale"] > 0  # the scaler ran and its state is saved
    save_checkpoint(state, tmp_path / "amp.pt")
    resumed = FoldRun(tiny_cfg(epochs=2), ds, ds, state=load_checkpoint(tmp_path / "amp.pt"),
                      log=quiet)
    resumed.amp_dtype, resumed.scaler = dtype, make_grad_scaler(run.device, dtype)
    resumed.load_state_dict(state)
    assert resumed.scaler.get_scale() == run.scaler.get_scale()


def test_fp16_scaler_skips_are_counted_as_nonfinite_steps():
    ds = Cells(16)
    run = FoldRun(tiny_cfg(epochs=1), ds, ds, log=quiet)
    run.amp_dtype = torch.float16
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # first steps overflow
    row = run.step()
    assert row["scaler_skips"] >= 1 and row["nonfinite_steps"] == row["scaler_skips"]
    assert run.scaler.get_scale() < 2.0**40


# ----------------------------------------------------------------------------------- prediction
def test_predict_probs_and_tta():
    ds = Cells(10)
    torch.manual_seed(0)
    run = FoldRun(tiny_cfg(), ds, ds, log=quiet)
    model = run.model.eval()
    prep = run.preprocessing
    p = predict_probs(model, ds, device="cpu", batch_size=4, prep=prep)
    assert p.shape == (10,) and ((p >= 0) & (p <= 1)).all()
    p_tta = predict_probs(model, ds, device="cpu", batch_size=4, prep=prep, tta=True)
    from leuk_ray.data.transforms import to_model_input
    x = to_model_input(ds.images, "cpu", prep=prep)
    views = dihedral_views(x)
    assert len(views) == 8
    assert not any(torch.equal(views[i], views[j]) for i in range(8) for j in range(i))
    with torch.no_grad():
        want = torch.stack([torch.softmax(model(v), 1)[:, 1] for v in views]).mean(0)
    np.testing.assert_allclose(p_tta, want.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(p, p_tta)


# ------------------------------------------------------------- preprocessing from the backbone
@pytest.mark.parametrize("backbone, mean, std", [
    ("tf_efficientnet_lite0", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ("test_efficientnet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])
def test_training_and_prediction_normalise_with_the_backbones_mean_and_std(backbone, mean, std):
    """What the network sees for a black pixel is -mean/std of the backbone's timm data config
    (tf_efficientnet_lite0 wants 0.5/0.5, not ImageNet's constants), in training, validation and
    predict_probs alike."""
    import timm

    from leuk_ray.data.transforms import resolve_preprocessing
    ds = Cells(8)
    ds.images[:, 0, 0] = 0  # a black pixel at (0, 0) of every image
    cfg = tiny_cfg(epochs=1)
    cfg.model.backbone = backbone
    torch.manual_seed(0)
    run = FoldRun(cfg, ds, ds, log=quiet)
    prep = run.preprocessing
    assert prep == resolve_preprocessing(backbone, 32)
    assert (prep.mean, prep.std, prep.image_size) == (pytest.approx(mean), pytest.approx(std), 32)
    timm_cfg = timm.data.resolve_model_data_config(run.model.backbone)  # the model's own view
    assert (prep.mean, prep.std, prep.interpolation) == \
        (tuple(timm_cfg["mean"]), tuple(timm_cfg["std"]), timm_cfg["interpolation"])
    seen: list[torch.Tensor] = []
    run.model.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, :, 0, 0].clone()))
    run.step()                                                          # train + validate
    n_fit = len(seen)
    predict_probs(run.model, ds, device="cpu", batch_size=4, prep=prep)
    assert n_fit > 0 and len(seen) > n_fit
    want = -torch.tensor(mean) / torch.tensor(std)
    for x in seen:
        torch.testing.assert_close(x, want.expand_as(x), atol=1e-5, rtol=0)


def test_default_backbone_keeps_imagenet_statistics():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from leuk_ray.data.transforms import preprocessing_for
    prep = preprocessing_for(Config())  # efficientnet_b3 at data.image_size 300
    assert prep.mean == IMAGENET_DEFAULT_MEAN and prep.std == IMAGENET_DEFAULT_STD
    assert (prep.image_size, prep.interpolation) == (300, "bicubic")


def test_datasets_resized_otherwise_than_the_backbone_wants_are_refused():
    from leuk_ray.data import CellDataset
    ds = Cells(8)
    paths, labels = ds.paths, ds.labels
    other = CellDataset(paths, labels, 32, images=ds.images.numpy(), interpolation="bilinear")
    with pytest.raises(ValueError, match="bilinear.*bicubic"):
        FoldRun(tiny_cfg(), other, ds, log=quiet)
    smaller = CellDataset(paths, labels, 16, images=ds.images.numpy())
    with pytest.raises(ValueError, match="16 px"):
        FoldRun(tiny_cfg(), ds, smaller, log=quiet)


def test_inference_settings_follow_train_amp():
    """predict on CUDA: channels_last, bf16 autocast where native, else fp16, none without amp;
    on CPU nothing changes."""
    from leuk_ray.engine import inference_settings
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert inference_settings(cpu, True) == (None, torch.contiguous_format)
    assert inference_settings(cpu, False) == (None, torch.contiguous_format)
    assert inference_settings(cuda, True, bf16_supported=True) == \
        (torch.bfloat16, torch.channels_last)
    assert inference_settings(cuda, True, bf16_supported=False) == \
        (torch.float16, torch.channels_last)
    assert inference_settings(cuda, False, bf16_supported=True) == (None, torch.channels_last)


def test_channels_last_prediction_path_keeps_the_model_usable(monkeypatch):
    """The CUDA layout path of predict_probs, run on CPU: the model is converted to channels_last
    outside inference_mode (its weights stay ordinary tensors: it can still train), and the
    probabilities equal the contiguous ones."""
    import leuk_ray.engine as engine
    ds = Cells(6)
    torch.manual_seed(0)
    run = FoldRun(tiny_cfg(), ds, ds, log=quiet)
    model, prep = run.model, run.preprocessing
    want = predict_probs(model, ds, device="cpu", batch_size=4, prep=prep, tta=True)
    monkeypatch.setattr(engine, "inference_settings",
                        lambda device, amp, bf16_supported=None: (None, torch.channels_last))
    got = predict_probs(model, ds, device="cpu", batch_size=4, prep=prep, tta=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    loss = model(torch.zeros(2, 3, 32, 32)).sum()
    loss.backward()  # an inference tensor among the weights would refuse this


# -------------------------------------------------------------------------------------- metrics
def test_metrics_sanity():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.1, 0.6, 0.9, 0.8, 0.3, 0.2])
    m = classification_metrics(y, p)
    pred = (p >= 0.5).astype(int)
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["sensitivity"] == m["recall_all"] == pytest.approx(2 / 3)
    assert m["specificity"] == m["recall_hem"] == pytest.approx(2 / 3)
    assert m["precision_all"] == pytest.approx(2 / 3) and m["n"] == 6
    assert 0 < m["auc"] < 1 and 0 <= m["ece"] <= 1
    assert m["per_subject_accuracy"] == {}
    assert set(m) == {"f1", "accuracy", "auc", "precision_all", "recall_all", "f1_all",
                      "precision_hem", "recall_hem", "f1_hem", "sensitivity", "specificity",
                      "ece", "n", "per_subject_accuracy"}
    json.dumps(m)

    perfect = classification_metrics([0, 1, 1], [0.0, 1.0, 1.0])
    assert perfect["f1"] == 1.0 and perfect["auc"] == 1.0 and perfect["ece"] == 0.0
    one_class = classification_metrics([1, 1], [0.9, 0.2])
    assert one_class["auc"] is None and one_class["accuracy"] == 0.5
    # ECE: every row predicted with confidence 0.8, 50% right -> |0.5 - 0.8|
    assert classification_metrics([1, 0], [0.8, 0.8])["ece"] == pytest.approx(0.3)
    subj = classification_metrics([1, 0, 1, -1], [0.9, 0.7, 0.2, 0.5],
                                  subjects=["a", "a", "b", "c"])
    assert subj["n"] == 3 and subj["per_subject_accuracy"] == {"a": 0.5, "b": 0.0}
    assert classification_metrics([0, 1], [0.4, 0.45], threshold=0.42)["accuracy"] == 1.0


# ---------------------------------------------------------------------------------- command line
def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_train_help():
    r = subprocess.run([sys.executable, "-m", "leuk_ray.train", "--help"], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--fold", "--demo", "--resume", "--smoke-test", "--data", "--out"):
        assert flag in r.stdout


def test_train_without_data_is_a_user_error(tmp_path):
    from leuk_ray.train import main
    with pytest.raises(UserError, match=r"no data: pass --data DIR \(or --demo\)"):
        main(["--out", str(tmp_path / "run")])
    with pytest.raises(UserError, match="--resume needs --out"):
        main(["--resume"])


@pytest.mark.slow
def test_train_smoke_demo_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "leuk_ray.train", "--smoke-test", "--demo", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"outputs: {out}" in r.stdout and "mean validation F1 over 2 fold(s)" in r.stdout
    for name in ("config.yaml", "history.csv", "oof.csv", "summary.json", "fold_0.pt", "fold_1.pt",
                 "state_fold_0.pt", "state_fold_1.pt"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "fold_0.pt", map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "config", "metrics", "fold", "epoch"}
    assert ckpt["config"]["model"]["backbone"] == "test_efficientnet"
    history = pd.read_csv(out / "history.csv")
    epochs = yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"]
    assert len(history) == 2 * epochs and set(history["fold"]) == {0, 1}
    oof = pd.read_csv(out / "oof.csv")
    assert list(oof.columns) == ["path", "subject", "label", "fold", "prob_all"]
    assert oof["path"].is_unique and oof["prob_all"].between(0, 1).all()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["folds"]) == {"0", "1"}
    assert summary["mean_val_f1"] == pytest.approx(
        np.mean([summary["folds"][f]["f1"] for f in ("0", "1")]))

    # --resume on a finished run retrains nothing and reproduces the summary
    r2 = subprocess.run(cmd + ["--resume"], cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert f"resuming after epoch {epochs}" in r2.stdout and f" epoch 1/{epochs} " not in r2.stdout
    assert json.loads((out / "summary.json").read_text()) == summary


# --------------------------------------------------- CUDA path: precision, optimiser, determinism
def test_fp16_nan_gradients_trip_max_nonfinite():
    """Issue 13: with fp16 the counter of non-finite steps was reset after every GradScaler step,
    skipped or not, so NaN gradients (finite loss) halved the scale forever and never failed."""
    ds = Cells(32)  # 4 batches per epoch
    run = FoldRun(tiny_cfg(max_nonfinite=3), ds, ds, log=quiet)
    run.amp_dtype = torch.float16
    run.scaler = make_grad_scaler(run.device, torch.float16)
    next(run.model.parameters()).register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive .*last: gradient overflow"):
        run.step()


def test_scaler_step_reports_a_skipped_step():
    from leuk_ray.engine import scaler_step
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale((p * 2).sum()).backward()
    assert scaler_step(scaler, opt) and torch.allclose(p.detach(), torch.full((3,), 0.8))
    opt.zero_grad()
    scaler.scale((p * float("inf")).sum()).backward()
    assert not scaler_step(scaler, opt) and scaler.get_scale() == 2.0
    assert torch.allclose(p.detach(), torch.full((3,), 0.8))  # the step was skipped


def test_bf16_only_where_the_gpu_does_it_natively(monkeypatch):
    """A pre-Ampere GPU: torch reports bf16 as supported through emulation (slow); fp16 instead."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)
    assert select_amp_dtype(torch.device("cuda"), True) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert select_amp_dtype(torch.device("cuda"), True) is torch.bfloat16


@pytest.mark.parametrize("head,optimizer", [("mlp", "adamw"), ("keras", "adamax")])
def test_no_weight_decay_on_norms_and_biases(head, optimizer):
    cfg = tiny_cfg(optimizer=optimizer, weight_decay=0.05)
    cfg.model.head = head
    run = FoldRun(cfg, Cells(16), Cells(16), log=quiet)
    opt = run.optimizer
    assert type(opt) is {"adamw": torch.optim.AdamW, "adamax": torch.optim.Adamax}[optimizer]
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(run.model.named_parameters())
    assert len(decay_of) == len(named) == sum(len(g["params"]) for g in opt.param_groups)
    for name, p in named.items():
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        assert decay_of[id(p)] == (0.0 if no_decay else 0.05), name
    assert decay_of[id(run.model.head[0].weight)] == 0     # the head's first norm (BN or LN)
    assert decay_of[id(run.model.head[1].weight)] == 0.05  # the head's first Linear kernel
    assert len({g["lr"] for g in opt.param_groups}) == 1  # one schedule for every group


def test_determinism_setting():
    from leuk_ray.config import load_config
    from leuk_ray.engine import configure_determinism
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert load_config().train.deterministic == "auto"
    assert load_config(overrides=["train.deterministic=true"]).train.deterministic == "true"
    assert load_config(overrides=["train.deterministic=false"]).train.deterministic == "false"
    with pytest.raises(UserError, match=r"train.deterministic = 'maybe' is not allowed"):
        load_config(overrides=["train.deterministic=maybe"])
    try:
        assert configure_determinism(cuda, "auto") is False  # flags only: no GPU needed
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        assert configure_determinism(cuda, "true") is True
        assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
        assert configure_determinism(cpu, "false") is False
        assert not torch.backends.cudnn.benchmark
        assert not torch.are_deterministic_algorithms_enabled()
        assert configure_determinism(cpu, "auto") is True
        assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
    finally:
        configure_determinism(cpu, "auto")
    assert FoldRun(tiny_cfg(), Cells(16), Cells(16), log=quiet).deterministic is True
