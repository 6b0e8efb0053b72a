"""Settling a guest that a move left for an operator: keep the one copy that runs, proven.

A move leaves a guest ``needs-action`` where it could not tell which copy may run, and
``unreachable`` where its source stopped answering before it handed over. ``guest settle``
(:func:`settle_guest`) looks at both ends of the guest's last move through the same eyes
and hands as crash recovery (:class:`~.recovery.Ends`), reduces each end to an
:class:`EndSeen` — a copy *runs* only with its heartbeat advancing and a good memory
verdict — and :func:`choose`, a pure table, says which copy stays. The other copy is
stopped and what it held (its region's attachment, a destination's leftovers) released;
the guest is ``running`` again, movable. Where it cannot tell, nothing is changed and the
refusal (exit 4) says how each end was seen.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from ..errors import BadInputError, GuestLostError, SettleRefusedError
from ..placement.cloud import CloudOps
from ..placement.local import LocalPlacement
from ..store import GuestRecord, GuestState, MigrationPhase
from .recovery import CloudEnds, End, Ends, LocalEnds

log = logging.getLogger(__name__)

# How long a running copy has to show a new heartbeat (TCG in TCG beats about once a
# second; a loaded 2-core host was seen to take several).
HEARTBEAT_PROOF_TIMEOUT = 20.0

# The states `guest settle` is for; any other is refused as bad input (exit 2).
SETTLED_STATES = (GuestState.NEEDS_ACTION, GuestState.UNREACHABLE)


class EndSeen(StrEnum):
    """How one end of the guest's last move looks to ``guest settle``."""

    RUNS = "runs, memory good"                 # running; new heartbeat with a good verdict
    RUNS_UNPROVEN = "runs, memory not proven"  # running, no new good heartbeat in time
    HALTED = "not running"                     # alive: paused, postmigrate or inmigrate
    GONE = "gone"                              # no such QEMU (or its cloud VM is gone)
    UNKNOWN = "unknown"                        # cannot be asked (its cloud VM is silent)


class Choice(StrEnum):
    KEEP_SOURCE = "source"
    KEEP_DEST = "destination"
    LOST = "lost"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Settlement:
    choice: Choice
    why: str = ""


def choose(src: EndSeen, dst: EndSeen) -> Settlement:
    """The settle table.

    ==============  ==============  ===============================================
    source          destination     settlement
    ==============  ==============  ===============================================
    unknown         any             refuse: what it runs cannot be told
    any             unknown         refuse
    runs*           runs*           refuse: two copies run
    runs            halted / gone   keep the source (the destination goes)
    halted / gone   runs            keep the destination (the source goes)
    runs-unproven   halted / gone   refuse: its memory is not proven good (and back)
    gone            gone            lost: no copy is left
    halted / gone   halted / gone   refuse: no copy runs (which one may, cannot be told)
    ==============  ==============  ===============================================
    """
    running = (EndSeen.RUNS, EndSeen.RUNS_UNPROVEN)
    if EndSeen.UNKNOWN in (src, dst):
        return Settlement(Choice.REFUSE, "an end cannot be asked")
    if src in running and dst in running:
        return Settlement(Choice.REFUSE, "both copies run")
    if src is EndSeen.RUNS:
        return Settlement(Choice.KEEP_SOURCE)
    if dst is EndSeen.RUNS:
        return Settlement(Choice.KEEP_DEST)
    if EndSeen.RUNS_UNPROVEN in (src, dst):
        return Settlement(Choice.REFUSE, "the copy that runs shows no good heartbeat")
    if src is EndSeen.GONE and dst is EndSeen.GONE:
        return Settlement(Choice.LOST)
    return Settlement(Choice.REFUSE, "no copy runs")


