"""Subject ids from C-NMC file names: ``UID_<subject>_<image>_<cell>_<all|hem>``."""
from __future__ import annotations

import re
from pathlib import PurePath

# Subject: digits (ALL patients) or H + digits (healthy donors; the release also writes "h3").
_NAME = re.compile(r"^UID_([Hh]?\d+)_(\d+)_(\d+)_(all|hem)$", re.IGNORECASE)
_EXTS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")

# Subject ids that the full C-NMC release links by byte-identical images (SOURCES.md). They are
# one donor as far as splitting is concerned, even where no shared image is present in a subset.
KNOWN_LINKED_SUBJECTS: tuple[frozenset[str], ...] = (
    frozenset({"20", "21"}),
    frozenset({"51", "75", "78"}),
    frozenset({"H2", "H4", "H5", "H6"}),
    frozenset({"H10", "H3"}),
)


def _stem(filename: str) -> str:
    name = PurePath(str(filename).replace("\\", "/")).name.strip()
    low = name.lower()
    for ext in _EXTS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def parse_name(filename: str) -> tuple[str, int] | None:
    """``UID_11_10_1_all.bmp`` -> ("11", 1); ``UID_h3_1_1_hem.png`` -> ("H3", 0); else None."""
    m = _NAME.match(_stem(filename))
    if not m:
        return None
    subject = m.group(1).upper().lstrip("H")
    subject = str(int(subject))  # "007" -> "7"
    if m.group(1)[0] in "Hh":
        subject = "H" + subject
    return subject, 1 if m.group(4).lower() == "all" else 0


def parse_subject(filename: str) -> str | None:
    """The subject id of a C-NMC file name (``H3`` for ``UID_h3_...``); None when not one."""
    parsed = parse_name(filename)
    return parsed[0] if parsed else None


def subject_key(subject: str) -> tuple[int, int, str]:
    """Sort key: ALL ids numerically, then H ids numerically, then anything else."""
    m = re.fullmatch(r"(H?)(\d+)", subject)
    if not m:
        return (2, 0, subject)
    return (1 if m.group(1) else 0, int(m.group(2)), subject)
