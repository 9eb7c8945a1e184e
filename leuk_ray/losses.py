"""Focal loss with per-class alpha and label smoothing, computed from log-softmax.

For a row with true class y, log-probabilities log p (log_softmax of the logits, in float32) and
the smoothed target q = (1 - s) * onehot(y) + s / C, the smoothed cross-entropy and the loss are

    ce_i   = - sum_c q_c * log p_c
    loss_i = alpha_y * (1 - exp(-ce_i)) ** gamma * ce_i

and the batch loss is the alpha-weighted mean  sum_i loss_i / sum_i alpha_{y_i}  (the plain mean
when alpha is None). The focal factor is taken from the SMOOTHED cross-entropy (pt = exp(-ce), as
seed 000's StableFocalLoss): the loss is then an increasing function of ce, so it has its minimum
where smoothed CE has it (p_y = 1 - s + s/C) and a confident correct logit beyond that is pulled
back, as smoothing intends. (A factor (1 - p_y) ** gamma from the unsmoothed p_y would vanish at
high confidence and switch smoothing off there.) Without smoothing pt = p_y, Lin et al.'s focal loss;
with gamma = 0 and s = 0 this is exactly ``F.cross_entropy(logits, y, weight=alpha)`` (torch's
weighted mean). Everything is computed in float32 from log-probabilities (1 - pt = -expm1(-ce)),
so extreme logits give finite values and gradients.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leuk_ray.errors import UserError


class FocalLoss(nn.Module):
    def __init__(self, alpha: torch.Tensor | None = None, gamma: float = 1.5,
                 smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.smoothing = float(smoothing)
        self.register_buffer("alpha", None if alpha is None else
                             torch.as_tensor(alpha, dtype=torch.float32).flatten())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)                       # (B, C)
        n_classes = logp.shape[-1]
        if self.smoothing > 0:
            q = torch.full_like(logp, self.smoothing / n_classes)
            q.scatter_(1, target.unsqueeze(1), 1.0 - self.smoothing + self.smoothing / n_classes)
            ce = -(q * logp).sum(dim=1)                                       # (B,)
        else:
            ce = -logp.gather(1, target.unsqueeze(1)).squeeze(1)
        if self.gamma > 0:
            # 1 - pt with pt = exp(-ce); clamped away from 0 so that gamma < 1 keeps a finite
            # gradient at ce = 0 (where the loss and its gradient are 0 anyway)
            one_minus_pt = (-torch.expm1(-ce)).clamp(min=torch.finfo(torch.float32).tiny)
            ce = one_minus_pt.pow(self.gamma) * ce
        if self.alpha is None:
            return ce.mean()
        w = self.alpha.to(logp.device)[target]
        return (w * ce).sum() / w.sum()


def class_alpha(labels: Sequence[int] | np.ndarray | torch.Tensor, spec: str,
                n_classes: int = 2) -> torch.Tensor | None:
    """Per-class alpha from ``train.class_weights``.

    "auto": inverse class frequency of ``labels`` (labels < 0 ignored), normalised to sum to
    n_classes (balanced classes give 1, 1); a class absent from ``labels`` counts as 1 row.
    "none": None (no weighting). "w_hem,w_all": those numbers.
    """
    spec = str(spec).strip().lower()
    if spec == "none":
        return None
    if spec == "auto":
        y = np.asarray(labels, dtype=np.int64).ravel()
        y = y[y >= 0]
        counts = np.bincount(y, minlength=n_classes)[:n_classes].astype(np.float64)
        inv = 1.0 / np.maximum(counts, 1.0)
        return torch.tensor(inv / inv.sum() * n_classes, dtype=torch.float32)
    try:
        w = [float(x) for x in spec.split(",")]
    except ValueError:
        w = []
    if len(w) != n_classes or min(w) <= 0:
        raise UserError(f"train.class_weights = {spec!r} is not allowed: use auto, none, or "
                        f"{n_classes} positive numbers 'w_hem,w_all'")
    return torch.tensor(w, dtype=torch.float32)
