"""The training engine: one fold, one epoch per ``FoldRun.step()``, plain PyTorch (no Ray).

    run = FoldRun(cfg, train_ds, val_ds, fold=0)      # or state=load_checkpoint(path) to resume
    while not run.done:
        metrics = run.step()                          # train + validate one epoch
        save_checkpoint(run.state_dict(), path)       # everything needed to continue
    result = run.result()                             # history, best epoch, its weights and OOF

Datasets yield ``(uint8 tensor (H, W, 3), int label)`` and carry ``.labels`` (and ``.subjects``);
images are normalised on the device by ``leuk_ray.data.transforms.to_model_input`` with the
backbone's mean and std (``preprocessing_for(cfg)``, the same object predict reads from the
artifact).

Precision: fp32 on CPU; on CUDA with ``train.amp`` bf16 autocast where the GPU does bf16 natively
(``is_bf16_supported(including_emulation=False)``), else fp16 autocast with a GradScaler;
channels_last on CUDA with ``train.channels_last``.

Optimiser: timm's ``create_optimizer_v2`` (torch's AdamW or Adamax), whose parameter groups give
norm weights and biases (every parameter with ndim <= 1, or named ``*.bias``) no weight decay.

Reproducibility: the model is initialised from ``train.seed + fold``, and every epoch reseeds
torch, numpy, random, the shuffling generator and the training transform from
(train.seed, fold, epoch). An epoch's randomness therefore does not depend on what came before, and
resuming from ``state_dict()`` after epoch e gives the same run as not stopping (exactly so on CPU
with data.num_workers = 0; with workers, each persistent worker seeds its augmentations once when
it starts). ``train.deterministic`` (``configure_determinism``): auto is deterministic on CPU and
uses cudnn.benchmark (fast, not bit-exact) on CUDA; true asks for deterministic algorithms on CUDA
too (best effort, slower).

Non-finite values: a step whose loss is not finite, or whose gradient norm is not finite (with
fp16: a step the GradScaler skipped, seen as a lowered scale), is skipped and counted in
``nonfinite_steps`` (GradScaler skips also in ``scaler_skips``). ``train.max_nonfinite`` such steps
in a row raise ``NonFiniteLossError`` (fp16 overflows at the start are a few halvings of the scale;
20 in a row means the gradients are NaN, not merely large).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader, Dataset

from leuk_ray.atomic import replacing
from leuk_ray.config import Config, to_dict
from leuk_ray.data.transforms import Preprocessing, preprocessing_for, to_model_input
from leuk_ray.errors import NonFiniteLossError, UserError
from leuk_ray.losses import FocalLoss, class_alpha
from leuk_ray.metrics import classification_metrics
from leuk_ray.model import create_model

STATE_VERSION = 2  # 2: optimizer parameter groups from timm (no weight decay on norms/biases)
# Config keys a resumed run must share with the run that wrote the state.
_RESUME_KEYS = ("model", "train.epochs", "train.batch_size", "train.lr", "train.optimizer",
                "train.scheduler", "train.warmup_pct", "train.seed", "data.image_size")


# ------------------------------------------------------------------------------ device, precision
def resolve_device(name: str) -> torch.device:
    """``train.device``: auto -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = cuda but no CUDA device is visible: use train.device=auto "
                        "or cpu, or check CUDA_VISIBLE_DEVICES and the driver")
    return torch.device(name)


def select_amp_dtype(device: torch.device, enabled: bool,
                     bf16_supported: bool | None = None) -> torch.dtype | None:
    """Autocast dtype: None (fp32) off CUDA or with amp off; bf16 where supported, else fp16.

    ``bf16_supported`` overrides the query of the current CUDA device (for tests).
    """
    if not enabled or device.type != "cuda":
        return None
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if bf16_supported else torch.float16


def inference_settings(device: torch.device, amp: bool, bf16_supported: bool | None = None
                       ) -> tuple[torch.dtype | None, torch.memory_format]:
    """(autocast dtype, memory format) for inference on ``device``. CUDA: channels_last and, with
    ``amp`` (``train.amp``), ``select_amp_dtype``'s bf16 or fp16. CPU: fp32, contiguous.

    ``bf16_supported`` overrides the query of the current CUDA device (for tests).
    """
    if device.type != "cuda":
        return None, torch.contiguous_format
    return select_amp_dtype(device, amp, bf16_supported), torch.channels_last


