"""The data layer: index a C-NMC folder, split it without leakage, and serve images to PyTorch.

``CellDataset`` and ``fold_datasets`` (torch, albumentations) are imported on first use so that
indexing, splitting and the audit command line stay quick to start.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from leuk_ray.data.decode import IMAGE_EXTS, ImageDecodeError, read_image
from leuk_ray.data.index import IndexResult, build_index
from leuk_ray.data.prepare import PreparedData, fold_frames, prepare_data
from leuk_ray.data.subjects import parse_subject

if TYPE_CHECKING:
    from leuk_ray.data.dataset import CellDataset, fold_datasets

__all__ = ["IMAGE_EXTS", "CellDataset", "ImageDecodeError", "IndexResult", "PreparedData",
           "build_index", "fold_datasets", "fold_frames", "parse_subject", "prepare_data",
           "read_image"]


def __getattr__(name: str) -> Any:
    if name in ("CellDataset", "fold_datasets"):
        from leuk_ray.data import dataset
        return getattr(dataset, name)
    raise AttributeError(f"module 'leuk_ray.data' has no attribute {name!r}")
