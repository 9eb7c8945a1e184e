"""Albumentations pipelines on uint8 HWC (no normalisation) and the on-device normalisation.

Batches leave the CPU as uint8 BHWC: no float work and no HWC->CHW copy per image on the CPU
(that copy alone cost as much as the geometric augmentations at 300 px). ``to_model_input``
permutes on the device, which yields channels-last strides for free.
"""
from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import torch  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("seed000", "light", "none")


_D4_CV2 = {  # albumentations' group elements as OpenCV kernels (same output as fgeometric.d4)
    "e": lambda x: x,
    "r90": lambda x: cv2.rotate(x, cv2.ROTATE_90_COUNTERCLOCKWISE),  # np.rot90(x, 1)
    "r180": lambda x: cv2.rotate(x, cv2.ROTATE_180),
    "r270": lambda x: cv2.rotate(x, cv2.ROTATE_90_CLOCKWISE),
    "v": lambda x: cv2.flip(x, 0),  # upside down
    "h": lambda x: cv2.flip(x, 1),  # mirrored left-right
    "t": cv2.transpose,  # main diagonal
    "hvt": lambda x: cv2.transpose(cv2.rotate(x, cv2.ROTATE_180)),  # anti-diagonal
}


class FastD4(A.D4):
    """``A.D4`` (one of the 8 rotations/reflections, uniformly) with OpenCV kernels.

    The same random draw and the same pixels as ``A.D4``, about 10x faster on uint8 HWC images
    (``np.rot90`` + a contiguous copy costs ~0.5 ms at 300 px, ``cv2.rotate`` ~0.04 ms). Other
    dtypes and shapes (batches, volumes, >4 channels) go through albumentations' own code.
    """

    def apply(self, img: Any, group_element: str, **params: Any) -> Any:
        if img.dtype == "uint8" and img.ndim in (2, 3) and (img.ndim == 2 or img.shape[2] <= 4):
            out = _D4_CV2[group_element](img)
            return out[..., None] if img.ndim == 3 and out.ndim == 2 else out
        return super().apply(img, group_element, **params)


def _geometric() -> list:
    # Cells sit on black: rotations and flips are free; shifts/zooms stay small, borders stay black.
    # Seed 000 used RandomRotate90 + HorizontalFlip(0.5) + VerticalFlip(0.5): that draws each of the
    # 8 elements of the square's symmetry group with probability 1/8, exactly what D4 draws.
    return [
        FastD4(p=1.0),
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
    """uint8 BHWC (as ``CellDataset`` batches come) -> ImageNet-normalised float32 BCHW on ``device``.

    The uint8 batch crosses to the device (4x fewer bytes than float), is permuted there (a view
    with channels-last strides) and converted; ``channels_last=False`` makes it NCHW-contiguous.
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"to_model_input expects uint8 images, got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"to_model_input expects a BHWC batch of RGB images, got shape "
                         f"{tuple(x.shape)}")
    dev = torch.device(device)
    key = (str(dev), torch.float32)
    if key not in _STATS:
        mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1) * 255.0
        inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1) * 255.0)
        _STATS[key] = (mean, inv_std)
    mean, inv_std = _STATS[key]
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(dev, non_blocking=True).permute(0, 3, 1, 2)  # a view: BCHW shape, channels-last strides
    return x.to(torch.float32, memory_format=layout).sub_(mean).mul_(inv_std)
