"""The flat benchmark: zero-copy vs precopy vs QEMU's cpr-transfer, one host, one run.

For each guest size, vCPU count and disk size the same kind of guest (``touch`` % of RAM
filled and mutating; a data disk of the size, ``disk_fill`` % of it written by the guest's
QEMU into its overlay, as a guest's own writes are) is moved ``repeat`` times by each
method. Every figure is reported as ``{"min", "median", "max"}`` over the repeats after the first
(``statistics_over`` of ``repeats``), so a JSON consumer never has to guess which statistic
a number is; the first move of a method (for zero-copy: the guest's first move ever, the
one users do most) is reported apart, as ``first_move``
(``first_move_ms`` its total time).

``pause_ms`` is what the guest saw (its ticks on L0's clock, :mod:`vmbeam_kvm.ticks`), next
to QEMU's ``downtime_ms``; ``post_switch_slowdown`` its work rate over ``tail_window`` s
after the switch against as long before the move.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .checks import mem_available
from .errors import BadInputError, MigrationError, VmbeamError
from .guest import Guest
from .host import Host
from .migrate.model import MigrationMode, MigrationOptions, MigrationResult
from .qemu.machine import RamBackend
from .units import format_size

FIGURES = ("total_ms", "downtime_ms", "pause_ms", "post_switch_slowdown", "command_ms",
           "ram_transferred_bytes", "disk_bytes_copied", "peak_qemu_memory_bytes",
           "qemu_cpu_seconds", "shared_frames_ratio")
# The figures of a method's first move, reported apart from the repeats' statistics.
FIRST_MOVE = ("total_ms", "downtime_ms", "pause_ms", "post_switch_slowdown", "command_ms")
TAIL_WINDOW = 0.5
METHODS = (MigrationMode.ZERO_COPY, MigrationMode.PRECOPY, MigrationMode.CPR_TRANSFER)


def summarize(values: Sequence[float | None]) -> dict[str, float | None] | None:
    """min/median/max of the non-null values (None when every value is null)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}


# Table columns: header, JSON key, scale, digits (None: the value as it is, e.g. a verdict).
Column = tuple[str, str, float, int | None]
FLAT_COLUMNS: tuple[Column, ...] = (
    ("total ms", "total_ms", 1, 1), ("first ms", "first_move_ms", 1, 1),
    ("downtime ms", "downtime_ms", 1, 1), ("pause ms", "pause_ms", 1, 1),
    ("first pause ms", "first_move_pause_ms", 1, 1),
    ("after/before", "post_switch_slowdown", 1, 2), ("command ms", "command_ms", 1, 0),
    ("RAM sent MB", "ram_transferred_bytes", 1e-6, 2),
    ("disk copied MB", "disk_bytes_copied", 1e-6, 1),
    ("peak QEMU mem MB", "peak_qemu_memory_bytes", 1e-6, 0),
    ("QEMU CPU s", "qemu_cpu_seconds", 1, 2), ("shared frames", "shared_frames_ratio", 1, 3),
    ("guest ok", "guest_ok", 1, None))


@dataclass
class BenchRow:
    """All repeats of one method for one kind of guest (size, vCPUs, disk)."""

    method: str
    memory_bytes: int
    results: list[MigrationResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # moves that failed, source running
    hugepages: bool = False
    cpus: int = 1
    disk_bytes: int = 0  # the size of its data disk (0: none)
    figures: ClassVar[tuple[str, ...]] = FIGURES
    columns: ClassVar[tuple[Column, ...]] = FLAT_COLUMNS

    @property
    def repeats(self) -> list[MigrationResult]:
        """The moves the statistics are over: all but the first, if there are more."""
        return self.results[1:] if len(self.results) > 1 else self.results

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"method": self.method, "memory_bytes": self.memory_bytes,
                               "cpus": self.cpus, "disk_size_bytes": self.disk_bytes,
                               "repeats": len(self.results),
                               "statistics_over": len(self.repeats),
                               "hugepages": self.hugepages, "failures": self.failures}
        for fig in self.figures:
            row[fig] = summarize([getattr(r, fig) for r in self.repeats])
        first = self.results[0] if self.results else None
        row["first_move"] = ({f: getattr(first, f) for f in FIRST_MOVE}
                             if first is not None else None)
        row["first_move_ms"] = first.total_ms if first is not None else None
        row["first_move_pause_ms"] = first.pause_ms if first is not None else None
        row["guest_ok"] = (bool(self.results) and not self.failures
                           and all(r.guest_ok for r in self.results))
        return row

    @property
    def kind(self) -> tuple[int, int, int]:
        """The guest this row moved: (memory, vCPUs, disk size)."""
        return self.memory_bytes, self.cpus, self.disk_bytes

    @property
    def label(self) -> str:
        """The method, with the vCPUs and disk where the guest has more than the default."""
        extra = ([f"{self.cpus} vCPU"] if self.cpus != 1 else []) + (
            [f"disk {format_size(self.disk_bytes)}"] if self.disk_bytes else [])
        return f"{self.method} ({', '.join(extra)})" if extra else self.method


