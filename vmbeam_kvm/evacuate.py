"""Evacuating and rejuvenating a cloud VM: every guest out at once, zero-copy.

VMBeam's authors moved every VM off a system at once to rejuvenate the software beneath it
(APSys 2015). ``evacuate`` plans where each guest of a cloud VM goes (cloud VMs of the same
tenant on this host, by free hot-plug slots), refuses a plan that cannot place every guest
before anything moves, and then runs the moves several at a time. Each move is the ordinary
one (:mod:`vmbeam_kvm.migrate`): a guest whose move fails rolls back alone and the others
finish. ``rejuvenate`` evacuates, boots the cloud VM again from its image as it is now, and
moves its guests back.

Exit code of the whole: that of the worst guest (needs-action 4 > lost 1 > rolled back 3 > 0).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .cloudvm import CloudVMRecord
from .errors import BadInputError, VmbeamError
from .migrate import migrate_between
from .migrate.model import MigrationMode, MigrationOptions
from .placement.cloud import CloudOps
from .store import GuestState

# How bad each exit code is, for "the worst guest".
_SEVERITY = {0: 0, 3: 1, 1: 2, 4: 3}

Progress = Callable[[str], None]


@dataclass
class GuestMove:
    """One guest's move in an evacuation (``result``: the move's ``--json`` object)."""

    guest: str
    source_cloud_vm: str
    dest_cloud_vm: str
    status: str = "planned"   # completed | failed (exit 3) | lost | needs-action | error
    exit_code: int = 0
    error: str | None = None
    error_type: str | None = None
    pause_ms: float | None = None
    command_ms: float | None = None
    result: dict[str, Any] | None = None


@dataclass
class Evacuation:
    """What ``cloud-vm evacuate`` did (``to_json`` is its ``--json``)."""

    cloud_vm: str
    parallel: int
    moves: list[GuestMove] = field(default_factory=list)
    wall_ms: float = 0.0

    @property
    def exit_code(self) -> int:
        return max((m.exit_code for m in self.moves), key=lambda c: _SEVERITY.get(c, 2),
                   default=0)

    def summary(self) -> dict[str, Any]:
        pauses = [m.pause_ms for m in self.moves if m.pause_ms is not None]
        return {"guests": len(self.moves),
                "completed": sum(m.status == "completed" for m in self.moves),
                "failed": sum(m.status != "completed" for m in self.moves),
                "max_pause_ms": max(pauses) if pauses else None,
                "wall_ms": round(self.wall_ms, 1), "exit_code": self.exit_code}

    def to_json(self) -> dict[str, Any]:
        return {"cloud_vm": self.cloud_vm, "parallel": self.parallel,
                "moves": [asdict(m) for m in self.moves], "summary": self.summary()}


def default_parallel(guests: int) -> int:
    """Moves at once: one per host CPU (each switch keeps both cloud VMs' vCPUs busy)."""
    return max(1, min(guests, os.cpu_count() or 1))


def plan(ops: CloudOps, name: str, to: list[str] | None) -> list[GuestMove]:
    """Where each guest of cloud VM ``name`` goes; BadInputError (nothing moved) unless
    every guest can be placed in a running cloud VM of its tenant with a free slot."""
    src = ops.running_vm(name)
    guests = [g for g in ops.store.guests() if g.cloud_vm == name]
    for g in guests:
        if g.state is not GuestState.RUNNING:
            raise BadInputError(f"guest {g.name!r} in {name!r} is {g.state.value}: settle or "
                                f"stop it before evacuating {name!r}")
    if to:
        dests = []
        for d in dict.fromkeys(to):
            if d == name:
                raise BadInputError(f"cannot evacuate {name!r} into itself")
            vm = ops.running_vm(d)
            if vm.tenant != src.tenant:
                raise BadInputError(f"refused: cloud VM {d!r} belongs to tenant "
                                    f"{vm.tenant!r}, {name!r} to {src.tenant!r}")
            dests.append(vm)
    else:
        dests = [vm for vm in ops.store.cloud_vms() if vm.name != name
                 and vm.tenant == src.tenant and vm.state.value == "running"
                 and ops.l1(vm).alive()]
    free: dict[str, int] = {vm.name: vm.free_slots() for vm in dests}
    if guests and sum(max(0, n) for n in free.values()) < len(guests):
        have = ", ".join(f"{n}: {max(0, f)}" for n, f in free.items()) or "none"
        raise BadInputError(f"cannot evacuate {name!r}: {len(guests)} guests, free hot-plug "
                            f"slots in cloud VMs of tenant {src.tenant!r}: {have}")
    moves = []
    for g in guests:
        dest = max(free, key=lambda n: free[n])  # most free slots first: spreads the load
        free[dest] -= 1
        moves.append(GuestMove(g.name, name, dest))
    return moves


async def run_moves(ops: CloudOps, moves: list[GuestMove], parallel: int,
                    progress: Progress | None = None) -> None:
    """Run ``moves`` (each filled in with its outcome), ``parallel`` at a time."""
    gate = asyncio.Semaphore(parallel)

    async def one(m: GuestMove) -> None:
        async with gate:
            if progress:
                progress(f"{m.guest}: {m.source_cloud_vm} -> {m.dest_cloud_vm}")
            try:
                res = await migrate_between(ops, m.guest, m.dest_cloud_vm,
                                            MigrationOptions(mode=MigrationMode.ZERO_COPY))
            except VmbeamError as exc:
                m.exit_code, m.error, m.error_type = exc.exit_code, str(exc), type(exc).__name__
                m.status = {3: "failed", 4: "needs-action", 1: "lost"}.get(exc.exit_code,
                                                                          "error")
            else:
                m.status, m.result = "completed", res.to_json()
                m.pause_ms, m.command_ms = res.pause_ms, res.command_ms
            if progress:
                how = (f"pause {m.pause_ms:.1f} ms" if m.pause_ms is not None else "")
                progress(f"{m.guest}: {m.status} {how}{(': ' + m.error) if m.error else ''}")

    await asyncio.gather(*(one(m) for m in moves))


async def evacuate(ops: CloudOps, name: str, to: list[str] | None = None, *,
                   parallel: int | None = None, progress: Progress | None = None
                   ) -> Evacuation:
    """Move every guest out of cloud VM ``name`` (see the module docstring)."""
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int)
                                 or parallel < 1):
        raise BadInputError(f"invalid parallelism {parallel!r}: use a positive integer")
    moves = plan(ops, name, to)
    ev = Evacuation(name, parallel or default_parallel(len(moves)), moves)
    t0 = time.monotonic()
    await run_moves(ops, moves, ev.parallel, progress)
    ev.wall_ms = (time.monotonic() - t0) * 1000
    return ev


