"""The ensemble artifact: save it atomically, verify it before loading, predict with it.

Layout of an artifact directory::

    manifest.json    format, version, config, the model's description (backbone, weights, data,
                     smoke or not), class names, preprocessing, calibration (a temperature per
                     fold and a threshold; again for TTA), threshold, fold scores and the sha256
                     of every other file (written last)
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
import importlib.metadata
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

from leuk_ray.calibration import Calibration
from leuk_ray.config import Config, from_dict, to_dict
from leuk_ray.data.transforms import Preprocessing, preprocessing_for
from leuk_ray.engine import inference_settings, predict_probs
from leuk_ray.errors import UserError
from leuk_ray.model import create_model

FORMAT = "leuk-ray-ensemble"
FORMAT_VERSION = 2  # 2: per-fold temperatures (calibration), model description, the backbone's
#                      preprocessing (mean/std/interpolation from timm; 1 was ImageNet + INTER_AREA)
MANIFEST = "manifest.json"
METRICS = "metrics.json"
REPORT_DIR = "report"
CLASS_NAMES = ("hem", "all")


CALIBRATION_METHOD = ("fold i's P(ALL) -> sigmoid(logit(p) / temperatures[i]); mean over folds; "
                      "ALL when >= threshold (leuk_ray.calibration)")


def fold_file(i: int) -> str:
    return f"fold_{i}.pt"


def leuk_ray_version() -> str:
    """The installed leuk-ray's version ("unknown" when run from a tree that is not installed)."""
    try:
        return importlib.metadata.version("leuk-ray")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------- ensemble
@dataclass
class Ensemble:
    """k fold models; ``calibration.combine`` of their P(ALL) is the prediction (see
    ``leuk_ray.calibration``). ``tta_calibration`` is what was fitted for TTA outputs (None when the
    artifact was built without TTA: predicting with TTA is then refused)."""

    cfg: Config
    models: list[nn.Module]
    calibration: Calibration
    tta_calibration: Calibration | None = None
    class_names: tuple[str, ...] = CLASS_NAMES
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    path: Path | None = None            # the artifact directory it was loaded from, if any
    preprocessing: Preprocessing | None = None  # None: the config's (``preprocessing_for(cfg)``)

    def __post_init__(self) -> None:
        if self.preprocessing is None:
            self.preprocessing = preprocessing_for(self.cfg)

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @property
    def threshold(self) -> float:
        """The decision threshold without TTA (``calibration_for(True).threshold`` with TTA)."""
        return self.calibration.threshold

    def calibration_for(self, tta: bool) -> Calibration:
        """What was fitted for this kind of output; a UserError for TTA when none was fitted."""
        if not tta:
            return self.calibration
        if self.tta_calibration is None:
            where = f"{self.path}: " if self.path else ""
            raise UserError(f"{where}this ensemble was built without a TTA calibration "
                            "(final.tta = false): predict without --tta, or rebuild it with "
                            "final.tta = true")
        return self.tta_calibration

    def to(self, device: str | torch.device) -> Ensemble:
        self.device = resolve_device(device)
        for m in self.models:
            _place(m, self.device)
        return self

    def predict(self, ds: Dataset, *, tta: bool = False, batch_size: int = 64,
                device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated ensemble P(ALL) per row, uncalibrated per-fold P(ALL) of shape (k, N)).

        ``ds`` yields (uint8 HWC image at ``image_size``, resized with
        ``preprocessing.interpolation``, label), like ``CellDataset``. On CUDA the models run
        channels_last, under the autocast ``train.amp`` asks for (``inference_settings``).
        """
        cal = self.calibration_for(tta)
        if device is not None and resolve_device(device) != self.device:
            self.to(device)
        per_fold = np.stack([predict_probs(m, ds, device=self.device, batch_size=batch_size,
                                           prep=self.preprocessing, tta=tta,
                                           amp=self.cfg.train.amp) for m in self.models])
        return cal.combine(per_fold), per_fold

    def label(self, prob_all: np.ndarray, *, tta: bool = False) -> list[str]:
        """Class name per row by the fitted threshold (ALL when prob_all >= threshold)."""
        t = self.calibration_for(tta).threshold
        return [self.class_names[int(p >= t)] for p in np.asarray(prob_all)]


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


def _place(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device`` in eval mode, channels_last on CUDA (``inference_settings``)."""
    _, memory_format = inference_settings(device, amp=False)
    return model.to(device=device, memory_format=memory_format).eval()


