"""`make demo`: start a guest, move it zero-copy and by precopy, print both side by side.

Uses the Python API end to end; the state directory is private to the demo and everything it
starts is stopped at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from vmbeam_kvm import Host, MigrationMode, MigrationOptions, MigrationResult, Settings
from vmbeam_kvm.units import format_size, parse_size


def table(results: list[MigrationResult]) -> str:
    rows = [
        ("total time (ms)", lambda r: f"{r.total_ms:.1f}"),
        ("downtime (ms)", lambda r: f"{r.downtime_ms}"),
        ("RAM sent (bytes)", lambda r: f"{r.ram_transferred_bytes:,}"),
        ("shared frames", lambda r: "n/a" if r.shared_frames_ratio is None
         else f"{r.shared_frames_ratio:.4f}"),
        ("peak QEMU memory (MB)", lambda r: f"{r.peak_qemu_memory_bytes / 1e6:.0f}"),
        ("QEMU CPU (s)", lambda r: f"{r.qemu_cpu_seconds:.2f}"),
        ("guest ok after move", lambda r: str(r.guest_ok)),
    ]
    head = f"| {'':24} | " + " | ".join(f"{r.mode:>14}" for r in results) + " |"
    sep = "|" + "-" * 26 + "|" + "|".join("-" * 16 for _ in results) + "|"
    lines = [head, sep]
    for label, fn in rows:
        lines.append(f"| {label:24} | " + " | ".join(f"{fn(r):>14}" for r in results) + " |")
    return "\n".join(lines)


async def main(image: str, memory: str) -> int:
    with tempfile.TemporaryDirectory(prefix="vmbeam-demo-") as state:
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
        return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image", default="linux", choices=["linux", "test"])
    ap.add_argument("--memory", default="512M")
    args = ap.parse_args()
    sys.exit(asyncio.run(main(args.image, args.memory)))