def make_grad_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def scaler_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """``scaler.step`` + ``scaler.update``; False when the scaler skipped the step (inf/NaN
    gradients), which it shows by lowering its scale."""
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return not scaler.get_scale() < scale


def autocast(device: torch.device,
             amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    """A seed for one epoch of one fold, independent of the epochs before it."""
    return int(np.random.SeedSequence([seed, fold, epoch]).generate_state(1)[0])


def _reseed_transform(ds: Dataset, seed: int) -> None:
    # albumentations 2 Compose keeps its own generator, untouched by the global seeds. This covers
    # the main process (num_workers = 0); CellDataset reseeds it inside workers from torch's seed.
    t = getattr(ds, "transform", None)
    if t is not None and hasattr(t, "set_random_seed"):
        t.set_random_seed(seed)


# ---------------------------------------------------------------------------------------- loaders
def make_loader(ds: Dataset, *, batch_size: int, device: torch.device, num_workers: int = 0,
                train: bool = False, generator: torch.Generator | None = None) -> DataLoader:
    """Training: shuffled by ``generator``, dropping the last batch only if it would hold 1 image
    (BatchNorm cannot train on it). Evaluation: in order, everything.

    Sized for a GPU: batches travel as uint8 (4x smaller than float32) in pinned memory on CUDA so
    the host-to-device copy in ``to_model_input`` is asynchronous; workers persist across epochs
    (no re-fork, no re-opening of the image cache) and keep 4 batches each in flight on CUDA (2 on
    CPU, torch's default). ``data.num_workers`` (default 2 per fold) sets how many; cached images
    reach the workers as row numbers into the node's memory-mapped cache, never as copies."""
    drop_last = train and len(ds) > 1 and len(ds) % batch_size == 1
    cuda = device.type == "cuda"
    extra = {"prefetch_factor": 4 if cuda else 2} if num_workers > 0 else {}
    return DataLoader(ds, batch_size=batch_size, shuffle=train, generator=generator,
                      num_workers=num_workers, pin_memory=cuda,
                      persistent_workers=num_workers > 0, drop_last=drop_last, **extra)


def _labels_of(ds: Dataset) -> np.ndarray:
    labels = getattr(ds, "labels", None)
    if labels is None:
        labels = [int(ds[i][1]) for i in range(len(ds))]
    return np.asarray(labels, dtype=np.int64)


# ------------------------------------------------------------------------------------- inference
def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rotations/reflections of a BCHW batch (rot90 k = 0..3, each also flipped)."""
    views = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(2, 3))
        views += [r, r.flip(3)]
    return views


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, criterion: nn.Module, *, device: torch.device,
             prep: Preprocessing, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False) -> tuple[float, np.ndarray, np.ndarray]:
    """Validation pass: (loss over all rows, P(ALL) per row, labels), in the loader's order."""
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        x = to_model_input(x, device, channels_last, prep=prep)
        with autocast(device, amp_dtype):
            logits.append(model(x).float())
        labels.append(y.to(device))
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    loss = criterion(all_logits, all_labels).item()
    probs = torch.softmax(all_logits, dim=1)[:, 1]
    return loss, probs.cpu().numpy().astype(np.float64), all_labels.cpu().numpy()


def predict_probs(model: nn.Module, ds: Dataset, *, device: torch.device | str, batch_size: int,
                  prep: Preprocessing, tta: bool = False, num_workers: int = 0,
                  amp: bool = True) -> np.ndarray:
    """P(ALL) for every row of ``ds`` (in order); ``tta`` averages over the 8 dihedral views.

    Images are normalised with ``prep`` (the artifact's). Under ``torch.inference_mode``; on CUDA
    the model and the batches are channels_last and, with ``amp`` (``train.amp``), the forward
    runs under bf16 (fp16 where bf16 is not native) autocast (``inference_settings``)."""
    device = torch.device(device)
    amp_dtype, memory_format = inference_settings(device, amp)
    channels_last = memory_format == torch.channels_last
    if channels_last:  # outside inference_mode: converted weights stay normal tensors
        model.to(memory_format=torch.channels_last)  # in place; a no-op when it already is
    model.eval()
    loader = make_loader(ds, batch_size=batch_size, device=device, num_workers=num_workers)
    with torch.inference_mode():
        return _predict_loader(model, loader, device, prep, tta, amp_dtype, channels_last)


def _predict_loader(model: nn.Module, loader: DataLoader, device: torch.device,
                    prep: Preprocessing, tta: bool, amp_dtype: torch.dtype | None,
                    channels_last: bool) -> np.ndarray:
    out = []
    for x, _ in loader:
        x = to_model_input(x, device, channels_last, prep=prep)
        views = dihedral_views(x) if tta else [x]
        p = torch.zeros(x.shape[0], device=device)
        for v in views:
            if channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                p += torch.softmax(model(v).float(), dim=1)[:, 1]
        out.append((p / len(views)).cpu())
    if not out:
        return np.zeros(0, dtype=np.float64)
    return torch.cat(out).numpy().astype(np.float64)


# ------------------------------------------------------------------------------ optimisation parts
def make_optimizer(name: str, model: nn.Module, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """torch's AdamW (decoupled decay) or Adamax (L2 decay) through timm's
    ``create_optimizer_v2``, whose parameter groups exempt norm weights and biases (ndim <= 1 or
    ``*.bias``) from weight decay; every other parameter of ``model`` (backbone and head) decays."""
    if name not in ("adamw", "adamax"):
        raise UserError(f"train.optimizer = {name!r} is not allowed: use adamw or adamax")
    return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay,
                               filter_bias_and_bn=True)


def configure_determinism(device: torch.device, setting: str) -> bool:
    """Apply ``train.deterministic`` (auto, true, false) for a run on ``device``; returns whether
    the run is deterministic. auto = true on CPU, false on CUDA. Deterministic: torch's
    deterministic algorithms (warn only where none exists) and no cudnn.benchmark; otherwise
    torch's default algorithms and cudnn.benchmark on CUDA (the fastest convolution per shape)."""
    deterministic = setting == "true" or (setting == "auto" and device.type != "cuda")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic and device.type == "cuda"
    return deterministic


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """(scheduler or None, per_batch). onecycle/cosine step per batch, plateau per epoch."""
    t = cfg.train
    total = max(1, t.epochs * steps_per_epoch)
    if t.scheduler == "onecycle":
        pct = t.warmup_pct
        if abs(pct * total - 1.0) < 1e-9:  # torch divides by (pct * total - 1)
            pct = min(1.5 / total, 0.99)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=t.lr, total_steps=total,
                                                   pct_start=pct), True
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total), True
    if t.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=t.plateau_factor, patience=t.plateau_patience), False
    if t.scheduler == "none":
        return None, False
    raise UserError(f"train.scheduler = {t.scheduler!r} is not allowed: use onecycle, plateau, "
                    "cosine or none")


