"""`make demo`: the VMBeam story on this host, printed side by side.

Default (nested): lab up (cloud VMs l1a, l1b of tenant-a and l1c of tenant-b), start a guest
in l1a, move it zero-copy to l1b and back, then by precopy for comparison, then evacuate l1b
(that guest and two more) into l1a at once; then a 2-vCPU guest booted from a qcow2 image
through firmware, with a data disk and a NIC (beam disks: L0's qcow2 files), moves
l1a -> l1b -> l1a with its disks shared, and every write made before a move is read back
from L0 afterwards; lab down.
``--flat``: the same guest moved between two QEMU processes on this host.

Uses the Python API end to end; the state directory and lab namespace are private to the
demo and everything it starts is stopped at the end, also on failure or Ctrl-C. A failed run
keeps its state directory (QEMU logs, cloud-VM consoles, the store) and prints its path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vmbeam_kvm import (
    BadInputError,
    Host,
    MigrationMode,
    MigrationOptions,
    MigrationResult,
    Settings,
)
from vmbeam_kvm.lab import lab_down, lab_up
from vmbeam_kvm.units import format_size, parse_size


def _label(r: MigrationResult) -> str:
    if r.source_cloud_vm and r.dest_cloud_vm:
        return f"{r.mode} {r.source_cloud_vm[-1]}>{r.dest_cloud_vm[-1]}"
    return r.mode


def table(results: list[MigrationResult]) -> str:
    rows = [
        ("total time (ms)", lambda r: f"{r.total_ms:.1f}"),
        ("downtime (ms)", lambda r: f"{r.downtime_ms}"),
        ("pause the guest saw (ms)", lambda r: "n/a" if r.pause_ms is None
         else f"{r.pause_ms:.1f}"),
        ("RAM sent (bytes)", lambda r: f"{r.ram_transferred_bytes:,}"),
        ("shared frames", lambda r: "n/a" if r.shared_frames_ratio is None
         else f"{r.shared_frames_ratio:.4f}"),
        ("peak QEMU memory (MB)", lambda r: f"{r.peak_qemu_memory_bytes / 1e6:.0f}"),
        ("QEMU CPU (s)", lambda r: f"{r.qemu_cpu_seconds:.2f}"),
        ("guest ok after move", lambda r: str(r.guest_ok)),
    ]
    if all(r.source_cloud_vm is not None for r in results):
        rows[4:6] = [
            ("bytes on L1-L1 link", lambda r: f"{getattr(r, 'network_bytes', 0):,}"),
            ("L0 CPU, all QEMUs (s)", lambda r: f"{getattr(r, 'l0_cpu_seconds', 0):.2f}"),
            ("source detached", lambda r: str(getattr(r, "source_detached", None))),
            ("stream over TLS", lambda r: str(getattr(r, "tls", None))),
        ]
        # QEMU CPU: the L0 CPU row above is the same figure.
        rows = [row for row in rows if row[0] != "QEMU CPU (s)"]
    head = f"| {'':24} | " + " | ".join(f"{_label(r):>14}" for r in results) + " |"
    sep = "|" + "-" * 26 + "|" + "|".join("-" * 16 for _ in results) + "|"
    lines = [head, sep]
    for label, fn in rows:
        lines.append(f"| {label:24} | " + " | ".join(f"{fn(r):>14}" for r in results) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def state_dir() -> Iterator[list[str]]:
    """A private state directory, removed after a good run and kept after a failed one.

    Yields a one-element list the run sets to "ok" when everything checked out.
    """
    path = tempfile.mkdtemp(prefix="vmbeam-demo-", dir="/tmp")
    verdict = [path]
    try:
        yield verdict
    finally:
        if verdict[0] == "ok":
            shutil.rmtree(path, ignore_errors=True)
        else:
            say(f"FAILED: state directory kept for the logs: {path} (QEMU logs and consoles "
                f"under guests/*/ and cloudvms/*/)")


async def nested(memory: str) -> int:
    with state_dir() as verdict:
        state = verdict[0]
        settings = Settings(state_dir=Path(state), lab_ns=f"vmbeam-demo-{os.getpid()}")
        async with Host(settings) as host:
            try:
                say("lab up: booting cloud VMs (L1) l1a, l1b (tenant-a), l1c (tenant-b)...")
                print(f"demo: {await lab_up(host)}", file=sys.stderr)
                say(f"starting a {memory} test guest (L2) in l1a, its RAM in a beam region...")
                rec = await host.cloud.start_guest("demo", "l1a", memory, touch=60)
                hb = await host.cloud.wait_heartbeat(rec, timeout=300)
                say(f"guest running in l1a, heartbeat seq {hb.seq if hb else '-'}")
                results: list[MigrationResult] = []
                for to, mode in (("l1b", MigrationMode.ZERO_COPY), ("l1a", MigrationMode.ZERO_COPY),
                                 ("l1b", MigrationMode.PRECOPY)):
                    say(f"migrating to {to} by {mode.value}...")
                    results.append(await host.cloud.migrate("demo", to, mode))
                say("trying to move it to l1c (tenant-b): must be refused...")
                try:
                    await host.cloud.migrate("demo", "l1c")
                    refused = False
                except BadInputError as exc:
                    refused = True
                    say(f"refused as it should be: {exc}")
                say("two more guests in l1b, then evacuating l1b: every guest out at once...")
                for extra in ("demo-2", "demo-3"):
                    more = await host.cloud.start_guest(extra, "l1b", "64M", touch=40)
                    await host.cloud.wait_heartbeat(more, timeout=300)
                ev = await host.evacuate("l1b", ["l1a"], progress=lambda m: say(f"  {m}"))
                st = await host.status("demo")
                disk_results, disk_ok = await disk_guest(host, Path(state))
            finally:
                say("lab down...")
                await lab_down(host)
        print(f"\nvmbeam-kvm demo: test guest, {memory} RAM, between co-located cloud VMs\n")
        print(table(results))
        zc, pre = results[0], results[2]
        print(f"\nzero-copy was {pre.total_ms / zc.total_ms:.0f}x faster than precopy and put "
              f"{getattr(pre, 'network_bytes', 0) / max(getattr(zc, 'network_bytes', 1), 1):.0f}x"
              f" fewer bytes on the L1-L1 network; guest in {st.cloud_vm}, memory verdict "
              f"{'good' if st.memory_ok else 'BAD'}; cross-tenant move refused: {refused}")
        summary = ev.summary()
        print(f"\nevacuated l1b into l1a: {summary['completed']} of {summary['guests']} guests "
              f"in {summary['wall_ms']:.0f} ms, {ev.parallel} at a time, zero-copy")
        for m in ev.moves:
            pause = "n/a" if m.pause_ms is None else f"{m.pause_ms:.1f} ms"
            print(f"  {m.guest:8} {m.source_cloud_vm} -> {m.dest_cloud_vm}: {m.status}, the "
                  f"guest saw a pause of {pause}")
        print("\na 2-vCPU guest booted from a qcow2 image, with a data disk and a NIC (beam "
              "disks: qcow2 files on L0), zero-copy l1a>l1b>l1a:\n")
        print(table(disk_results))
        for r in disk_results:
            print(f"  {_label(r)}: disks {r.disks}, disk bytes copied {r.disk_bytes_copied}, "
                  f"source lost the disk {r.source_disks_revoked_ms} ms after the switch")
        print(f"  every acknowledged write read back intact from L0: {disk_ok}")
        ok = (all(r.guest_ok for r in results + disk_results) and bool(st.memory_ok)
              and refused and ev.exit_code == 0 and st.cloud_vm == "l1a" and disk_ok
              and all(r.disk_bytes_copied == 0 and len(r.disks) == 2 for r in disk_results))
        if ok:
            verdict[0] = "ok"
        return 0 if ok else 1


async def disk_guest(host: Host, state: Path) -> tuple[list[MigrationResult], bool]:
    """A guest booted from a qcow2 image through firmware (images/bootdisk: SYSLINUX and
    the test guest on it), with a data disk, 2 vCPUs and a NIC, moved l1a -> l1b -> l1a;
    whether every write made through its L2 QEMU to the data disk (HMP qemu-io,
    acknowledged when it returns) reads back from L0's file."""
    size, mib = 16 << 20, 1 << 20
    boot, user = state / "demo-boot.qcow2", state / "demo-disk.qcow2"
    shutil.copyfile(host.settings.images_dir / "testguest-disk.qcow2", boot)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(user), str(size)], check=True)
    expect = bytearray(size)
    say("a 2-vCPU guest booted from a qcow2 image, with a 16 MiB data disk and a NIC, in l1a "
        "(beam disks: L0's files)...")
    rec = await host.cloud.start_guest("demo-disk", "l1a", "64M", cpus=2, net=True,
                                       disks=host.check_disks([str(boot), str(user)],
                                                              beam=True))
    await host.cloud.wait_heartbeat(rec, timeout=300)

    async def io(cmd: str) -> None:
        await host.cloud.qmp(host.store.get_guest("demo-disk"), "human-monitor-command", {
            "command-line": f'qemu-io -d disk1-dev/virtio-backend "{cmd}"'})

    async def write(pattern: int, at: int) -> None:
        await io(f"write -P {pattern} {at} 1M")
        expect[at:at + mib] = bytes([pattern]) * mib

    results = []
    await write(0x11, 0)
    for n, to in enumerate(("l1b", "l1a")):
        say(f"migrating the disk guest to {to} by zero-copy...")
        results.append(await host.cloud.migrate("demo-disk", to, MigrationMode.ZERO_COPY))
        await write(0x21 + n, (n + 1) * mib)
    await io("flush")
    g = host.store.get_guest("demo-disk")
    overlay, back = json.loads(g.disks)[1]["path"], state / "demo-disk.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", overlay, str(back)], check=True)
    intact = back.read_bytes() == bytes(expect)
    await host.stop_guest("demo-disk")
    return results, intact


