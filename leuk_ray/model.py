"""The classifier: a timm backbone (features only) and one of the two seed heads.

    model = create_model(cfg.model)        # logits (B, 2); index 1 = ALL
    loss = criterion(model(x), y) + model.regularization_loss()

Heads
- ``mlp`` (seed 000): average-pooled features -> LayerNorm -> Linear(F, 256) -> LayerNorm -> GELU ->
  Dropout(p) -> Linear(256, 128) -> LayerNorm -> GELU -> Dropout(p/2) -> Linear(128, 2).
- ``keras`` (seed 003): max-pooled features -> BatchNorm -> Linear(F, 256) -> ReLU -> Dropout(p) ->
  Linear(256, 2), with L1 and L2 penalties on the weight and bias of Linear(F, 256) returned by
  ``regularization_loss()`` (the Keras ``kernel_regularizer``/``bias_regularizer`` of that layer).

Weights: ``model.pretrained_path`` (a local .safetensors/.pth backbone file) wins over
``model.pretrained`` (ImageNet weights from the timm hub). When weights are asked for and cannot be
had, a ``UserError`` says so: never a silent random initialisation.
"""
from __future__ import annotations

import difflib
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn

from leuk_ray.config import ModelConfig
from leuk_ray.errors import UserError

NUM_CLASSES = 2


class LeukemiaClassifier(nn.Module):
    """Backbone (pooled features, no classifier) + head; ``forward`` returns logits (B, 2)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, *, head_type: str,
                 l1: float = 0.0, l2: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head_type = head_type
        self.l1 = l1
        self.l2 = l2

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def regularization_loss(self) -> torch.Tensor:
        """Keras head: l1 * sum|w| + l2 * sum w^2 over Dense(256)'s weight and bias; else 0."""
        if self.head_type != "keras" or (self.l1 == 0 and self.l2 == 0):
            return torch.zeros((), device=next(self.parameters()).device)
        dense: nn.Linear = self.head.dense
        total = torch.zeros((), device=dense.weight.device)
        for p in (dense.weight, dense.bias):
            total = total + self.l1 * p.abs().sum() + self.l2 * p.pow(2).sum()
        return total


def mlp_head(num_features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(num_features),
        nn.Linear(num_features, 256), nn.LayerNorm(256), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(256, 128), nn.LayerNorm(128), nn.GELU(), nn.Dropout(dropout / 2),
        nn.Linear(128, NUM_CLASSES),
    )


def keras_head(num_features: int, dropout: float) -> nn.Sequential:
    # Named children so that regularization_loss can find the penalised layer.
    return nn.Sequential(OrderedDict(
        norm=nn.BatchNorm1d(num_features),
        dense=nn.Linear(num_features, 256),
        act=nn.ReLU(),
        drop=nn.Dropout(dropout),
        out=nn.Linear(256, NUM_CLASSES),
    ))


def create_model(mcfg: ModelConfig) -> LeukemiaClassifier:
    """Build the classifier described by ``cfg.model`` (weights as described in the module doc)."""
    check_backbone_name(mcfg.backbone)
    pool = "max" if mcfg.head == "keras" else "avg"
    backbone = _create_backbone(mcfg, pool)
    f = int(backbone.num_features)
    if mcfg.head == "keras":
        return LeukemiaClassifier(backbone, keras_head(f, mcfg.dropout), head_type="keras",
                                  l1=mcfg.l1, l2=mcfg.l2)
    if mcfg.head == "mlp":
        return LeukemiaClassifier(backbone, mlp_head(f, mcfg.dropout), head_type="mlp")
    raise UserError(f"model.head = {mcfg.head!r} is not allowed: use mlp or keras")


def check_backbone_name(name: str) -> None:
    """UserError listing close timm names when ``name`` is not a timm model."""
    if timm.is_model(name):
        return
    close = timm.list_models(f"*{name}*")[:8]
    if not close:
        close = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else \
        "see timm.list_models() for the available names"
    raise UserError(f"model.backbone = {name!r} is not a timm model ({hint})")


def _create_backbone(mcfg: ModelConfig, pool: str) -> nn.Module:
    name = mcfg.backbone
    if mcfg.pretrained_path:
        backbone = timm.create_model(name, pretrained=False, num_classes=0, global_pool=pool)
        load_backbone_weights(backbone, mcfg.pretrained_path)
        return backbone
    if not mcfg.pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool=pool)
    try:
        backbone = timm.create_model(name, pretrained=True, num_classes=0, global_pool=pool)
    except Exception as e:  # network, hub, cache or file errors: all mean "no weights"
        raise UserError(_hub_error(name, f"{type(e).__name__}: {_first_line(e)}")) from None
    pc = getattr(backbone, "pretrained_cfg", None) or {}
    if not (pc.get("url") or pc.get("hf_hub_id") or pc.get("file") or pc.get("state_dict")):
        raise UserError(_hub_error(name, "timm has no pretrained weights for this model"))
    return backbone


def _hub_error(name: str, why: str) -> str:
    return (f"could not fetch ImageNet weights for {name} from the timm hub ({why}): set "
            "model.pretrained_path=FILE for offline clusters, or model.pretrained=false to train "
            "from scratch")


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:limit]


# ------------------------------------------------------------------------ local backbone weights
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth file holding a state dict, raw or under "state_dict"/"model"."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{p}: model.pretrained_path file not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            raw = load_file(str(p), device="cpu")
        else:
            raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{p}: cannot read weights ({type(e).__name__}: {_first_line(e)}); "
                        "model.pretrained_path must be a .safetensors file or a .pth state dict "
                        "saved with torch.save(model.state_dict(), ...)") from None
    sd = raw
    if isinstance(sd, dict):
        for key in ("state_dict", "model"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not sd or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError(f"{p}: not a state dict of tensors (expected a raw state dict or one under "
                        "'state_dict' or 'model')")
    return sd


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a backbone state dict strictly, ignoring classifier keys (and module./backbone.)."""
    sd = read_state_dict(path)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # a whole LeukemiaClassifier state dict
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    classifier = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else classifier
    prefixes = tuple(f"{c}." for c in names)
    own = backbone.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not (prefixes and k.startswith(prefixes))}
    missing = sorted(set(own) - set(sd))
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
        name = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture") or \
            type(backbone).__name__
        raise UserError(f"{Path(path).expanduser()}: weights do not match backbone {name}: "
                        f"{', '.join(parts)}; use weights saved from the same timm model as "
                        "model.backbone")
    backbone.load_state_dict(sd, strict=True)
