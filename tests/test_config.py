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


# ------------------------------------------------------------ every layer checked; smoke shrinks
def test_bad_value_in_the_file_is_an_error_even_with_smoke_test(tmp_path):
    p = tmp_path / "user.yaml"
    p.write_text("train: {lr: -1}\n")
    with pytest.raises(UserError) as e:
        load_config(p, smoke=True)
    msg = str(e.value)
    assert msg.startswith(f"{p}: train.lr = -1") and "out of range" in msg and "\n" not in msg


@pytest.mark.parametrize("override", ["train.lr=1e-3", "data.max_images=0"])
def test_bad_value_in_the_file_is_an_error_even_when_set_replaces_it(tmp_path, override):
    p = tmp_path / "user.yaml"
    p.write_text("train: {lr: -1}\n")
    with pytest.raises(UserError, match=rf"^{p}: train\.lr = -1"):
        load_config(p, [override])
    q = tmp_path / "holdout.yaml"
    q.write_text("data: {holdout: [0.5, 0.5, 0.5]}\n")
    with pytest.raises(UserError, match=rf"^{q}: data\.holdout"):
        load_config(q, ["data.holdout=[0.7, 0.15, 0.15]"])


def test_every_layer_is_checked_as_applied(tmp_path):
    with pytest.raises(UserError, match=r"^base config: model\.dropout = 1\.0"):
        load_config(None, ["model.dropout=0.1"], base={"model": {"dropout": 1.0}})
    with pytest.raises(UserError, match=r"^--set train\.epochs=0: train\.epochs"):
        load_config(None, ["train.epochs=0", "train.epochs=3"])


def test_smoke_test_only_shrinks_sizes_and_keeps_hyperparameters(tmp_path):
    p = tmp_path / "user.yaml"
    p.write_text("train: {lr: 2.0e-4, patience: 3, epochs: 2, batch_size: 4, threads: 0}\n"
                 "data: {image_size: 32, max_images: 0, folds: 5}\n"
                 "model: {pretrained_path: /nowhere/b3.safetensors, head: keras}\n")
    cfg = load_config(p, smoke=True)
    t, d, m = cfg.train, cfg.data, cfg.model
    assert (t.lr, t.patience) == (pytest.approx(2e-4), 3)          # hyperparameters: the user's
    assert (t.epochs, t.batch_size, d.image_size) == (2, 4, 32)      # already small: kept
    assert (d.max_images, t.threads, d.folds) == (240, 1, 2)         # 0 = all, 5 folds: capped
    assert (m.backbone, m.pretrained, m.pretrained_path, m.head) == \
        ("test_efficientnet", False, "", "keras")
    big = load_config(None, smoke=True)
    assert (big.train.epochs, big.train.batch_size, big.data.image_size) == (6, 16, 64)
    assert big.train.lr == Config().train.lr
    q = tmp_path / "official.yaml"
    q.write_text("data: {split: official, folds: 3}\n")
    assert load_config(q, smoke=True).data.folds == 3  # the C-NMC split has exactly 3 folds