def say(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr)


async def main(image: str, memory: str) -> int:
    with state_dir() as verdict:
        state = verdict[0]
        async with Host(Settings(state_dir=Path(state))) as host:
            print(f"demo: starting a {memory} {image} guest (RAM in a beam region)...",
                  file=sys.stderr)
            async with await host.start_guest("demo", memory, image=image, touch=60) as guest:
                timeout = 300 + 30 * parse_size(memory) / (1 << 30)
                hb = await guest.wait_ready(timeout=timeout)
                st = await guest.status()
                print(f"demo: guest running under {st.accel}, heartbeat seq {hb.seq}, "
                      f"memory verdict {'good' if hb.ok else 'BAD'}", file=sys.stderr)
                results = []
                for mode in (MigrationMode.ZERO_COPY, MigrationMode.PRECOPY,
                             MigrationMode.ZERO_COPY):
                    print(f"demo: migrating by {mode.value}...", file=sys.stderr)
                    results.append(await guest.migrate(MigrationOptions(mode=mode)))
                final = await guest.status()
        print(f"\nvmbeam-kvm demo: {image} guest, {format_size(parse_size(memory))} RAM\n")
        print(table(results))
        zc, pre = results[0], results[1]
        print(f"\nzero-copy was {pre.total_ms / zc.total_ms:.0f}x faster and sent "
              f"{pre.ram_transferred_bytes / max(zc.ram_transferred_bytes, 1):.0f}x fewer "
              f"bytes; guest heartbeat seq {final.heartbeat.seq if final.heartbeat else '-'}, "
              f"memory verdict {'good' if final.memory_ok else 'BAD'}")
        ok = all(r.guest_ok for r in results) and bool(final.memory_ok)
        if ok:
            verdict[0] = "ok"
        return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--flat", action="store_true", help="one host, no cloud VMs")
    ap.add_argument("--image", default="linux", choices=["linux", "test"],
                    help="guest image for --flat")
    ap.add_argument("--memory", default=None, help="guest RAM (default 256M nested, 512M flat)")
    args = ap.parse_args()
    if args.flat:
        sys.exit(asyncio.run(main(args.image, args.memory or "512M")))
    sys.exit(asyncio.run(nested(args.memory or "256M")))
