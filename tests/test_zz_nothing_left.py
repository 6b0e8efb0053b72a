"""Runs last: the suite left no QEMU, state directory, socket or fd behind."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .conftest import FD_BASELINE, STATE_PREFIX, qemu_pids


def test_nothing_left_behind() -> None:
    assert qemu_pids(f"/tmp/{STATE_PREFIX}") == []
    assert not list(Path("/tmp").glob(f"{STATE_PREFIX}*"))
    assert not [p for p in Path("/dev/shm").iterdir() if "vmbeam" in p.name]
    fds = set(os.listdir("/proc/self/fd"))
    leaked = []
    for fd in fds - FD_BASELINE:
        with contextlib.suppress(OSError):  # the fd listdir used is gone already
            leaked.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert not [t for t in leaked if "memfd" in t or "socket" in t or "vbt-" in t], leaked