@dataclass(frozen=True)
class SettleResult:
    """What ``guest settle`` did; ``to_json`` is its ``--json`` object."""

    guest: str
    status: str              # "settled"
    kept: str                # "source" or "destination"
    previous_state: str      # needs-action or unreachable
    cloud_vm: str            # where the guest runs now ("" on this host)
    pid: int
    source: str              # how each end was seen (EndSeen values)
    destination: str
    migration_id: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_settleable(rec: GuestRecord) -> None:
    """Refuse (bad input) a guest whose state needs no settling."""
    if rec.state not in SETTLED_STATES:
        raise BadInputError(f"guest {rec.name!r} is {rec.state.value}: nothing to settle "
                            f"(only a guest that is "
                            f"{' or '.join(s.value for s in SETTLED_STATES)} is)")


async def seen(ends: Ends, end: End, proof_timeout: float = HEARTBEAT_PROOF_TIMEOUT
               ) -> EndSeen:
    """How ``end`` looks: a running copy must show a new heartbeat with a good verdict."""
    st = await ends.status(end)
    if st is None:
        return EndSeen.UNKNOWN
    if not st.alive:
        return EndSeen.GONE
    if st.run_state != "running":
        return EndSeen.HALTED
    hb = await ends.wait_heartbeat(end, st.heartbeat.seq if st.heartbeat else -1,
                                   proof_timeout)
    return EndSeen.RUNS if hb is not None and hb.ok and hb.bad == 0 else EndSeen.RUNS_UNPROVEN


async def settle_guest(local: LocalPlacement, cloud: CloudOps, rec: GuestRecord
                       ) -> SettleResult:
    """Settle guest ``rec`` (the caller holds its lock); raises BadInputError where its
    state needs no settling, SettleRefusedError (nothing changed) where it cannot tell
    which copy to keep, GuestLostError where no copy is left (recorded ``lost``)."""
    store, name = local.store, rec.name
    check_settleable(rec)
    moves = store.migrations(name)
    if not moves:
        raise SettleRefusedError(f"cannot settle guest {name!r}: no move of it is recorded; "
                                 f"nothing changed", source="unknown", destination="unknown")
    mig = moves[-1]
    ends: Ends = (CloudEnds(cloud, rec, mig) if rec.cloud_vm or mig.src_cloud_vm
                  else LocalEnds(local, rec, mig))
    try:
        src = await seen(ends, End.SOURCE)
        dst = await seen(ends, End.DEST)
        verdict = choose(src, dst)
        both = (f"source {ends.where(End.SOURCE)}: {src.value}; destination "
                f"{ends.where(End.DEST)}: {dst.value}")
        if verdict.choice is Choice.REFUSE:
            raise SettleRefusedError(f"cannot settle guest {name!r}: {verdict.why} ({both}); "
                                     f"nothing changed", source=src.value,
                                     destination=dst.value)
        previous = rec.state
        if verdict.choice is Choice.LOST:
            ends.record(GuestState.LOST, MigrationPhase.FAILED,
                        _settled(mig.error, "both copies gone"))
            raise GuestLostError(f"guest {name!r}: no copy is left ({both}); recorded lost "
                                 f"(`vmbeam-kvm guest stop {name}` releases what is left)")
        if verdict.choice is Choice.KEEP_DEST:
            await ends.keep_dest()
        else:
            await ends.drop_dest()
            rec.pid = await ends.source_pid()
        kept = verdict.choice.value
        ends.record(GuestState.RUNNING, MigrationPhase.DONE if verdict.choice is
                    Choice.KEEP_DEST else MigrationPhase.FAILED,
                    _settled(mig.error, f"{kept} kept"))
        store.log_event("settled", name, f"{kept} kept ({both})")
        log.info("settled %s: %s kept (%s)", name, kept, both)
        return SettleResult(guest=name, status="settled", kept=kept,
                            previous_state=previous.value, cloud_vm=rec.cloud_vm,
                            pid=rec.pid, source=src.value, destination=dst.value,
                            migration_id=mig.id)
    finally:
        await ends.close()


def _settled(error: str, what: str) -> str:
    return f"{error}; settled by guest settle: {what}" if error else f"settled: {what}"


__all__ = ["Choice", "EndSeen", "SettleResult", "check_settleable", "choose", "seen",
           "settle_guest"]
