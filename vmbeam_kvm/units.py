"""Parsing of what people type on the command line: memory sizes, percentages and names.

Every function here either returns a value its callers can use as is or raises
:class:`BadInputError` with one line that names the bad value; nothing else escapes, whatever
the text (tested with hypothesis in ``tests/test_bad_input.py``).
"""

from __future__ import annotations

import re

from .errors import BadInputError

PAGE_SIZE = 4096
NAME_MAX = 32

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# ASCII digits only (``\d`` also takes other scripts' digits); "iB"/"B" only after a suffix
# or alone ("1iB" is not a size).
_SIZE_RE = re.compile(r"\s*([0-9]+)(?:\.([0-9]+))?\s*(?:([KMGT])(?:i?B)?|(B))?\s*",
                      re.IGNORECASE | re.ASCII)
_PERCENT_RE = re.compile(r"\s*([0-9]+)\s*%?\s*", re.ASCII)
# Longer text is no size anyone means; the cap also keeps int() far from its digit limit.
_MAX_TEXT = 64
# Sizes are stored as SQLite INTEGERs and passed to QEMU as int64.
MAX_SIZE = (1 << 63) - 1


def shown(value: object, limit: int = 40) -> str:
    """``repr`` of user input for one-line messages, cut short when long."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, int) and value.bit_length() > 128:
        return f"<a {value.bit_length()}-bit integer>"  # repr() may refuse it outright
    return repr(value)


def parse_size(text: str | int) -> int:
    """Parse ``256M``, ``1G``, ``1.5GiB`` or a plain byte count into bytes (>= 0).

    Exact: decimals are computed in integers, so a byte count of any length reads back as
    itself and ``1.00001K`` is refused instead of rounded.
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise BadInputError(f"invalid size {shown(text)}: expected e.g. 256M, 1G or a byte "
                            f"count")
    size = text if isinstance(text, int) else _parse_size_text(text)
    if not 0 <= size <= MAX_SIZE:
        raise BadInputError(f"invalid size {shown(text)}: must be 0 to {MAX_SIZE} bytes")
    return size


def _parse_size_text(text: str) -> int:
    m = _SIZE_RE.fullmatch(text) if len(text) <= _MAX_TEXT else None
    if not m:
        raise BadInputError(f"invalid size {shown(text)}: expected e.g. 256M, 1G or a byte "
                            f"count")
    whole, frac, suffix = m.group(1), m.group(2) or "", (m.group(3) or "").upper()
    scaled = int(whole + frac) * _SUFFIX[suffix]
    den: int = 10 ** len(frac)
    if scaled % den:
        raise BadInputError(f"invalid size {shown(text)}: not a whole number of bytes")
    return scaled // den


def parse_percent(text: str | int) -> int:
    """Parse ``70%`` or ``70`` into an int in 0..95 (the guest needs some RAM for itself)."""
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise BadInputError(f"invalid percentage {shown(text)}: expected e.g. 70%")
    if isinstance(text, int):
        value = text
    else:
        m = _PERCENT_RE.fullmatch(text) if len(text) <= _MAX_TEXT else None
        if not m:
            raise BadInputError(f"invalid percentage {shown(text)}: expected e.g. 70%")
        value = int(m.group(1))
    if not 0 <= value <= 95:
        raise BadInputError(f"percentage {shown(value)}% out of range 0..95")
    return value


def _name_re(max_len: int) -> re.Pattern[str]:
    # ASCII only, no leading '.' or '-': names become file names, tap names, QEMU ids and
    # command-line arguments.
    return re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{max_len - 1}}}")


def valid_name(name: object, max_len: int = NAME_MAX) -> bool:
    """True if ``name`` may name a guest, cloud VM or tenant (see :func:`check_name`)."""
    return isinstance(name, str) and _name_re(max_len).fullmatch(name) is not None


def check_name(name: object, what: str = "name", max_len: int = NAME_MAX) -> str:
    """Return ``name`` if it is 1..max_len ASCII letters, digits, '.', '_' or '-' starting
    with a letter or digit; else raise :class:`BadInputError`."""
    if not valid_name(name, max_len):
        raise BadInputError(f"invalid {what} {shown(name)}: use 1-{max_len} letters, digits, "
                            f"'.', '_' or '-', starting with a letter or digit")
    assert isinstance(name, str)
    return name


def format_size(nbytes: int) -> str:
    """Render a byte count the way QEMU users write it (``256M``, ``1G``, ``1536M``)."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit}{suffix}"
    return str(nbytes)
