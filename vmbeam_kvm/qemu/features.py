"""Guarantees a QEMU binary gives, asked of QEMU itself over QMP (never by version string).

vmbeam-kvm runs on stock QEMU, but two of VMBeam's guarantees need the patches in
``qemu-patches/`` (README "Patched QEMU"):

* ``revoke`` — ``x-revoke-memory-backend``: relocation takes a moved guest's memory away
  from the source cloud VM at once, without that cloud VM's help;
* ``shared_ram_check`` — the ``x-ignore-shared-check`` migration capability: the
  destination QEMU proves that the shared RAM it maps is the source's memory before it
  loads device state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

REVOKE_COMMAND = "x-revoke-memory-backend"
SHARED_RAM_CHECK = "x-ignore-shared-check"

QMPExecute = Callable[[str, "dict[str, Any] | None"], Awaitable[Any]]


@dataclass(frozen=True)
class Guarantees:
    """What one QEMU can guarantee (see module docstring)."""

    revoke: bool
    shared_ram_check: bool

    def missing(self) -> list[str]:
        """The guarantees this QEMU lacks, in words for the operator."""
        out = []
        if not self.revoke:
            out.append(f"relocation without the source cloud VM's help ({REVOKE_COMMAND})")
        if not self.shared_ram_check:
            out.append(f"QEMU's own check that shared RAM is the same memory "
                       f"({SHARED_RAM_CHECK})")
        return out


async def guarantees(execute: QMPExecute) -> Guarantees:
    """Ask the QEMU behind ``execute`` which guarantees it gives."""
    commands = {c["name"] for c in await execute("query-commands", None)}
    caps = {c["capability"] for c in await execute("query-migrate-capabilities", None)}
    return Guarantees(revoke=REVOKE_COMMAND in commands,
                      shared_ram_check=SHARED_RAM_CHECK in caps)
