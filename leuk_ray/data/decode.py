"""The one image decoder: any C-NMC-like file -> (size, size, 3) uint8 RGB, plus cheap byte checks.

The one resize too: ``interpolation`` is a timm interpolation name (the backbone's, from
``leuk_ray.data.transforms.preprocessing_for``) mapped to its OpenCV flag by ``cv2_interpolation``.
"""
from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

from leuk_ray.errors import UserError

IMAGE_EXTS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")

# timm's interpolation names -> OpenCV flags ("area": OpenCV's INTER_AREA, box-filter averaging).
INTERPOLATIONS: dict[str, int] = {
    "bicubic": cv2.INTER_CUBIC,
    "bilinear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
    "lanczos": cv2.INTER_LANCZOS4,
    "box": cv2.INTER_AREA,
    "area": cv2.INTER_AREA,
}
DEFAULT_INTERPOLATION = "bicubic"  # timm's default (resolve_data_config), used by most backbones

_MAGIC = {
    "bmp": (b"BM",),
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpeg": (b"\xff\xd8\xff",),
    "tiff": (b"II*\x00", b"MM\x00*"),
}


class ImageDecodeError(UserError):
    """An image file that cannot be decoded (the message names the file)."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


def image_kind(head: bytes) -> str | None:
    """The format named by the first bytes of a file (bmp, png, jpeg, tiff), or None."""
    for kind, magics in _MAGIC.items():
        if any(head.startswith(m) for m in magics):
            return kind
    return None


def check_image_bytes(head: bytes, tail: bytes, size: int) -> str | None:
    """Why a file is not a usable image, from its first/last bytes and size; None when it looks fine.

    ``head`` is at least the first 64 bytes and ``tail`` the last few KiB. Catches empty files,
    non-image content behind an image extension and the common truncations (BMP shorter than its
    pixel array, PNG without IEND, JPEG without its end marker).
    """
    if size == 0:
        return "empty file (0 bytes)"
    kind = image_kind(head)
    if kind is None:
        return f"not an image (starts with {head[:8]!r})"
    if kind == "bmp" and len(head) >= 34:
        offset = struct.unpack_from("<I", head, 10)[0]
        header_size = struct.unpack_from("<I", head, 14)[0]
        if header_size >= 40:
            width, height = struct.unpack_from("<ii", head, 18)
            bpp, compression = struct.unpack_from("<HI", head, 28)
            if compression in (0, 3) and width > 0 and bpp in (1, 4, 8, 16, 24, 32):
                need = offset + (width * bpp + 31) // 32 * 4 * abs(height)
                if size < need:
                    return f"truncated BMP ({size} of {need} bytes)"
    elif kind == "png" and b"IEND" not in tail[-64:]:
        return "truncated PNG (no IEND chunk)"
    elif kind == "jpeg" and b"\xff\xd9" not in tail.rstrip(b"\x00")[-4096:]:
        return "truncated JPEG (no end-of-image marker)"
    return None


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """OpenCV's decoded array (gray, BGR, BGRA; uint8, uint16 or float) -> RGB uint8."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        f = img.astype(np.float32)
        if f.size and np.nanmax(f) <= 1.0:
            f = f * 255.0
        img = np.clip(np.nan_to_num(f), 0, 255).astype(np.uint8)
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    raise ValueError(f"unsupported image shape {img.shape}")


def read_bytes(path: str | Path) -> np.ndarray:
    """A file's bytes as a uint8 array (also handles non-ASCII paths, unlike cv2.imread)."""
    return np.fromfile(Path(path), dtype=np.uint8)


def decode_bytes(data: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """(RGB uint8 image at full size, None) from a file's bytes, or (None, why it is unusable)."""
    reason = check_image_bytes(data[:64].tobytes(), data[-4096:].tobytes(), int(data.size))
    if reason:
        return None, reason
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        return None, "corrupt or unsupported"
    try:
        return to_rgb_uint8(img), None
    except ValueError as e:
        return None, str(e)


def cv2_interpolation(name: str) -> int:
    """The OpenCV flag of a timm interpolation name; ValueError for one OpenCV cannot do."""
    try:
        return INTERPOLATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"interpolation {name!r} is not supported (use one of "
                         f"{', '.join(INTERPOLATIONS)})") from None


def read_image(path: str | Path, size: int | None = None,
               interpolation: str = DEFAULT_INTERPOLATION) -> np.ndarray:
    """Decode ``path`` to an RGB uint8 array, resized to ``size`` x ``size`` if given with
    ``interpolation`` (a timm name, see ``INTERPOLATIONS``; the backbone's preprocessing says which).

    Raises ``ImageDecodeError`` naming the file when it cannot be read or decoded.
    """
    p = Path(path)
    try:
        data = read_bytes(p)
    except OSError as e:
        raise ImageDecodeError(f"{p}: cannot read image file ({e.strerror or e}); "
                               "remove or replace it") from None
    img, reason = decode_resized(data, size, interpolation)
    if img is None:
        raise ImageDecodeError(f"{p}: cannot decode image ({reason}); remove or replace the file")
    return img


def decode_resized(data: np.ndarray, size: int | None = None,
                   interpolation: str = DEFAULT_INTERPOLATION
                   ) -> tuple[np.ndarray | None, str | None]:
    """(RGB uint8 image, None) from a file's bytes (``read_bytes``, or an upload's bytes as a uint8
    array), resized to ``size`` x ``size`` with ``interpolation`` if given; or (None, why it is
    unusable). What ``read_image`` does after reading the file: predict and serve both decode here.
    """
    flag = cv2_interpolation(interpolation)
    img, reason = decode_bytes(data)
    if img is None:
        return None, reason
    if size is not None and img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=flag)
    return np.ascontiguousarray(img), None
