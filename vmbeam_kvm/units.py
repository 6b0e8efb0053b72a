"""Parsing of the human units used on the command line: memory sizes and percentages."""

from __future__ import annotations

import re

from .errors import BadInputError

PAGE_SIZE = 4096

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse ``256M``, ``1G``, ``1.5GiB`` or a plain byte count into bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise BadInputError(f"invalid size {text!r}: expected e.g. 256M, 1G or a byte count")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value != int(value):
        raise BadInputError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def parse_percent(text: str | int) -> int:
    """Parse ``70%`` or ``70`` into an int in 0..95 (the guest needs some RAM for itself)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*%?\s*", text)
        if not m:
            raise BadInputError(f"invalid percentage {text!r}: expected e.g. 70%")
        value = int(m.group(1))
    if not 0 <= value <= 95:
        raise BadInputError(f"percentage {value}% out of range 0..95")
    return value


def format_size(nbytes: int) -> str:
    """Render a byte count the way QEMU users write it (``256M``, ``1G``, ``1536M``)."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit}{suffix}"
    return str(nbytes)