@dataclass
class Rejuvenation:
    """What ``cloud-vm rejuvenate`` did: out, the restart, back."""

    cloud_vm: str
    out: Evacuation
    back: Evacuation | None = None
    restart_ms: float | None = None
    restarted: bool = False

    @property
    def exit_code(self) -> int:
        codes = [self.out.exit_code] + ([self.back.exit_code] if self.back else [])
        return max(codes, key=lambda c: _SEVERITY.get(c, 2))

    def to_json(self) -> dict[str, Any]:
        return {"cloud_vm": self.cloud_vm, "restarted": self.restarted,
                "restart_ms": None if self.restart_ms is None else round(self.restart_ms, 1),
                "out": self.out.to_json(),
                "back": None if self.back is None else self.back.to_json(),
                "exit_code": self.exit_code}


async def rejuvenate(ops: CloudOps, name: str, to: list[str] | None = None, *,
                     parallel: int | None = None, progress: Progress | None = None
                     ) -> Rejuvenation:
    """Evacuate cloud VM ``name``, boot it again fresh, move its guests back.

    If a guest could not be moved out, the cloud VM is not restarted (that guest still runs
    in it); the others stay where they went."""
    vm: CloudVMRecord = ops.running_vm(name)
    out = await evacuate(ops, name, to, parallel=parallel, progress=progress)
    rj = Rejuvenation(name, out)
    if out.exit_code != 0:
        return rj
    if progress:
        progress(f"restarting cloud VM {name} (tenant {vm.tenant})")
    t0 = time.monotonic()
    lab = ops.lab(vm) if vm.lab else None
    await ops.stop_cloud_vm(name)
    await ops.start_cloud_vm(name, vm.tenant, vm.memory, vm.cpus, lab=lab)
    rj.restart_ms, rj.restarted = (time.monotonic() - t0) * 1000, True
    back = [GuestMove(m.guest, m.dest_cloud_vm, name) for m in out.moves]
    rj.back = Evacuation(name, out.parallel, back)
    t1 = time.monotonic()
    await run_moves(ops, back, out.parallel, progress)
    rj.back.wall_ms = (time.monotonic() - t1) * 1000
    return rj