def _inference_model_config(cfg: Config):
    # The weights come from the fold files: never fetch or read backbone weights again.
    return dataclasses.replace(cfg.model, pretrained=False, pretrained_path="")


def _calibration(k: int, calibration: Calibration | None, temperature: float,
                 threshold: float) -> Calibration:
    cal = calibration if calibration is not None else \
        Calibration.uniform(k, temperature, threshold)
    if cal.k != k:
        raise ValueError(f"a calibration of {cal.k} folds for {k} fold models")
    return cal


def _calibrations_given(k: int, calibration: Calibration | None,
                        tta_calibration: Calibration | None, temperature: float,
                        threshold: float) -> tuple[Calibration, Calibration | None]:
    if calibration is None and tta_calibration is None:  # the short form: the same for TTA
        cal = Calibration.uniform(k, temperature, threshold)
        return cal, cal
    cal = _calibration(k, calibration, temperature, threshold)
    if tta_calibration is not None:
        _calibration(k, tta_calibration, 1.0, 0.5)
    return cal, tta_calibration


def build_ensemble(cfg: Config, fold_states: Sequence[dict[str, torch.Tensor]], *,
                   calibration: Calibration | None = None,
                   tta_calibration: Calibration | None = None,
                   temperature: float = 1.0, threshold: float = 0.5,
                   device: str | torch.device = "cpu",
                   preprocessing: Preprocessing | None = None) -> Ensemble:
    """An in-memory Ensemble from fold state dicts (to evaluate before saving).

    ``calibration`` (and ``tta_calibration``) as fitted by ``fit_calibration``; without them,
    ``temperature`` for every fold and ``threshold``, with and without TTA. ``preprocessing``:
    the artifact's (default: ``preprocessing_for(cfg)``, what training used)."""
    dev = resolve_device(device)
    cal, tta_calibration = _calibrations_given(len(fold_states), calibration, tta_calibration,
                                               temperature, threshold)
    models = []
    for sd in fold_states:
        m = create_model(_inference_model_config(cfg))
        m.load_state_dict(sd, strict=True)
        models.append(_place(m, dev))
    return Ensemble(cfg, models, calibration=cal, tta_calibration=tta_calibration,
                    class_names=CLASS_NAMES, device=dev, preprocessing=preprocessing)


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
                  fold_scores: Sequence[dict], metrics: dict,
                  calibration: Calibration | None = None,
                  tta_calibration: Calibration | None = None,
                  temperature: float = 1.0, threshold: float = 0.5,
                  model_info: dict | None = None,
                  write_report: Callable[[Path], Any] | None = None,
                  overwrite: bool = True, weights: dict | None = None,
                  fold_weights: Sequence[dict] | None = None) -> Path:
    """Write the artifact to ``out_dir`` atomically; returns ``out_dir``.

    ``fold_states[i]`` is fold i's model state dict and ``fold_scores[i]`` its scores (fold,
    val_f1, best_epoch, ...). ``calibration`` (and ``tta_calibration``) as fitted by
    ``fit_calibration``; without them, ``temperature`` for every fold and ``threshold``, with and
    without TTA.
    ``model_info`` describes the model (backbone, weights, data, smoke...: the manifest's
    "model" entry). ``weights`` (``WeightsInfo.to_dict()``: architecture, source, file, sha256)
    names the weights the backbones started from, as the driver checked them, and
    ``fold_weights[i]`` as fold i's worker loaded them (the manifest's top-level "weights" and each
    fold's "weights"). ``write_report(report_dir)`` fills ``report/``. On an exception the partial
    directory is removed and ``out_dir`` is untouched.
    """
    out = Path(out_dir).expanduser().absolute()
    if len(fold_states) == 0:
        raise ValueError("save_artifact: no fold models")
    if len(fold_states) != len(fold_scores):
        raise ValueError(f"save_artifact: {len(fold_states)} fold models but "
                         f"{len(fold_scores)} fold scores")
    cal, tta_calibration = _calibrations_given(len(fold_states), calibration, tta_calibration,
                                               temperature, threshold)
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
            if fold_weights is not None and i < len(fold_weights):
                folds[-1]["weights"] = _jsonable(dict(fold_weights[i]))
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
            "versions": {"torch": torch.__version__, "leuk_ray": leuk_ray_version()},
            "model": _jsonable(dict(model_info or {})),
            "weights": _jsonable(dict(weights or {})),
            "config": to_dict(cfg),
            "class_names": list(CLASS_NAMES),
            "preprocessing": preprocessing_for(cfg).to_dict(),
            "calibration": {"method": CALIBRATION_METHOD, "plain": cal.to_dict(),
                            "tta": None if tta_calibration is None else tta_calibration.to_dict()},
            "threshold": cal.threshold,
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
        if (art / "ensemble" / MANIFEST).is_file():  # a search directory, holding its ensemble
            raise _fail(art, f"this is a search directory, not an ensemble artifact; its ensemble "
                             f"is {art / 'ensemble'}: pass --model {art / 'ensemble'}")
        if (art / "best_config.yaml").is_file():
            raise _fail(art, "this is a search directory without an ensemble; build one with "
                             f"python -m leuk_ray.final --from {art}")
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
    for key in ("calibration", "threshold", "config"):
        if key not in m:
            raise _fail(art, f"{MANIFEST}: '{key}' is missing; {rerun}")
    _calibrations(art, m)
    _preprocessing(art, m)
    return m


