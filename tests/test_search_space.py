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


@pytest.mark.parametrize("key, spec, why", [
    ("data.image_size", "{type: choice, values: [64, 128]}", "the data and its folds"),
    ("data.seed", "{type: int, low: 0, high: 5}", "the data and its folds"),
    ("train.epochs", "{type: int, low: 2, high: 8}", "ASHA's budget"),
    ("model.backbone", "{type: choice, values: [test_efficientnet, efficientnet_b0]}",
     "one search per backbone"),
    ("search.seed", "{type: int, low: 0, high: 5}", "run setting"),
    ("ray.cpus_per_worker", "{type: uniform, low: 0.5, high: 1.0}", "run setting"),
    ("final.tta", "{type: choice, values: [true, false]}", "run setting"),
    ("train.device", "{type: choice, values: [cpu, auto]}", "run setting"),
])
def test_only_model_and_training_keys_can_be_searched(tmp_path, key, spec, why):
    """Issue 14.4: a data/search/ray/final key or train.epochs in a space is refused, naming the
    file, the key, why, and what may be searched (before: silently accepted)."""
    with pytest.raises(UserError) as e:
        load_space(_write(tmp_path, f"params:\n  {key}: {spec}\n"))
    msg = str(e.value)
    assert "\n" not in msg and "space.yaml" in msg and f"params.{key} cannot be searched" in msg
    assert why in msg and "searchable keys: model.head" in msg and "train.amp" in msg


def test_searchable_keys_all_load_including_a_boolean_choice(tmp_path):
    from leuk_ray.search_space import SEARCHABLE

    space = load_space(_write(tmp_path, "params:\n  train.amp: {type: choice, values: [true, false]}\n"
                                        "  model.dropout: {type: uniform, low: 0.0, high: 0.1}\n"))
    assert space.params[0].values == [True, False]
    assert apply_params(load_config(), {"train/amp": False}).train.amp is False
    for key in SEARCHABLE:
        from leuk_ray.config import check_key
        check_key(key)  # every allowed key is a real config key
