"""Config: YAML + --set overrides, validated once with errors that name the key and the range."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from leuk_ray.config import (Config, config_from_yaml_with_extras, list_presets, load_config,
                             parse_override, save_config)
from leuk_ray.errors import UserError


def test_defaults_validate():
    cfg = load_config()
    assert cfg.model.backbone == "efficientnet_b3"
    assert cfg.train.focal_gamma == 1.5 and cfg.train.label_smoothing == 0.05


def test_yaml_then_set_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 7\n  lr: 1e-3\nmodel:\n  head: keras\n")
    cfg = load_config(p, ["train.epochs=3", "data.folds=5"])
    assert cfg.train.epochs == 3           # --set wins over the file
    assert cfg.train.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string: accepted
    assert cfg.model.head == "keras" and cfg.data.folds == 5


def test_smoke_sizes_and_set_after_smoke():
    cfg = load_config(None, ["train.epochs=1"], smoke=True)
    assert cfg.data.image_size == 64 and not cfg.model.pretrained and cfg.train.epochs == 1


@pytest.mark.parametrize("override, words", [
    ("train.lr=-1", ["train.lr", "-1", "(0.0, 10.0]"]),
    ("model.dropout=1", ["model.dropout", "[0.0, 1.0)"]),
    ("data.folds=1", ["data.folds", "[2, 20]"]),
    ("train.bogus=3", ["unknown key", "train.bogus"]),
    ("nosection.x=3", ["unknown key", "nosection.x"]),
    ("train.epochs=abc", ["train.epochs", "wrong type", "int"]),
    ("model.head=resnet", ["model.head", "mlp, keras"]),
    ("train.class_weights=1,x", ["train.class_weights"]),
    ("data.holdout=[0.5,0.5,0.5]", ["data.holdout"]),
    ("train.epochs", ["key=value"]),
])
def test_bad_values_name_key_and_range(override, words):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(UserError, match=r"bad.yaml: malformed YAML at line \d+"):
        load_config(p)
    q = tmp_path / "unknown.yaml"
    q.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(UserError, match=r"unknown.yaml: unknown section 'trian'"):
        load_config(q)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_save_round_trip_with_extras(tmp_path):
    cfg = load_config(None, ["train.epochs=4", "model.dropout=0.3"])
    p = save_config(cfg, tmp_path / "out" / "config.yaml", extra={"cv_score": 0.9})
    back, extras = config_from_yaml_with_extras(p)
    assert back == cfg and extras == {"cv_score": 0.9}
    assert yaml.safe_load(p.read_text())["train"]["epochs"] == 4


def test_parse_override_reads_yaml_values():
    assert parse_override("train.amp=false") == ("train.amp", False)
    assert parse_override("model.backbone=resnet18") == ("model.backbone", "resnet18")


def test_presets_listed_and_load():
    for name in list_presets():
        assert isinstance(load_config(None, preset=name), Config)
    with pytest.raises(UserError, match="unknown preset"):
        load_config(None, preset="nope")


def test_cli_bad_set_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "leuk_ray.search", "--set", "train.lr=-1",
                        "--data", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.lr" in lines[0] and "Traceback" not in r.stderr
