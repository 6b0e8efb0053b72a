"""Moving a running guest: one phase machine, two routes, recovery from the journal.

* :mod:`.model` — modes, options, progress events, the result (the public types);
* :mod:`.engine` — the phase machine every move runs (:class:`~.engine.MigrationRun`);
* :mod:`.routes` — its topology-specific steps: on this host, and between cloud VMs;
* :mod:`.handover` — the rules for waiting on and resuming a source;
* :mod:`.recovery` — the decision table for moves whose command died;
* :mod:`.settle` — ``guest settle``: the copy to keep of a guest a move left to an operator;
* :mod:`.faults` — fault injection for tests.

:func:`migrate_local` and :func:`migrate_between` check a request under the guest's lock,
open the journal and run the phase machine along the right route.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from ..checks import check_movable, check_tail_window
from ..disks import check_copy, loads
from ..errors import BadInputError
from ..placement.cloud import CloudOps
from ..placement.local import LocalPlacement
from ..qemu.machine import RamBackend
from ..store import GuestRecord, GuestState, MigrationPhase, Store
from .engine import MigrationRun
from .model import (
    MigrationMode,
    MigrationOptions,
    MigrationResult,
    NestedResult,
    ProgressCallback,
    ProgressEvent,
)
from .recovery import CloudEnds, LocalEnds, recover, recover_move
from .routes import CloudRoute, LocalRoute
from .settle import SettleResult, settle_guest


def choose_mode(opts: MigrationOptions, rec: GuestRecord) -> tuple[MigrationOptions, str]:
    """Resolve ``auto`` (the one place that does): options with a concrete mode, and why.

    The memory can be shared wherever both ends are on this L0: a guest on this host moves
    zero-copy (cpr-transfer for a guest whose RAM is QEMU's own memfd), a guest in a cloud
    VM moves zero-copy into any cloud VM of this host (each maps the region by hot-plug).
    """
    if opts.mode is not MigrationMode.AUTO:
        return opts, "requested"
    if rec.cloud_vm:
        mode, why = MigrationMode.ZERO_COPY, ("auto: both cloud VMs run on this host, so the "
                                               "destination can map the guest's region")
    elif RamBackend(rec.backend) is RamBackend.MEMFD:
        mode, why = MigrationMode.CPR_TRANSFER, ("auto: the guest's RAM is QEMU's own memfd, "
                                                 "which only cpr-transfer hands over")
    else:
        mode, why = MigrationMode.ZERO_COPY, ("auto: a new QEMU on this host maps the "
                                               "guest's region")
    return replace(opts, mode=mode), why


async def migrate_local(place: LocalPlacement, name: str, opts: MigrationOptions
                        ) -> MigrationResult:
    """Move guest ``name`` to a new QEMU on this host.

    Raises BadInputError (nothing changed), GuestBusyError, MigrationError (exit 3: the
    source runs again; exit 4: needs action) or GuestLostError.
    """
    store = place.store
    requested = time.monotonic()
    with store.lock_guest(name, "migrated"):
        rec = store.get_guest(name)
        check_movable(rec)
        src = place.process(rec)
        if not src.alive():
            rec.state = GuestState.LOST
            store.update_guest(rec)
            raise BadInputError(f"guest {name!r}: its QEMU (pid {rec.pid}) is gone")
        opts, why = choose_mode(opts, rec)
        backend = RamBackend(rec.backend)
        if (opts.mode is MigrationMode.CPR_TRANSFER) != (backend is RamBackend.MEMFD):
            raise BadInputError(f"mode {opts.mode.value} does not fit guest {name!r} (RAM "
                                f"backend {backend.value}); cpr-transfer needs a memfd guest")
        spec = place.spec_of(rec, opts.qemu)
        if opts.mode is MigrationMode.PRECOPY:
            check_copy(name, spec.disks)
        run_state = await src.run_state()
        if run_state != "running":
            raise BadInputError(f"guest {name!r} is {run_state}, not running")
        route = LocalRoute(place, rec, src, spec, opts)
        await route.open()
        mig_id = store.begin_migration(name, opts.mode.value, rec.pid, rec.pid_start)
        rec.state = GuestState.MIGRATING
        store.update_guest(rec)
        try:
            result = await MigrationRun(store, route, mig_id, requested).execute()
        except asyncio.CancelledError:
            # QEMU serves one QMP client per socket: recovery opens its own sessions.
            await place.rt.procs.disconnect()
            if _unfinished(store, mig_id):
                await recover(LocalEnds(place, store.get_guest(name),
                                        store.get_migration(mig_id)))
            raise
        result.mode_reason = why
        return result


async def migrate_between(ops: CloudOps, name: str, to: str, opts: MigrationOptions
                          ) -> MigrationResult:
    """Move guest ``name`` (in a cloud VM) into cloud VM ``to`` of the same tenant.

    Raises as :func:`migrate_local`; a cross-tenant request is refused and logged.
    """
    store = ops.store
    requested = time.monotonic()
    with store.lock_guest(name, "migrated"):
        rec = store.get_guest(name)
        if not rec.cloud_vm:
            raise BadInputError(f"guest {name!r} runs on this host, not in a cloud VM: "
                                f"use --local")
        check_movable(rec)
        src_vm, dst_vm = ops.running_vm(rec.cloud_vm), ops.running_vm(to)
        if src_vm.name == dst_vm.name:
            raise BadInputError(f"guest {name!r} already runs in {to!r}")
        if dst_vm.tenant != rec.tenant:
            store.log_event("refused", name, f"cross-tenant migration to {to} "
                            f"(tenant {dst_vm.tenant}, guest of {rec.tenant})")
            raise BadInputError(f"refused: cloud VM {to!r} belongs to tenant "
                                f"{dst_vm.tenant!r}, guest {name!r} to {rec.tenant!r}")
        opts, why = choose_mode(opts, rec)
        if opts.mode is MigrationMode.CPR_TRANSFER:
            raise BadInputError("cpr-transfer is a local-only mode")
        if opts.mode is MigrationMode.PRECOPY and loads(rec.disks):
            # Not built yet between cloud VMs (the NBD stream would cross the L1-L1 net).
            raise BadInputError(f"guest {name!r} has disks: between cloud VMs it moves "
                                f"zero-copy (its disks shared), not by precopy")
        check_tail_window(opts.tail_window)
        if opts.prefault:
            # In a cloud VM the region is a PCI BAR read through /dev/mem, which QEMU can
            # only prefault by reading and writing back each page: racing the source.
            raise BadInputError("--prefault applies to moves on this host")
        # Both cloud VMs, shared with other moves, until the move has ended: neither is
        # stopped (or started anew) beneath it, above all not the one it places the guest
        # in (`cloud-vm stop` takes this lock exclusively, and is refused as busy).
        with (store.lock_cloud_vm(src_vm.name, shared=True),
              store.lock_cloud_vm(dst_vm.name, shared=True)):
            src_vm, dst_vm = ops.running_vm(src_vm.name), ops.running_vm(dst_vm.name)
            route = CloudRoute(ops, rec, src_vm, dst_vm, opts)
            await route.open()
            mig_id = store.begin_migration(name, opts.mode.value, rec.pid, 0)
            rec.state = GuestState.MIGRATING
            store.update_guest(rec)
            try:
                result = await MigrationRun(store, route, mig_id, requested).execute()
            except asyncio.CancelledError:
                if _unfinished(store, mig_id):
                    await recover(CloudEnds(ops, store.get_guest(name),
                                            store.get_migration(mig_id)))
                raise
            result.mode_reason = why
            return result


def _unfinished(store: Store, mig_id: int) -> bool:
    """Whether move ``mig_id`` was cut short (SIGINT/SIGTERM cancel the command) before
    it ended. Such a move is settled at once, still under the guest's lock, the way the
    next command would settle it from the journal (:func:`.recovery.recover`: exactly one
    running copy, or needs-action); the CLI cancels once, so those awaits run to the end."""
    return store.get_migration(mig_id).phase not in (MigrationPhase.DONE,
                                                     MigrationPhase.FAILED)


__all__ = ["MigrationMode", "MigrationOptions", "MigrationResult", "NestedResult",
           "ProgressCallback", "ProgressEvent", "SettleResult", "choose_mode",
           "migrate_between", "migrate_local", "recover_move", "settle_guest"]
