"""Fault injection for tests: where a test may make a move fail, kept out of public types.

``VMBEAM_TEST_CRASH_AFTER=<phase>`` makes the command die right after journaling that phase
(crash-recovery tests); :func:`injected` installs hooks for the moves started inside it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from ..region import BeamRegion
from ..store import MigrationPhase

CRASH_ENV = "VMBEAM_TEST_CRASH_AFTER"

# Given the destination: its QemuProcess (this host) or its cloud VM's AgentClient.
Hook = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True)
class FaultHooks:
    """``dest_region``: map this region on the destination instead (flat zero-copy);
    ``at_share``: as share starts (the source's ticks already go to the meter);
    ``before_switch``: at the end of prepare; ``after_switch``: the source completed, the
    destination not yet confirmed running."""

    dest_region: BeamRegion | None = None
    at_share: Hook | None = None
    before_switch: Hook | None = None
    after_switch: Hook | None = None


_NO_HOOKS = FaultHooks()
_HOOKS: ContextVar[FaultHooks | None] = ContextVar("vmbeam_fault_hooks", default=None)


def hooks() -> FaultHooks:
    return _HOOKS.get() or _NO_HOOKS


@contextlib.contextmanager
def injected(**kw: Any) -> Iterator[None]:
    """Install fault hooks for the moves started (as tasks or awaited) inside the block."""
    token = _HOOKS.set(FaultHooks(**kw))
    try:
        yield
    finally:
        _HOOKS.reset(token)


def crash_point(phase: MigrationPhase) -> None:
    if os.environ.get(CRASH_ENV) == phase.value:
        os._exit(99)
