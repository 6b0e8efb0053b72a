"""`make soak`: one nested guest moved l1a <-> l1b many times (zero-copy).

After every move: the move reports the guest ok, the guest's own memory verdict is good, and
L0's QEMUs hold exactly one region object among them (asked over QMP, not the store). Stops
at the first failure and keeps the state directory (logs, consoles) for reading; prints a
JSON summary on stdout. Not part of `make test` (200 moves take ~15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vmbeam_kvm import Host, MigrationMode, Settings, VmbeamError
from vmbeam_kvm.lab import lab_down, lab_up


async def region_objects(host: Host) -> dict[str, int]:
    """Region objects per cloud VM, from each cloud VM's QEMU on L0."""
    counts = {}
    for vm in host.store.cloud_vms():
        objs = await host.cloud.l1(vm).execute("qom-list", {"path": "/objects"})
        counts[vm.name] = sum(o["name"].startswith("region-") for o in objs)
    return counts


async def soak(moves: int, memory: str) -> int:
    state = Path(tempfile.mkdtemp(prefix="vmbeam-soak-", dir="/tmp"))
    settings = Settings(state_dir=state, lab_ns=f"vmbeam-soak-{os.getpid()}",
                        lab_subnet="10.233.0.0/24")
    summary: dict[str, Any] = {"moves_asked": moves, "moves_done": 0, "failure": None,
                               "state_dir": str(state)}
    times: list[float] = []
    commands: list[float] = []
    t_start = time.monotonic()
    async with Host(settings) as host:
        try:
            print("soak: lab up...", file=sys.stderr)
            await lab_up(host)
            rec = await host.cloud.start_guest("soak", "l1a", memory, touch=70)
            if await host.cloud.wait_heartbeat(rec, timeout=300) is None:
                raise VmbeamError("the guest never reported a heartbeat")
            for i in range(moves):
                to = "l1b" if i % 2 == 0 else "l1a"
                t0 = time.monotonic()
                res = await host.cloud.migrate("soak", to, MigrationMode.ZERO_COPY)
                commands.append((time.monotonic() - t0) * 1000)
                times.append(res.total_ms)
                st = await host.status("soak")
                objs = await region_objects(host)
                problems = []
                if not res.guest_ok:
                    problems.append("guest not ok after the move")
                if st.cloud_vm != to or st.run_state != "running" or not st.memory_ok:
                    problems.append(f"status {st.cloud_vm} {st.run_state} memory_ok "
                                    f"{st.memory_ok}")
                if sum(objs.values()) != 1 or objs.get(to) != 1:
                    problems.append(f"region objects on L0: {objs}")
                if len(host.store.regions()) != 1:
                    problems.append(f"store regions: {len(host.store.regions())}")
                if problems:
                    summary["failure"] = f"move {i + 1} to {to}: " + "; ".join(problems)
                    break
                summary["moves_done"] = i + 1
                if (i + 1) % 20 == 0:
                    print(f"soak: {i + 1}/{moves} moves, last {res.total_ms:.0f} ms",
                          file=sys.stderr)
        except VmbeamError as exc:
            summary["failure"] = f"after {summary['moves_done']} moves: {exc}"
        finally:
            await lab_down(host)
    summary["elapsed_s"] = round(time.monotonic() - t_start, 1)
    if times:
        summary["total_ms"] = {"median": round(statistics.median(times), 1),
                               "max": round(max(times), 1)}
        summary["command_ms"] = {"median": round(statistics.median(commands), 1),
                                 "max": round(max(commands), 1)}
    ok = summary["failure"] is None
    if ok:
        shutil.rmtree(state, ignore_errors=True)
        summary["state_dir"] = None
    else:
        print(f"soak: FAILED; state directory kept: {state}", file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--moves", type=int, default=200)
    ap.add_argument("--memory", default="128M")
    args = ap.parse_args()
    sys.exit(asyncio.run(soak(args.moves, args.memory)))
