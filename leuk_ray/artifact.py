"""The ensemble artifact: save it atomically, verify it before loading, predict with it.

Layout of an artifact directory::

    manifest.json    format, version, config, class names, preprocessing, temperature, threshold,
                     fold scores and the sha256 of every other file (written last)
    fold_<i>.pt      one model state dict per fold (torch.save; loadable with weights_only=True)
    metrics.json     evaluation numbers
    report/          PNG plots and report.md (see ``leuk_ray.report``)

``save_artifact`` builds everything in a hidden sibling ``.<name>.partial-<random>`` and renames it
into place only when complete, so a crash never leaves something at the target that looks whole.
``load_artifact`` checks the manifest and every checksum before any weights are unpickled, and
unpickles with ``weights_only=True``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import pickle
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from leuk_ray.calibration import apply_temperature
from leuk_ray.config import Config, from_dict, to_dict
from leuk_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from leuk_ray.engine import predict_probs
from leuk_ray.errors import UserError
from leuk_ray.model import create_model

FORMAT = "leuk-ray-ensemble"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METRICS = "metrics.json"
REPORT_DIR = "report"
CLASS_NAMES = ("hem", "all")


def fold_file(i: int) -> str:
    return f"fold_{i}.pt"


# ------------------------------------------------------------------------------------- ensemble
@dataclass
class Ensemble:
    """k fold models whose mean P(ALL), temperature-scaled, is the prediction."""

    cfg: Config
    models: list[nn.Module]
    temperature: float = 1.0
    threshold: float = 0.5
    class_names: tuple[str, ...] = CLASS_NAMES
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    path: Path | None = None            # the artifact directory it was loaded from, if any

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size

    def to(self, device: str | torch.device) -> Ensemble:
        self.device = resolve_device(device)
        for m in self.models:
            m.to(self.device)
        return self

    def predict(self, ds: Dataset, *, tta: bool = False, batch_size: int = 64,
                device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated ensemble P(ALL) per row, uncalibrated per-fold P(ALL) of shape (k, N)).

        ``ds`` yields (uint8 HWC image at ``image_size``, label), like ``CellDataset``.
        """
        if device is not None and resolve_device(device) != self.device:
            self.to(device)
        per_fold = np.stack([predict_probs(m, ds, device=self.device, batch_size=batch_size,
                                           tta=tta) for m in self.models])
        return self.calibrate(per_fold.mean(axis=0)), per_fold

    def calibrate(self, mean_prob_all: np.ndarray) -> np.ndarray:
        return apply_temperature(mean_prob_all, self.temperature)

    def label(self, prob_all: np.ndarray) -> list[str]:
        """Class name per row by the artifact's threshold (ALL when prob_all >= threshold)."""
        return [self.class_names[int(p >= self.threshold)] for p in np.asarray(prob_all)]