def _get(cfg_dict: dict, dotted: str) -> Any:
    d: Any = cfg_dict
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------- result
@dataclass
class FoldResult:
    fold: int
    history: list[dict]                 # one dict per epoch (FoldRun.step's return values)
    best_epoch: int                     # 1-based; 0 when no epoch ran
    best_metrics: dict                  # classification_metrics of the best epoch + val_loss, epoch
    best_state: dict[str, torch.Tensor] | None  # model state_dict (CPU) of the best epoch
    oof_probs: np.ndarray               # P(ALL) per validation row at the best epoch


# ---------------------------------------------------------------------------------------- FoldRun
class FoldRun:
    """One fold, one epoch per ``step()``; resumable from ``state_dict()``.

    Attributes other code reads: ``epoch`` (epochs completed), ``done`` (max epochs reached or
    stopped early), ``history`` (the dicts ``step`` returned), ``best_epoch`` (1-based, 0 before the
    first epoch), ``best_score`` (best value of ``train.monitor``, None before the first epoch),
    ``best_val_f1`` (weighted F1 of that best epoch), ``best_metrics``, ``model``, ``device``.
    """

    def __init__(self, cfg: Config, train_ds: Dataset, val_ds: Dataset, *, fold: int = 0,
                 state: dict | None = None, log: Callable[[str], Any] = print) -> None:
        t = cfg.train
        self.cfg, self.fold, self.log = cfg, fold, log
        self.train_ds, self.val_ds = train_ds, val_ds
        self._check_inputs()
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device)
        self.deterministic = configure_determinism(self.device, t.deterministic)
        self.preprocessing = preprocessing_for(cfg)  # the backbone's mean/std/interpolation
        self.amp_dtype = select_amp_dtype(self.device, t.amp)
        self.scaler = make_grad_scaler(self.device, self.amp_dtype)
        self.channels_last = self.device.type == "cuda" and t.channels_last

        seed_everything(t.seed + fold)
        self.model = create_model(cfg.model).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_labels = _labels_of(train_ds)
        self.criterion = FocalLoss(class_alpha(self.train_labels, t.class_weights),
                                   t.focal_gamma, t.label_smoothing).to(self.device)

        self.generator = torch.Generator()
        nw = cfg.data.num_workers
        self.train_loader = make_loader(train_ds, batch_size=t.batch_size, device=self.device,
                                        num_workers=nw, train=True, generator=self.generator)
        self.val_loader = make_loader(val_ds, batch_size=t.batch_size, device=self.device,
                                      num_workers=nw)
        self.steps_per_epoch = len(self.train_loader)
        self.optimizer = make_optimizer(t.optimizer, self.model, t.lr, t.weight_decay)
        self.scheduler, self.per_batch_schedule = make_scheduler(cfg, self.optimizer,
                                                                 self.steps_per_epoch)

        self.epoch = 0                  # epochs completed
        self.done = False
        self.history: list[dict] = []
        self.best_epoch = 0
        self.best_score: float | None = None   # best value of the monitored metric
        self.best_metrics: dict = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_probs: np.ndarray | None = None
        self.bad_epochs = 0             # epochs since the best one
        self.nonfinite_run = 0          # consecutive non-finite losses/gradients
        if state is not None:
            self.load_state_dict(state)

    def _check_inputs(self) -> None:
        t, f = self.cfg.train, self.fold
        if len(self.train_ds) < 2:
            raise UserError(f"fold {f}: the training set has {len(self.train_ds)} image(s); "
                            "need at least 2 (use more data or fewer folds)")
        if len(self.val_ds) < 1:
            raise UserError(f"fold {f}: the validation set is empty (use more data or fewer folds)")
        if self.cfg.model.head == "keras" and t.batch_size < 2:
            raise UserError("train.batch_size = 1 with model.head = keras: its BatchNorm needs at "
                            "least 2 images per batch; use train.batch_size >= 2")
        prep = preprocessing_for(self.cfg)
        for name, ds in (("training", self.train_ds), ("validation", self.val_ds)):
            made = (getattr(ds, "size", prep.image_size),
                    getattr(ds, "interpolation", prep.interpolation))
            if made != (prep.image_size, prep.interpolation):
                raise ValueError(f"fold {f}: the {name} set resizes to {made[0]} px with "
                                 f"{made[1]}, but {self.cfg.model.backbone} at data.image_size "
                                 f"wants {prep.image_size} px with {prep.interpolation}: build "
                                 "the datasets with preprocessing_for(cfg).interpolation")
            bad = sorted(set(_labels_of(ds).tolist()) - {0, 1})
            if bad:
                raise UserError(f"fold {f}: the {name} set has labels {bad}; only labelled rows "
                                "(0 = hem, 1 = all) can be trained and validated on")

    # ------------------------------------------------------------------------------- training
    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def best_val_f1(self) -> float | None:
        """Validation weighted F1 of the best epoch (chosen by train.monitor)."""
        return self.best_metrics.get("f1")

    def _nonfinite(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_run += 1
        if self.nonfinite_run >= self.cfg.train.max_nonfinite:
            raise NonFiniteLossError(
                f"fold {self.fold}: {self.nonfinite_run} consecutive non-finite losses at epoch "
                f"{self.epoch + 1} (lr={self.lr:.3g}, last: {what}): lower train.lr, or clip gradients "
                "harder (a smaller train.grad_clip, e.g. 0.5)")

    def train_one_epoch(self) -> dict:
        """One pass over the training set; returns train_loss, nonfinite_steps, scaler_skips, lr."""
        t = self.cfg.train
        model, opt, scaler = self.model, self.optimizer, self.scaler
        model.train()
        total, seen, skipped, scaler_skips, lr = 0.0, 0, 0, 0, self.lr
        for x, y in self.train_loader:
            x = to_model_input(x, self.device, self.channels_last, prep=self.preprocessing)
            y = y.to(self.device, non_blocking=True)
            lr = self.lr
            with autocast(self.device, self.amp_dtype):
                logits = model(x)
            loss = self.criterion(logits, y) + model.regularization_loss()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                skipped += 1
                self._nonfinite("loss")
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                if scaler.is_enabled():  # fp16: the scaler skips inf/NaN gradients itself
                    if scaler_step(scaler, opt):
                        self.nonfinite_run = 0
                    else:
                        skipped += 1
                        scaler_skips += 1
                        self._nonfinite("gradient overflow, step skipped by the fp16 GradScaler")
                elif not torch.isfinite(grad_norm):
                    skipped += 1
                    self._nonfinite("gradient norm")
                else:
                    opt.step()
                    self.nonfinite_run = 0
                opt.zero_grad(set_to_none=True)
                total += loss_value * y.shape[0]
                seen += y.shape[0]
            if self.scheduler is not None and self.per_batch_schedule:
                with warnings.catch_warnings():  # the schedule follows batches, skipped or not
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler")
                    self.scheduler.step()
        return {"train_loss": total / seen if seen else float("nan"),
                "nonfinite_steps": skipped, "scaler_skips": scaler_skips, "lr": lr}

    def step(self) -> dict:
        """Train and validate one epoch. Returns fold, epoch (1-based), train_loss (incl. the Keras
        penalty), val_loss, val_f1, val_accuracy, val_auc, lr (of the epoch's last step),
        nonfinite_steps, scaler_skips, seconds, best_epoch, best_val_f1, early_stopped.
        Raises NonFiniteLossError after train.max_nonfinite non-finite steps in a row."""
        if self.done:
            raise RuntimeError(f"fold {self.fold}: already done after {self.epoch} epochs")
        t = self.cfg.train
        start = time.perf_counter()
        e = self.epoch + 1
        s = epoch_seed(t.seed, self.fold, e)
        seed_everything(s)
        self.generator.manual_seed(s)
        _reseed_transform(self.train_ds, s)

        tr = self.train_one_epoch()
        val_loss, probs, labels = evaluate(self.model, self.val_loader, self.criterion,
                                           device=self.device, prep=self.preprocessing,
                                           amp_dtype=self.amp_dtype,
                                           channels_last=self.channels_last)
        if not np.isfinite(probs).all():
            raise NonFiniteLossError(f"fold {self.fold}: non-finite validation predictions at "
                                     f"epoch {e} (lr={self.lr:.3g}): the weights diverged; lower "
                                     "train.lr or train.weight_decay")
        m = classification_metrics(labels, probs, subjects=getattr(self.val_ds, "subjects", None))
        score = m["f1"] if t.monitor == "f1" else m["accuracy"]
        improved = self.best_score is None or score > self.best_score
        if improved:
            self.best_score, self.best_epoch, self.bad_epochs = float(score), e, 0
            self.best_metrics = {**m, "val_loss": val_loss, "epoch": e}
            self.best_state = _cpu_state(self.model)
            self.best_probs = probs
        else:
            self.bad_epochs += 1
        if self.scheduler is not None and not self.per_batch_schedule:
            self.scheduler.step(score)
        self.epoch = e
        stop_early = t.patience > 0 and self.bad_epochs >= t.patience
        self.done = e >= t.epochs or stop_early

        row = {
            "fold": self.fold, "epoch": e, "train_loss": tr["train_loss"], "val_loss": val_loss,
            "val_f1": m["f1"], "val_accuracy": m["accuracy"], "val_auc": m["auc"], "lr": tr["lr"],
            "nonfinite_steps": tr["nonfinite_steps"], "scaler_skips": tr["scaler_skips"],
            "seconds": time.perf_counter() - start, "best_epoch": self.best_epoch,
            "best_val_f1": self.best_metrics["f1"], "early_stopped": stop_early,
        }
        self.history.append(row)
        self.log(self._line(row, improved, stop_early))
        return row

    def _line(self, r: dict, improved: bool, stop_early: bool) -> str:
        extra = ""
        if r["nonfinite_steps"]:
            extra += f" skipped {r['nonfinite_steps']} non-finite"
        if improved:
            extra += " *"
        if stop_early:
            extra += f" (early stop: best epoch {self.best_epoch})"
        return (f"fold {self.fold} epoch {r['epoch']}/{self.cfg.train.epochs} "
                f"train_loss {r['train_loss']:.4f} val_loss {r['val_loss']:.4f} "
                f"val_f1 {r['val_f1']:.4f} acc {r['val_accuracy']:.4f} lr {r['lr']:.2e} "
                f"{r['seconds']:.1f}s{extra}")

    # ----------------------------------------------------------------------- state and result
    def state_dict(self, *, best_weights: bool = True) -> dict:
        """What continuing after ``self.epoch`` needs, and no more (torch.load(weights_only=True)
        safe).

        A run that is not done keeps its model, optimiser, scheduler and scaler (to train on); a
        done run never trains again and keeps none of them. ``best_weights``: keep the best epoch's
        weights and validation probabilities (what the final job's ensemble and OOF calibration
        are made of; a search scores trials on metrics alone and passes False). They are stored
        once: while the best epoch is the last one (``best_is_model``) they are the model's
        weights, not a second copy.
        """
        training = not self.done
        best_is_model = training and best_weights and self.best_epoch == self.epoch \
            and self.best_state is not None
        state = {
            "version": STATE_VERSION,
            "fold": self.fold,
            "epoch": self.epoch,
            "done": self.done,
            "config": to_dict(self.cfg),
            "history": [dict(r) for r in self.history],
            "best_epoch": self.best_epoch,
            "best_score": self.best_score,
            "best_metrics": self.best_metrics,
            "best_is_model": best_is_model,
            "best_state": self.best_state if best_weights and not best_is_model else None,
            "best_probs": None if self.best_probs is None or not best_weights
            else torch.from_numpy(self.best_probs),
            "bad_epochs": self.bad_epochs,
            "nonfinite_run": self.nonfinite_run,
        }
        if training:
            state.update({
                "model": _cpu_state(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
                "scaler": self.scaler.state_dict(),
            })
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"fold {self.fold}: resume state has version {state.get('version')!r}, "
                            f"this leuk-ray writes {STATE_VERSION}: start a fresh run")
        if state.get("fold") != self.fold:
            raise UserError(f"resume state belongs to fold {state.get('fold')}, "
                            f"not fold {self.fold}")
        now = to_dict(self.cfg)
        for key in _RESUME_KEYS:
            old, new = _get(state.get("config", {}), key), _get(now, key)
            if old != new:
                raise UserError(f"fold {self.fold}: the resume state was written with {key} = "
                                f"{old!r}, this run has {new!r}: resume with the same config or "
                                "start a fresh run")
        if state.get("model") is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        elif not state["done"]:
            raise UserError(f"fold {self.fold}: the resume state of an unfinished run holds no "
                            "model weights: delete it to start that fold afresh")
        self.epoch = int(state["epoch"])
        self.done = bool(state["done"])
        self.history = [dict(r) for r in state["history"]]
        self.best_epoch = int(state["best_epoch"])
        self.best_score = state["best_score"]
        self.best_metrics = dict(state["best_metrics"])
        self.best_state = _cpu_state(self.model) if state.get("best_is_model") \
            else state["best_state"]
        bp = state["best_probs"]
        self.best_probs = None if bp is None else bp.numpy().astype(np.float64)
        self.bad_epochs = int(state["bad_epochs"])
        self.nonfinite_run = int(state["nonfinite_run"])
        if self.epoch >= self.cfg.train.epochs:
            self.done = True

    def result(self) -> FoldResult:
        probs = self.best_probs if self.best_probs is not None else np.zeros(0, dtype=np.float64)
        return FoldResult(fold=self.fold, history=list(self.history), best_epoch=self.best_epoch,
                          best_metrics=dict(self.best_metrics), best_state=self.best_state,
                          oof_probs=probs)

    def close(self) -> None:
        """Stop persistent loader workers (they also stop when the run is garbage-collected)."""
        for loader in (self.train_loader, self.val_loader):
            loader._iterator = None  # DataLoader shuts its workers down when the iterator goes


# ------------------------------------------------------------------------------------- functions
def fit_fold(cfg: Config, train_ds: Dataset, val_ds: Dataset, *, fold: int = 0,
             state: dict | None = None,
             on_epoch: Callable[[dict, FoldRun], Any] | None = None,
             log: Callable[[str], Any] = print) -> FoldResult:
    """Run a fold to the end (max epochs or early stop); ``on_epoch(metrics, run)`` after each epoch
    (e.g. to ``save_checkpoint(run.state_dict(), path)``)."""
    run = FoldRun(cfg, train_ds, val_ds, fold=fold, state=state, log=log)
    try:
        while not run.done:
            metrics = run.step()
            if on_epoch is not None:
                on_epoch(metrics, run)
    finally:
        run.close()
    return run.result()


def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, then an atomic rename."""
    with replacing(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """torch.load(weights_only=True) onto the CPU; a UserError naming the file when unreadable."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{p}: checkpoint not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{p}: not a readable leuk-ray checkpoint ({type(e).__name__}: {first}); "
                        "delete it to start that fold afresh") from None
    if not isinstance(state, dict):
        raise UserError(f"{p}: not a leuk-ray checkpoint (expected a dict, got "
                        f"{type(state).__name__})")
    return state