def guest_kinds(sizes: Sequence[int], cpus: Sequence[int], disk_sizes: Sequence[int]
                ) -> list[tuple[int, int, int]]:
    """Every (memory, vCPUs, disk size) a bench moves, in the order it runs them."""
    return [(m, c, d) for m in sizes for c in cpus for d in disk_sizes]


def guest_suffix(cpus: int, disk: int) -> str:
    """The part of a bench guest's name that tells its vCPUs and disk apart."""
    return (f"-c{cpus}" if cpus != 1 else "") + (f"-d{format_size(disk)}" if disk else "")


FILL_CHUNK = 16 << 20


async def fill_disk(guest: Guest, size: int, fill: int,
                    progress: Callable[[str], None]) -> int:
    """Write ``fill`` % of a bench guest's data disk (disk0) through its own QEMU (HMP
    ``qemu-io`` on the device), in 16 MiB chunks spread evenly over it: what the guest wrote
    lies in its overlay, as a real guest's writes do, and is what a copying move must
    copy. Returns the bytes written."""
    chunks = size // FILL_CHUNK
    count = max(1, chunks * fill // 100) if fill and chunks else 0
    for i in range(count):
        off = i * chunks // count * FILL_CHUNK
        await guest.qmp("human-monitor-command", {
            "command-line": f'qemu-io -d disk0-dev/virtio-backend '
                            f'"write -P {0x41 + i % 26:#x} {off} {FILL_CHUNK}"'})
    await guest.qmp("human-monitor-command",
                    {"command-line": 'qemu-io -d disk0-dev/virtio-backend "flush"'})
    progress(f"{guest.name}: {count * FILL_CHUNK / 1e6:.0f} MB of its "
             f"{format_size(size)} disk written")
    return count * FILL_CHUNK


@contextlib.contextmanager
def bench_disk(host: Host, size: int) -> Iterator[list[str]]:
    """The user's file of one bench guest's data disk (none for ``size`` 0): a sparse raw
    file in the state dir, removed afterwards."""
    if not size:
        yield []
        return
    folder = host.settings.state_dir / "bench-disks"
    folder.mkdir(exist_ok=True)
    path = folder / f"disk-{format_size(size)}.raw"
    try:
        with open(path, "wb") as f:
            f.truncate(size)
        yield [str(path)]
    finally:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()


PREFAULT = "zero-copy+prefault"  # the row of zero-copy moves with MigrationOptions.prefault


async def bench_flat(host: Host, sizes: Sequence[int], *, repeat: int = 3, touch: int = 70,
                     methods: Sequence[MigrationMode] = METHODS,
                     tail_window: float = TAIL_WINDOW, prefault: bool = False,
                     hugepages: bool = False, precopy_max: int | None = None,
                     cpus: Sequence[int] = (1,), disk_sizes: Sequence[int] = (0,),
                     disk_fill: int = 10,
                     progress: Callable[[str], None] = lambda _: None) -> list[BenchRow]:
    """Run the flat benchmark; guests are named ``bench-<size>-<backend>[-c<cpus>][-d<disk>]``
    and stopped afterwards. ``prefault`` adds a row of zero-copy moves that prefault the
    destination; ``hugepages`` backs the region guests with huge pages; precopy is left out
    above ``precopy_max`` bytes; ``cpus`` and ``disk_sizes`` (0: no disk) multiply the
    guests."""
    rows: list[BenchRow] = []
    for size, ncpu, disk in guest_kinds(sizes, cpus, disk_sizes):
        what = f"{format_size(size)}{guest_suffix(ncpu, disk)}"
        # (row label, mode, prefault) in the order each repeat runs them. Zero-copy and
        # precopy move one region-backed guest; cpr-transfer needs QEMU's memfd.
        plan: list[tuple[str, MigrationMode, bool]] = [
            (m.value, m, False) for m in methods
            if m is not MigrationMode.PRECOPY or precopy_max is None or size <= precopy_max]
        if prefault and MigrationMode.ZERO_COPY in methods:
            plan.insert(1, (PREFAULT, MigrationMode.ZERO_COPY, True))
        by_label = {label: BenchRow(label, size, cpus=ncpu, disk_bytes=disk)
                    for label, _, _ in plan}
        for backend in (RamBackend.REGION, RamBackend.MEMFD):
            group = [p for p in plan
                     if (p[1] is MigrationMode.CPR_TRANSFER) == (backend is RamBackend.MEMFD)]
            if not group:
                continue
            name = f"bench-{format_size(size)}-{backend.value}{guest_suffix(ncpu, disk)}"
            huge = hugepages and backend is RamBackend.REGION
            progress(f"{what}: starting guest {name} ({touch}% touched, {ncpu} vCPU"
                     f"{', huge pages' if huge else ''})")
            await _memory_back(size)
            with bench_disk(host, disk) as disks:
                try:
                    guest = await host.start_guest(name, size, image="test", touch=touch,
                                                   backend=backend, hugepages=huge,
                                                   cpus=ncpu, disks=disks)
                except VmbeamError as exc:
                    # The rows of this guest say why they are empty; the others go on.
                    for label, _, _ in group:
                        by_label[label].failures.append(f"guest did not start: {exc}")
                    progress(f"{what}: guest {name} did not start ({exc})")
                    continue
                async with guest:
                    hb = await guest.wait_ready(timeout=120 + 30 * size / (1 << 30))
                    progress(f"{what}: guest ready (seq {hb.seq})")
                    if disks:
                        await fill_disk(guest, disk, disk_fill, progress)
                    for i in range(repeat):
                        for label, mode, pf in group:
                            await _move(guest.migrate, by_label[label],
                                        MigrationOptions(mode=mode, tail_window=tail_window,
                                                         prefault=pf),
                                        f"{what} {label} #{i + 1}", progress)
        for row in by_label.values():
            row.hugepages = hugepages and row.method != MigrationMode.CPR_TRANSFER.value
        rows.extend(by_label.values())
    return rows


async def _into(host: Host, name: str, to: str, options: MigrationOptions
                ) -> MigrationResult:
    """Move guest ``name`` into cloud VM ``to`` with ``options`` (a bench's one move)."""
    return await host.cloud.migrate(name, to, options=options)


async def _move(migrate: Callable[[MigrationOptions], Awaitable[MigrationResult]],
                row: BenchRow, options: MigrationOptions, what: str,
                progress: Callable[[str], None]) -> MigrationResult | None:
    """One move of a row: its result appended, or (the source resumed) its failure — a miss
    is a result too, counted, and the guest moves on."""
    try:
        res = await migrate(options)
    except MigrationError as exc:
        if not exc.source_resumed:
            raise
        row.failures.append(str(exc))
        progress(f"{what}: FAILED ({exc})")
        return None
    row.results.append(res)
    progress(f"{what}: {res.total_ms:.1f} ms, downtime {res.downtime_ms} ms, pause "
             f"{res.pause_ms} ms, after/before {res.post_switch_slowdown}, command "
             f"{res.command_ms:.0f} ms, RAM {res.ram_transferred_bytes / 1e6:.1f} MB, disk "
             f"{res.disk_bytes_copied / 1e6:.1f} MB, ok={res.guest_ok}")
    return res


async def _memory_back(size: int, timeout: float = 60.0) -> None:
    """Wait (up to ``timeout``) until the host has ``size`` bytes available again: the
    kernel frees a stopped guest's region (and QEMU's memory) a moment after it exits."""
    deadline = time.monotonic() + timeout
    while mem_available() < size and time.monotonic() < deadline:
        await asyncio.sleep(0.5)


def _fmt(summary: dict[str, float | None] | float | None, scale: float = 1.0,
         digits: int = 1) -> str:
    value = summary["median"] if isinstance(summary, dict) else summary
    if value is None:
        return "—"
    return f"{value * scale:.{digits}f}"


def markdown_table(rows: Sequence[BenchRow]) -> str:
    """Median figures per method and guest (the row type's columns), plus the ratios the
    project tracks."""
    columns = type(rows[0]).columns if rows else FLAT_COLUMNS
    lines = ["| size | vCPUs | disk | method | " + " | ".join(c[0] for c in columns) + " |",
             "|---|---:|---:|---|"
             + "|".join("---" if c[3] is None else "---:" for c in columns) + "|"]
    for row in rows:
        j = row.to_json()
        cells = [str(j[key]) if digits is None else _fmt(j[key], scale, digits)
                 for _, key, scale, digits in columns]
        disk = format_size(row.disk_bytes) if row.disk_bytes else "—"
        lines.append(f"| {format_size(row.memory_bytes)} | {row.cpus} | {disk} | "
                     f"{row.method} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *ratio_lines(rows)])


def _median(row: BenchRow | None, fig: str) -> float | None:
    if row is None:
        return None
    s = summarize([getattr(x, fig) for x in row.repeats])
    return s["median"] if s else None


def ratio_lines(rows: Sequence[BenchRow]) -> list[str]:
    """Zero-copy flatness (largest/smallest size), precopy/zero-copy speed-up per guest, and
    against the goals: a disk's cost in pause and command time, the pause by vCPU count."""
    by = {(r.method, *r.kind): r for r in rows}
    zc_name, pre_name = MigrationMode.ZERO_COPY.value, MigrationMode.PRECOPY.value
    out = []
    for ncpu, disk in dict.fromkeys((r.cpus, r.disk_bytes) for r in rows):
        zc = sorted((m, t) for (meth, m, c, d), r in by.items()
                    if meth == zc_name and (c, d) == (ncpu, disk)
                    and (t := _median(r, "total_ms")))
        tag = guest_suffix(ncpu, disk).lstrip("-")
        tag = f" ({tag})" if tag else ""
        if len(zc) >= 2:
            out.append(f"zero-copy total time {format_size(zc[-1][0])}/"
                       f"{format_size(zc[0][0])}{tag}: {zc[-1][1] / zc[0][1]:.2f}x")
        for size, zc_ms in zc:
            pre = _median(by.get((pre_name, size, ncpu, disk)), "total_ms")
            if pre:
                out.append(f"precopy/zero-copy at {format_size(size)}{tag}: "
                           f"{pre / zc_ms:.0f}x faster zero-copy")
    for (meth, size, ncpu, disk), row in by.items():
        bare = by.get((meth, size, ncpu, 0))
        if disk and bare is not None:
            p, p0 = _median(row, "pause_ms"), _median(bare, "pause_ms")
            c, c0 = _median(row, "command_ms"), _median(bare, "command_ms")
            if p is None or p0 is None or c is None or c0 is None:
                continue
            # The goal is zero-copy's (a shared disk costs next to nothing); the copying
            # methods' lines say what a copy costs.
            goal_p = (f" (goal <= +10 % + 5 ms: {'met' if p <= p0 * 1.1 + 5 else 'MISSED'})"
                      if meth == zc_name else "")
            goal_c = (f" (goal <= +20 %: {'met' if c <= c0 * 1.2 else 'MISSED'})"
                      if meth == zc_name else "")
            out.append(f"{meth} {format_size(size)} {ncpu} vCPU, disk {format_size(disk)} vs "
                       f"none: pause {p:.1f} vs {p0:.1f} ms{goal_p}, command {c:.0f} vs "
                       f"{c0:.0f} ms{goal_c}, disk copied "
                       f"{(_median(row, 'disk_bytes_copied') or 0) / 1e6:.1f} MB")
    for (meth, size, ncpu, disk), row in by.items():
        one = by.get((meth, size, 1, disk))
        if ncpu > 1 and one is not None:
            p, p1 = _median(row, "pause_ms"), _median(one, "pause_ms")
            if p is not None and p1:
                out.append(f"{meth} {format_size(size)}"
                           f"{', disk ' + format_size(disk) if disk else ''}: pause "
                           f"{ncpu} vCPU / 1 vCPU = {p:.1f} / {p1:.1f} ms = {p / p1:.2f}x "
                           f"(goal <= 2x: {'met' if p <= 2 * p1 else 'MISSED'})")
    return out


def plot(rows: Sequence[BenchRow], path: Path,
         title: str = "vmbeam-kvm: migration time and guest pause vs guest size") -> None:
    """Total migration time and the pause the guest saw (medians with min-max bars, log
    scale) against guest size, one line per method; first moves as hollow markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "total_ms", "total migration time (ms, log)"),
                           (axes[1], "pause_ms", "pause the guest saw (ms, log)")):
        for method in dict.fromkeys(r.label for r in rows):
            mine = [r for r in rows if r.label == method]
            pts = [(r.memory_bytes / (1 << 30), summarize([getattr(x, key) for x in r.repeats]))
                   for r in mine]
            got = [(x, {k: float(v or 0.0) for k, v in s.items()}) for x, s in pts if s]
            if not got:
                continue
            xs = [x for x, _ in got]
            ys = [s["median"] for _, s in got]
            lo = [s["median"] - s["min"] for _, s in got]
            hi = [s["max"] - s["median"] for _, s in got]
            line = ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=method)
            firsts = [(r.memory_bytes / (1 << 30), getattr(r.results[0], key))
                      for r in mine if r.results and getattr(r.results[0], key)]
            if firsts:
                ax.plot([x for x, _ in firsts], [y for _, y in firsts], linestyle="none",
                        marker="o", mfc="none", color=line[0].get_color(),
                        label=f"{method} (first move)")
        ax.set_xlabel("guest memory (GiB)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


NESTED_FIGURES = ("total_ms", "downtime_ms", "pause_ms", "post_switch_slowdown",
                  "command_ms", "ram_transferred_bytes", "disk_bytes_copied", "network_bytes",
                  "l0_cpu_seconds",
                  "shared_frames_ratio", "peak_qemu_memory_bytes")


@dataclass
class NestedRow(BenchRow):
    """All repeats of one method at one guest size, between two co-located cloud VMs."""

    figures: ClassVar[tuple[str, ...]] = NESTED_FIGURES
    columns: ClassVar[tuple[Column, ...]] = (
        ("total ms", "total_ms", 1, 1), ("first ms", "first_move_ms", 1, 1),
        ("downtime ms", "downtime_ms", 1, 1), ("pause ms", "pause_ms", 1, 1),
        ("first pause ms", "first_move_pause_ms", 1, 1),
        ("after/before", "post_switch_slowdown", 1, 2), ("command ms", "command_ms", 1, 0),
        ("RAM sent MB", "ram_transferred_bytes", 1e-6, 2),
        ("disk copied MB", "disk_bytes_copied", 1e-6, 1),
        ("L1-L1 wire MB", "network_bytes", 1e-6, 2), ("L0 CPU s", "l0_cpu_seconds", 1, 2),
        ("shared frames", "shared_frames_ratio", 1, 3),
        ("peak L1 QEMU mem MB", "peak_qemu_memory_bytes", 1e-6, 0),
        ("guest ok", "guest_ok", 1, None), ("source detached", "source_detached", 1, None),
        ("TLS", "tls", 1, None))

    def to_json(self) -> dict[str, Any]:
        row = super().to_json()
        row["source_detached"] = all(getattr(r, "source_detached", False)
                                     for r in self.results)
        row["tls"] = all(getattr(r, "tls", False) for r in self.results)
        return row


async def bench_nested(host: Host, sizes: Sequence[int], *, cloud_vms: tuple[str, str],
                       repeat: int = 3, touch: int = 70, tail_window: float = TAIL_WINDOW,
                       cpus: Sequence[int] = (1,), disk_sizes: Sequence[int] = (0,),
                       disk_fill: int = 10,
                       progress: Callable[[str], None] = lambda _: None) -> list[NestedRow]:
    """Zero-copy vs precopy of one guest between two co-located cloud VMs, per size, vCPU
    count and disk size (a beam disk). Precopy of a guest with beam disks is refused, as
    ``migrate`` refuses it: its row says so in ``failures``."""
    rows: list[NestedRow] = []
    a, b = cloud_vms
    for size, ncpu, disk in guest_kinds(sizes, cpus, disk_sizes):
        what = f"{format_size(size)}{guest_suffix(ncpu, disk)}"
        zc = NestedRow(MigrationMode.ZERO_COPY.value, size, cpus=ncpu, disk_bytes=disk)
        pre = NestedRow(MigrationMode.PRECOPY.value, size, cpus=ncpu, disk_bytes=disk)
        name = f"bench-n{what}"
        progress(f"{what}: starting guest {name} in {a} ({ncpu} vCPU)")
        with bench_disk(host, disk) as disks:
            guest = await host.start_guest(name, size, image="test", touch=touch,
                                           cloud_vm=a, cpus=ncpu, disks=disks)
            try:
                rec = host.store.get_guest(name)
                if await host.cloud.wait_heartbeat(
                        rec, timeout=300 + 300 * size / (1 << 30)) is None:
                    raise RuntimeError(f"guest {name} did not start in {a}")
                if disks:
                    await fill_disk(guest, disk, disk_fill, progress)
                where = a
                for i in range(repeat):
                    for row, mode in ((zc, MigrationMode.ZERO_COPY),
                                      (pre, MigrationMode.PRECOPY)):
                        to = b if where == a else a
                        if row.failures and row.failures[-1].startswith("refused"):
                            continue  # asked once: the answer will not change
                        try:
                            res = await _move(functools.partial(_into, host, name, to),
                                              row, MigrationOptions(
                                mode=mode, tail_window=tail_window),
                                f"{what} {mode.value} #{i + 1} -> {to}", progress)
                        except BadInputError as exc:
                            # Refused before anything changed (precopy of a guest with
                            # beam disks): the row says why it is empty.
                            row.failures.append(f"refused: {exc}")
                            progress(f"{what} {mode.value}: refused ({exc})")
                            continue
                        if res is not None:
                            where = to
            finally:
                await host.stop_guest(name, missing_ok=True)
        rows += [zc, pre]
    return rows


async def bench_evacuation(host: Host, size: int, guests: int, *, cloud_vms: tuple[str, str],
                           repeat: int = 1, touch: int = 70,
                           progress: Callable[[str], None] = lambda _: None
                           ) -> dict[str, Any]:
    """``guests`` guests of ``size`` evacuated from one cloud VM into the other and back,
    ``repeat`` times: the wall time of each evacuation and every guest's pause (the
    ``method: evacuate`` row of ``bench nested --guests N``)."""
    a, b = cloud_vms
    names = [f"bench-e{i}" for i in range(guests)]
    runs: list[dict[str, Any]] = []
    try:
        for n in names:
            progress(f"evacuation: starting guest {n} ({format_size(size)}) in {a}")
            await host.cloud.start_guest(n, a, size, touch=touch)
        for n in names:
            if await host.cloud.wait_heartbeat(host.store.get_guest(n), timeout=300) is None:
                raise RuntimeError(f"guest {n} did not start in {a}")
        src, dst = a, b
        for i in range(repeat * 2):
            ev = await host.evacuate(src, [dst])
            s = ev.summary()
            pauses = [m.pause_ms for m in ev.moves if m.pause_ms is not None]
            runs.append({"from": src, "to": dst, "parallel": ev.parallel, **s,
                         "pauses_ms": pauses})
            progress(f"evacuation #{i + 1} {src} -> {dst}: {s['completed']}/{guests} in "
                     f"{s['wall_ms']:.0f} ms, max pause {s['max_pause_ms']} ms")
            if ev.exit_code:
                break
            src, dst = dst, src
    finally:
        for n in names:
            await host.stop_guest(n, missing_ok=True)
    walls = [r["wall_ms"] for r in runs]
    every = [p for r in runs for p in r["pauses_ms"]]
    return {"method": "evacuate", "memory_bytes": size, "guests": guests,
            "wall_ms": summarize(walls), "pause_ms": summarize(every),
            "all_completed": all(r["failed"] == 0 for r in runs), "runs": runs}