def resolve_device(name: str | torch.device) -> torch.device:
    """auto -> cuda when available, else cpu; cuda without a visible GPU is a UserError."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r}: no CUDA device is visible; use --device auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a device: use auto, cpu or cuda") from None


def _inference_model_config(cfg: Config):
    # The weights come from the fold files: never fetch or read backbone weights again.
    return dataclasses.replace(cfg.model, pretrained=False, pretrained_path="")


def build_ensemble(cfg: Config, fold_states: Sequence[dict[str, torch.Tensor]], *,
                   temperature: float = 1.0, threshold: float = 0.5,
                   device: str | torch.device = "cpu") -> Ensemble:
    """An in-memory Ensemble from fold state dicts (to evaluate before saving)."""
    dev = resolve_device(device)
    models = []
    for sd in fold_states:
        m = create_model(_inference_model_config(cfg))
        m.load_state_dict(sd, strict=True)
        models.append(m.to(dev).eval())
    return Ensemble(cfg, models, float(temperature), float(threshold), CLASS_NAMES, dev)


# ----------------------------------------------------------------------------------------- save
def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another artifact directory")
    if not overwrite:
        raise UserError(f"{out}: already exists; remove it or choose another artifact directory")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UserError(f"{out}: exists, is not empty and is not an ensemble artifact (no "
                        f"{MANIFEST}); refusing to replace it: choose another artifact directory")


def save_artifact(out_dir: str | Path, *, cfg: Config, fold_states: Sequence[dict],
                  fold_scores: Sequence[dict], temperature: float, threshold: float,
                  metrics: dict, write_report: Callable[[Path], Any] | None = None,
                  overwrite: bool = True) -> Path:
    """Write the artifact to ``out_dir`` atomically; returns ``out_dir``.

    ``fold_states[i]`` is fold i's model state dict and ``fold_scores[i]`` its scores (fold,
    val_f1, best_epoch, ...). ``write_report(report_dir)`` fills ``report/``. On an exception the
    partial directory is removed and ``out_dir`` is untouched.
    """
    out = Path(out_dir).expanduser().absolute()
    if len(fold_states) == 0:
        raise ValueError("save_artifact: no fold models")
    if len(fold_states) != len(fold_scores):
        raise ValueError(f"save_artifact: {len(fold_states)} fold models but "
                         f"{len(fold_scores)} fold scores")
    if not (math.isfinite(temperature) and temperature > 0 and 0.0 <= threshold <= 1.0):
        raise ValueError(f"save_artifact: bad temperature {temperature!r} or threshold "
                         f"{threshold!r}")
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        folds = []
        for i, (sd, score) in enumerate(zip(fold_states, fold_scores)):
            with open(tmp / fold_file(i), "wb") as f:
                torch.save({k: v.detach().cpu() for k, v in sd.items()}, f)
            folds.append({**_jsonable(dict(score)), "file": fold_file(i)})
        _write_json(tmp / METRICS, metrics)
        (tmp / REPORT_DIR).mkdir()
        if write_report is not None:
            write_report(tmp / REPORT_DIR)
        files = {}
        for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
            _fsync(p)
            files[p.relative_to(tmp).as_posix()] = sha256_file(p)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__},
            "config": to_dict(cfg),
            "class_names": list(CLASS_NAMES),
            "preprocessing": {"image_size": cfg.data.image_size, "mean": list(IMAGENET_MEAN),
                              "std": list(IMAGENET_STD), "resize": "INTER_AREA", "color": "RGB"},
            "temperature": float(temperature),
            "threshold": float(threshold),
            "folds": folds,
            "files": files,
        }
        _write_json(tmp / MANIFEST, manifest)
        _fsync(tmp / MANIFEST)
        _swap_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    _check_target(out, overwrite)  # again: it may have appeared while we were writing
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------- load
def _first_line(e: BaseException, limit: int = 200) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else "")[:limit]


def _fail(art: Path, what: str) -> UserError:
    return UserError(f"{art}: {what}")


def read_manifest(path: str | Path) -> dict:
    """Verify the artifact at ``path`` without unpickling anything; returns its manifest.

    Checks: the directory and manifest.json exist and parse, format and version match, every
    listed file exists with its sha256, and every fold has a listed file.
    """
    art = Path(path).expanduser().absolute()
    if art.name == MANIFEST and art.is_file():  # the manifest itself was named: use its directory
        art = art.parent
    rerun = "rerun leuk_ray.final to rebuild it"
    if not art.is_dir():
        partial = sorted(art.parent.glob(f".{art.name}.partial-*")) if art.parent.is_dir() else []
        hint = (f" (an unfinished save left {partial[0].name}: the run that wrote it did not "
                f"finish; {rerun})") if partial else ""
        raise _fail(art, f"artifact directory not found{hint}; pass the directory written by "
                         "leuk_ray.final")
    mpath = art / MANIFEST
    if not mpath.is_file():
        raise _fail(art, f"{MANIFEST} is missing: not a complete ensemble artifact; {rerun}")
    try:
        m = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(art, f"{MANIFEST} cannot be read ({e}); {rerun}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise _fail(art, f"{MANIFEST}: format {got!r} is not {FORMAT!r}; not a leuk-ray "
                         "ensemble artifact")
    if m.get("format_version") != FORMAT_VERSION:
        raise _fail(art, f"{MANIFEST}: format_version {m.get('format_version')!r} is not "
                         f"supported (this leuk-ray reads version {FORMAT_VERSION}); use the "
                         "leuk-ray version that wrote it, or rebuild the artifact")
    files, folds = m.get("files"), m.get("folds")
    if not isinstance(files, dict) or not isinstance(folds, list) or not folds:
        raise _fail(art, f"{MANIFEST}: 'files' or 'folds' missing or empty; {rerun}")
    for rel, digest in files.items():
        p = (art / rel).resolve()
        if not p.is_relative_to(art.resolve()):
            raise _fail(art, f"{MANIFEST} lists {rel!r}, outside the artifact; refusing it")
        if not p.is_file():
            raise _fail(art, f"{rel} is missing (listed in {MANIFEST}); the artifact is "
                             f"incomplete: restore the file or {rerun}")
        if sha256_file(p) != digest:
            raise _fail(art, f"{rel}: checksum mismatch (sha256 differs from {MANIFEST}); the file "
                             f"was changed or corrupted: restore it or {rerun}")
    for i, fold in enumerate(folds):
        name = fold.get("file") if isinstance(fold, dict) else None
        if not name or name not in files:
            raise _fail(art, f"{MANIFEST}: fold {i} has no checksummed weights file "
                             f"({name or 'none named'}); {rerun}")
    for key in ("temperature", "threshold", "config"):
        if key not in m:
            raise _fail(art, f"{MANIFEST}: '{key}' is missing; {rerun}")
    return m


def load_artifact(path: str | Path, *, device: str | torch.device = "cpu") -> Ensemble:
    """Verify (``read_manifest``) then load the ensemble onto ``device`` (auto, cpu, cuda)."""
    art = Path(path).expanduser().absolute()
    if art.name == MANIFEST and art.is_file():
        art = art.parent
    m = read_manifest(art)
    cfg = from_dict(m["config"], where=f"{art / MANIFEST} config")
    states = []
    for fold in m["folds"]:
        p = art / fold["file"]
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise _fail(art, f"{fold['file']}: refused to load: it holds objects other than "
                             "tensors (weights_only=True); only plain weight files are accepted: "
                             "rebuild the artifact") from None
        except Exception as e:
            raise _fail(art, f"{fold['file']}: cannot be loaded ({type(e).__name__}: "
                             f"{_first_line(e)}); rebuild the artifact") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise _fail(art, f"{fold['file']}: not a state dict of tensors; rebuild the artifact")
        states.append(sd)
    try:
        ens = build_ensemble(cfg, states, temperature=float(m["temperature"]),
                             threshold=float(m["threshold"]), device=device)
    except RuntimeError as e:  # load_state_dict: keys or shapes do not match the config's model
        raise _fail(art, f"fold weights do not match the model in {MANIFEST} "
                         f"({_first_line(e)}); rebuild the artifact") from None
    ens.class_names = tuple(m.get("class_names") or CLASS_NAMES)
    ens.path = art
    return ens
