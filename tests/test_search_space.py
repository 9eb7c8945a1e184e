"""Search-space YAML: the packaged spaces load; every bad case is one clear error."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from leuk_ray.config import load_config
from leuk_ray.errors import UserError
from leuk_ray.search_space import apply_params, load_space

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_spaces_load():
    for p in (ROOT / "search_spaces").glob("*.yaml"):
        space = load_space(p)
        assert set(space.keys) >= {"train.lr", "train.focal_gamma", "train.label_smoothing",
                                   "model.dropout"}
    default = load_space(ROOT / "search_spaces" / "default.yaml")
    # seed 000's values come first
    assert default.first[0] == {"train.lr": 1e-5, "train.focal_gamma": 1.5,
                                "train.label_smoothing": 0.05, "model.dropout": 0.2}
    dists = default.optuna_space()
    assert isinstance(dists["train/lr"], optuna.distributions.FloatDistribution)
    assert dists["train/lr"].log


def _write(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, words", [
    ("params:\n  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-4}\n", ["low", "less than"]),
    ("params:\n  train.lr: {type: uniform, low: -1.0, high: 1.0e-3}\n", ["learning rate", "> 0"]),
    ("params:\n  train.lr: {type: loguniform, low: 0.0, high: 1.0e-3}\n", ["loguniform", "low > 0"]),
    ("params:\n  train.lr: {type: gaussian, low: 0.1, high: 0.2}\n", ["unknown distribution",
                                                                     "gaussian"]),
    ("params:\n  train.lrate: {type: uniform, low: 0.1, high: 0.2}\n", ["unknown key",
                                                                       "train.lrate"]),
    ("params:\n  model.dropout: {type: uniform, low: 0.1, high: 1.5}\n", ["model.dropout",
                                                                         "out of range"]),
    ("params:\n  model.head: {type: choice, values: [mlp, vit]}\n", ["model.head", "vit"]),
    ("params:\n  train.lr: {type: uniform, low: 0.1}\n", ["'low' and 'high'"]),
    ("params:\n  train.lr: {type: uniform, low: 0.1, high: 0.2, step: 1}\n", ["unknown field"]),
    ("nothing: 1\n", ["'params'"]),
    ("params:\n  train.lr: {type: uniform, low: 0.1, high: 0.2}\nfirst:\n  - {train.lr: 0.5}\n",
     ["first[0]", "outside"]),
    ("params:\n  train.lr: {type: uniform, low: 0.1, high: 0.2}\nfirst:\n  - {model.dropout: 0.1}\n",
     ["first[0]", "not searched"]),
    ("params: [1, 2\n", ["malformed YAML"]),
])
def test_bad_spaces(tmp_path, text, words):
    with pytest.raises(UserError) as e:
        load_space(_write(tmp_path, text))
    msg = str(e.value)
    assert "space.yaml" in msg and "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_missing_space_file(tmp_path):
    with pytest.raises(UserError, match="search space not found"):
        load_space(tmp_path / "nope.yaml")


def test_apply_params_nested_and_dotted():
    base = load_config()
    a = apply_params(base, {"train": {"lr": 3e-4}, "model": {"dropout": 0.3}})
    b = apply_params(base, {"train/lr": 3e-4, "model/dropout": 0.3})
    assert a == b and a.train.lr == 3e-4 and base.train.lr != 3e-4
