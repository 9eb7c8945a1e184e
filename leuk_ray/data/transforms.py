"""Albumentations pipelines on uint8 HWC (no normalisation) and the on-device normalisation."""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import torch  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("seed000", "light", "none")


def _geometric() -> list:
    # Cells sit on black: rotations and flips are free; shifts/zooms stay small, borders stay black.
    return [
        A.RandomRotate90(p=1.0),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Affine(translate_percent=(-0.05, 0.05), scale=(0.9, 1.1), rotate=(-15, 15),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.5),
    ]


def train_transform(name: str, size: int, seed: int | None = None) -> A.Compose:
    """Training augmentations: seed000 (geometric + colour), light (geometric only) or none."""
    if name not in AUGMENTS:
        raise ValueError(f"unknown augmentation {name!r} (use one of {', '.join(AUGMENTS)})")
    ops: list = []
    if name in ("seed000", "light"):
        ops += _geometric()
    if name == "seed000":
        ops += [
            A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ]
    ops.append(A.Resize(size, size, interpolation=cv2.INTER_AREA))
    return A.Compose(ops, seed=seed)


def eval_transform(size: int) -> A.Compose:
    """Evaluation pipeline: only brings the image to ``size`` x ``size`` (decode already does)."""
    return A.Compose([A.Resize(size, size, interpolation=cv2.INTER_AREA)])


_STATS: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def to_model_input(x: torch.Tensor, device: torch.device | str,
                   channels_last: bool = False) -> torch.Tensor:
    """uint8 BCHW -> float32 BCHW on ``device``, scaled to [0, 1] and ImageNet-normalised."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_model_input expects uint8 images, got {x.dtype}")
    dev = torch.device(device)
    key = (str(dev), torch.float32)
    if key not in _STATS:
        mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1) * 255.0
        inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1) * 255.0)
        _STATS[key] = (mean, inv_std)
    mean, inv_std = _STATS[key]
    out = x.to(dev, non_blocking=True).to(torch.float32).sub_(mean).mul_(inv_std)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out
