"""Search spaces: a YAML file of config keys and their distributions, validated once.

    params:
      train.lr:              {type: loguniform, low: 1.0e-5, high: 1.0e-3}
      train.focal_gamma:     {type: uniform, low: 0.0, high: 3.0}
      model.dropout:         {type: uniform, low: 0.0, high: 0.5}
      train.optimizer:       {type: choice, values: [adamw, adamax]}
    first:                   # evaluated first, in order (seed 000's values)
      - {train.lr: 1.0e-5, train.focal_gamma: 1.5, model.dropout: 0.2}

Types: uniform, loguniform (low > 0), int (integers low..high), choice (values list).
Every key must be one of ``SEARCHABLE`` (the model head's and the training keys that change what a
trial learns); bounds must lie in the key's allowed range. Optuna sees the keys with '/' instead of '.' (``train/lr``), which is also how
Tune nests them in a trial's config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna.distributions as od

from leuk_ray.config import Config, check_key, from_dict, read_yaml, set_value, to_dict, validate
from leuk_ray.errors import UserError

TYPES = ("uniform", "loguniform", "int", "choice")

# What a trial may vary: the model and training keys, less FIXED. Everything else is fixed for a whole search, because the trials must be
# comparable and the best one must be what `final` rebuilds: data.* defines the folds every trial
# is scored on (and the trials would not see a searched value: they share one prepared split);
# train.epochs is ASHA's budget (max_t); model.backbone/pretrained/pretrained_path pick the weights
# checked before Ray starts; device, threads, seed, determinism and the non-finite limit are run
# settings; ray.*, search.* and final.* configure the run, not the model.
FIXED = ("model.backbone", "model.pretrained", "model.pretrained_path", "model.pretrained_arch",
         "train.epochs",
         "train.device", "train.threads", "train.seed", "train.deterministic", "train.max_nonfinite")
SEARCHABLE = tuple(f"{section}.{f.name}" for section in ("model", "train")
                   for f in dataclasses.fields(getattr(Config(), section))
                   if f"{section}.{f.name}" not in FIXED)
_FIXED_WHY = {
    "data": "the data and its folds are the same for every trial",
    "train.epochs": "it is ASHA's budget: set it for the whole search with --set train.epochs=N",
    "model.backbone": "run one search per backbone (--set model.backbone=NAME)",
    "model.pretrained": "the starting weights are fixed for a whole search",
    "model.pretrained_path": "the starting weights are fixed for a whole search",
    "model.pretrained_arch": "the starting weights are fixed for a whole search",
}


def _check_searchable(key: str, where: str) -> None:
    if key in SEARCHABLE:
        return
    why = _FIXED_WHY.get(key) or _FIXED_WHY.get(key.split(".")[0]) or \
        "it is a run setting, fixed for a whole search (set it with --set)"
    raise UserError(f"{where}: params.{key} cannot be searched: {why}; searchable keys: "
                    f"{', '.join(SEARCHABLE)}")


@dataclass
class Param:
    key: str                 # config key, e.g. "train.lr"
    type: str
    low: float | None = None
    high: float | None = None
    values: list | None = None

    @property
    def optuna_name(self) -> str:
        return self.key.replace(".", "/")

    def distribution(self) -> od.BaseDistribution:
        if self.type == "uniform":
            return od.FloatDistribution(self.low, self.high)
        if self.type == "loguniform":
            return od.FloatDistribution(self.low, self.high, log=True)
        if self.type == "int":
            return od.IntDistribution(int(self.low), int(self.high))
        return od.CategoricalDistribution(self.values)


@dataclass
class SearchSpace:
    path: str
    params: list[Param]
    first: list[dict[str, Any]] = field(default_factory=list)

    def optuna_space(self) -> dict[str, od.BaseDistribution]:
        return {p.optuna_name: p.distribution() for p in self.params}

    def optuna_points(self) -> list[dict[str, Any]]:
        return [{k.replace(".", "/"): v for k, v in point.items()} for point in self.first]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_value(base: Config, key: str, value: Any, where: str) -> None:
    """The value must be acceptable for the config key (type and allowed range)."""
    probe = from_dict(to_dict(base), where=where)
    set_value(probe, key, value, where=where)
    validate(probe, where=where)


def _parse_param(base: Config, key: str, spec: Any, where: str) -> Param:
    w = f"{where}: params.{key}"
    if not isinstance(spec, dict):
        raise UserError(f"{w}: expected a mapping like {{type: uniform, low: 0.0, high: 1.0}}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise UserError(f"{w}: unknown distribution type {kind!r} (allowed: {', '.join(TYPES)})")
    allowed = {"type", "values"} if kind == "choice" else {"type", "low", "high"}
    extra = set(spec) - allowed
    if extra:
        raise UserError(f"{w}: unknown field(s) {sorted(extra)} for type {kind} "
                        f"(allowed: {sorted(allowed)})")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise UserError(f"{w}: type choice needs a non-empty list 'values'")
        for v in values:
            _check_value(base, key, v, w)
        return Param(key, kind, values=values)
    low, high = spec.get("low"), spec.get("high")
    if not _is_number(low) or not _is_number(high):
        raise UserError(f"{w}: 'low' and 'high' must both be numbers (got low={low!r}, high={high!r})")
    if low >= high:
        raise UserError(f"{w}: low ({low}) must be less than high ({high})")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{w}: loguniform needs low > 0 (got {low})")
    if key == "train.lr" and low <= 0:
        raise UserError(f"{w}: a learning rate must be > 0 (got low={low})")
    if kind == "int" and (int(low) != low or int(high) != high):
        raise UserError(f"{w}: type int needs whole-number bounds (got {low}, {high})")
    for bound in (low, high):  # both ends must be valid values of the key
        _check_value(base, key, int(bound) if kind == "int" else bound, w)
    return Param(key, kind, low=low, high=high)


def _check_point(params: dict[str, Param], point: Any, i: int, where: str) -> dict:
    w = f"{where}: first[{i}]"
    if not isinstance(point, dict):
        raise UserError(f"{w}: expected a mapping of searched keys to values")
    unknown = set(point) - set(params)
    missing = set(params) - set(point)
    if unknown:
        raise UserError(f"{w}: key(s) {sorted(unknown)} are not searched in 'params'")
    if missing:
        raise UserError(f"{w}: missing value(s) for {sorted(missing)}: give every searched key")
    for key, value in point.items():
        p = params[key]
        if p.type == "choice":
            if value not in p.values:
                raise UserError(f"{w}: {key} = {value!r} is not one of {p.values}")
        elif not _is_number(value) or not p.low <= value <= p.high:
            raise UserError(f"{w}: {key} = {value!r} is outside [{p.low}, {p.high}]")
    return point


def load_space(path: str | Path, base: Config | None = None) -> SearchSpace:
    """Read and validate a search-space YAML against the config it will be applied to."""
    base = base or Config()
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{p}: search space not found (the packaged ones are in search_spaces/)")
    d = read_yaml(p)
    where = str(p)
    if not isinstance(d, dict) or not isinstance(d.get("params"), dict) or not d["params"]:
        raise UserError(f"{where}: expected a top-level 'params' mapping of config keys to "
                        "distributions")
    extra = set(d) - {"params", "first"}
    if extra:
        raise UserError(f"{where}: unknown top-level key(s) {sorted(extra)} (allowed: params, first)")
    params: dict[str, Param] = {}
    for key, spec in d["params"].items():
        check_key(str(key), where=f"{where}: params")
        _check_searchable(str(key), where)
        params[key] = _parse_param(base, key, spec, where)
    first = d.get("first") or []
    if not isinstance(first, list):
        raise UserError(f"{where}: 'first' must be a list of points")
    points = [_check_point(params, pt, i, where) for i, pt in enumerate(first)]
    return SearchSpace(str(p), list(params.values()), points)


def apply_params(base: Config, params: dict[str, Any]) -> Config:
    """A trial's config: the base with searched values set; ``params`` nested or dotted."""
    flat: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k.replace("/", ".")] = v
    cfg = from_dict(to_dict(base), where="trial")
    for key, value in flat.items():
        set_value(cfg, key, value, where="trial")
    return validate(cfg, where="trial")
