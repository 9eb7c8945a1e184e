"""One preprocessing path: the backbone's ``Preprocessing``, albumentations pipelines on uint8 HWC
(no normalisation) and the on-device normalisation.

    prep = preprocessing_for(cfg)        # image_size from data.image_size; mean, std, interpolation
                                         # from timm's data config of model.backbone
    x = to_model_input(batch_uint8_bhwc, device, prep=prep)

Training, validation, the final job, predict (and later serve/export) all use this object; the
artifact's manifest stores it (``to_dict``) and predict reads it back (``from_dict``).

Batches leave the CPU as uint8 BHWC: no float work and no HWC->CHW copy per image on the CPU
(that copy alone cost as much as the geometric augmentations at 300 px). ``to_model_input``
permutes on the device, which yields channels-last strides for free.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import torch  # noqa: E402

from leuk_ray.config import Config  # noqa: E402
from leuk_ray.data.decode import (DEFAULT_INTERPOLATION, INTERPOLATIONS,  # noqa: E402
                                  cv2_interpolation)
from leuk_ray.errors import UserError  # noqa: E402

AUGMENTS = ("seed000", "light", "none")


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded RGB cell image becomes the network's input: resized to ``image_size`` square
    with ``interpolation`` (OpenCV, in the decoder), then ``(x / 255 - mean) / std`` per channel (on
    the device). ``interpolation`` is timm's name (bicubic, bilinear, ...; see
    ``leuk_ray.data.decode.INTERPOLATIONS``)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = DEFAULT_INTERPOLATION

    def __post_init__(self) -> None:
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) != 3 or len(std) != 3 or not all(map(math.isfinite, mean + std)) or \
                min(std) <= 0:
            raise ValueError(f"preprocessing needs 3 finite means and 3 positive stds, got "
                             f"mean={self.mean!r} std={self.std!r}")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"preprocessing image_size must be a positive int, got "
                             f"{self.image_size!r}")
        cv2_interpolation(self.interpolation)  # ValueError for a name the decoder cannot do
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``preprocessing`` entry (JSON-ready)."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "color": "RGB"}

    @classmethod
    def from_dict(cls, d: Any) -> Preprocessing:
        """Inverse of ``to_dict``; ValueError when ``d`` is not a valid entry."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a mapping, got {type(d).__name__}")
        if d.get("color", "RGB") != "RGB":
            raise ValueError(f"color {d.get('color')!r} is not RGB")
        try:
            return cls(image_size=d["image_size"], mean=tuple(d["mean"]), std=tuple(d["std"]),
                       interpolation=d["interpolation"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"missing or malformed key {e}") from None


@functools.lru_cache(maxsize=64)
def resolve_preprocessing(backbone: str, image_size: int) -> Preprocessing:
    """The backbone's preprocessing from timm's resolved data config (``resolve_data_config``
    over the model's pretrained config): mean, std, interpolation; the input size stays
    ``image_size``. An interpolation OpenCV has no counterpart for (none of timm's pretrained
    configs today: they all say bicubic or bilinear) becomes bicubic."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg
    try:
        pc = get_pretrained_cfg(backbone)
    except RuntimeError as e:  # e.g. an unknown pretrained tag after the dot
        raise UserError(f"model.backbone = {backbone!r}: {e}") from None
    dc = resolve_data_config({"img_size": image_size}, pretrained_cfg=pc.to_dict() if pc else None)
    interpolation = dc["interpolation"] if dc["interpolation"] in INTERPOLATIONS else \
        DEFAULT_INTERPOLATION
    return Preprocessing(image_size, tuple(dc["mean"]), tuple(dc["std"]), interpolation)


def preprocessing_for(cfg: Config) -> Preprocessing:
    """``resolve_preprocessing`` of ``model.backbone`` at ``data.image_size``."""
    return resolve_preprocessing(cfg.model.backbone, cfg.data.image_size)


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


def train_transform(name: str, size: int, seed: int | None = None,
                    interpolation: str = DEFAULT_INTERPOLATION) -> A.Compose:
    """Training augmentations: seed000 (geometric + colour), light (geometric only) or none; ends
    by bringing the image to ``size`` square with ``interpolation`` (a no-op on decoded images)."""
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
    ops.append(A.Resize(size, size, interpolation=cv2_interpolation(interpolation)))
    return A.Compose(ops, seed=seed)


def eval_transform(size: int, interpolation: str = DEFAULT_INTERPOLATION) -> A.Compose:
    """Evaluation pipeline: only brings the image to ``size`` x ``size`` (decode already does)."""
    return A.Compose([A.Resize(size, size, interpolation=cv2_interpolation(interpolation))])


_STATS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def to_model_input(x: torch.Tensor, device: torch.device | str, channels_last: bool = False, *,
                   prep: Preprocessing) -> torch.Tensor:
    """uint8 BHWC (as ``CellDataset`` batches come) -> float32 BCHW on ``device``, normalised with
    ``prep``'s mean and std (the backbone's, see ``preprocessing_for``).

    The uint8 batch crosses to the device (4x fewer bytes than float), is permuted there (a view
    with channels-last strides) and converted; ``channels_last=False`` makes it NCHW-contiguous.
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"to_model_input expects uint8 images, got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"to_model_input expects a BHWC batch of RGB images, got shape "
                         f"{tuple(x.shape)}")
    dev = torch.device(device)
    key = (str(dev), prep.mean, prep.std)
    if key not in _STATS:
        mean = torch.tensor(prep.mean, device=dev).view(1, 3, 1, 1) * 255.0
        inv_std = 1.0 / (torch.tensor(prep.std, device=dev).view(1, 3, 1, 1) * 255.0)
        _STATS[key] = (mean, inv_std)
    mean, inv_std = _STATS[key]
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(dev, non_blocking=True).permute(0, 3, 1, 2)  # a view: BCHW shape, channels-last strides
    return x.to(torch.float32, memory_format=layout).sub_(mean).mul_(inv_std)