def _preprocessing(art: Path, m: dict) -> Preprocessing:
    """The manifest's preprocessing (what the fold models were trained with), checked."""
    try:
        prep = Preprocessing.from_dict(m.get("preprocessing"))
    except ValueError as e:
        raise _fail(art, f"{MANIFEST}: preprocessing is not valid ({_first_line(e)}); rerun "
                         "leuk_ray.final to rebuild it") from None
    data = m["config"].get("data") if isinstance(m["config"], dict) else None
    size = data.get("image_size") if isinstance(data, dict) else None
    if prep.image_size != size:
        raise _fail(art, f"{MANIFEST}: preprocessing.image_size {prep.image_size} is not the "
                         f"config's data.image_size {size!r}; rerun leuk_ray.final to rebuild it")
    return prep


def _calibrations(art: Path, m: dict) -> tuple[Calibration, Calibration | None]:
    """The manifest's (plain, TTA) calibrations, checked against its folds."""
    c = m.get("calibration")
    out = []
    for kind in ("plain", "tta"):
        d = c.get(kind) if isinstance(c, dict) else None
        if d is None and kind == "tta":
            out.append(None)
            continue
        try:
            cal = Calibration.from_dict(d)
        except (ValueError, TypeError, KeyError) as e:
            raise _fail(art, f"{MANIFEST}: calibration.{kind} is not valid ({_first_line(e)}); "
                             "rerun leuk_ray.final to rebuild it") from None
        if cal.k != len(m["folds"]):
            raise _fail(art, f"{MANIFEST}: calibration.{kind} has {cal.k} temperatures for "
                             f"{len(m['folds'])} folds; rerun leuk_ray.final to rebuild it")
        out.append(cal)
    return out[0], out[1]


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
        cal, tta_cal = _calibrations(art, m)
        ens = build_ensemble(cfg, states, calibration=cal, tta_calibration=tta_cal,
                             device=device, preprocessing=_preprocessing(art, m))
    except RuntimeError as e:  # load_state_dict: keys or shapes do not match the config's model
        raise _fail(art, f"fold weights do not match the model in {MANIFEST} "
                         f"({_first_line(e)}); rebuild the artifact") from None
    ens.class_names = tuple(m.get("class_names") or CLASS_NAMES)
    ens.path = art
    return ens
