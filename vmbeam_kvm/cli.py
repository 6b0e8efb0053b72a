"""The ``vmbeam-kvm`` command line.

Every command takes ``--json`` (one JSON document on stdout); human progress goes to stderr.
Exit codes: 0 success, 2 bad input (nothing changed), 3 migration failed and the source guest
runs again, 4 unsafe state needing action, 1 any other failure, 130 / 143 interrupted by
SIGINT / SIGTERM (what the command made is undone first).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar

import click

from .bench import METHODS, PREFAULT, TAIL_WINDOW, bench_flat, markdown_table, plot
from .checks import check_cpus, check_free_space, check_movable
from .cloudvm import CLOUD_VM_CPUS, ROOT_PORTS
from .config import Accel, Settings
from .errors import (
    BadInputError,
    CommandInterrupted,
    LaunchError,
    SettleRefusedError,
    VmbeamError,
)
from .host import CLOUD_VM_NAME_MAX, Host, check_guest_memory, check_huge_pages, check_tail_window
from .migrate.model import MigrationMode, MigrationOptions, ProgressEvent
from .seed import read_user_data
from .units import check_name, format_size, parse_percent, parse_size

P = ParamSpec("P")
T = TypeVar("T")


def _progress(msg: str) -> None:
    click.echo(f"vmbeam-kvm: {msg}", err=True)


class _MoveProgress:
    """Renders a move's progress events on stderr, like ``virsh migrate --verbose``: each
    phase with its time, and a progress bar while precopy streams RAM."""

    def __init__(self) -> None:
        self._phase: str | None = None
        self._bar = False
        self._tty = sys.stderr.isatty()
        self._last_bar = 0.0

    def __call__(self, ev: ProgressEvent) -> None:
        if ev.kind == "phase":
            self._end_bar()
            if self._phase is not None and ev.last_phase_ms is not None:
                click.echo(f"vmbeam-kvm:   {self._phase:<9} {ev.last_phase_ms:10.1f} ms",
                           err=True)
            self._phase = None if ev.phase == "done" else ev.phase
        elif ev.kind == "ram" and ev.ram_total:
            if not self._tty and ev.elapsed_ms - self._last_bar < 1000:
                return
            self._last_bar = ev.elapsed_ms
            done = max(0, min(ev.ram_total, ev.ram_total - ev.ram_remaining))
            pct = 100 * done // ev.ram_total
            bar = "#" * (pct // 4)
            est = ("" if ev.expected_downtime_ms is None
                   else f", expected downtime {ev.expected_downtime_ms} ms")
            line = (f"vmbeam-kvm: RAM [{bar:<25}] {pct:3d} %  {ev.ram_transferred >> 20} MiB "
                    f"sent, {ev.ram_remaining >> 20} MiB left, dirty {ev.dirty_rate} pages/s"
                    f"{est}")
            if self._tty:
                click.echo("\r" + line, err=True, nl=False)
                self._bar = True
            else:
                click.echo(line, err=True)

    def _end_bar(self) -> None:
        if self._bar:
            click.echo("", err=True)
            self._bar = False


def _emit(as_json: bool, data: Any, human: str) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(human)


def _fail(message: str, error_type: str, exit_code: int, as_json: bool,
          extra: dict[str, Any] | None = None) -> NoReturn:
    """Report an error the one way scripts can rely on, and exit with its code."""
    if exit_code == BadInputError.exit_code:
        message = " ".join(message.splitlines())  # bad input: one line on stderr, always
    if as_json:
        click.echo(json.dumps({"error": message, "error_type": error_type,
                               "exit_code": exit_code, **(extra or {})}))
    click.echo(f"vmbeam-kvm: error: {message}", err=True)
    sys.exit(exit_code)


async def _interruptible(coro: Coroutine[Any, Any, None]) -> None:
    """Run a command's coroutine so that SIGINT and SIGTERM cancel it: its ``finally`` and
    ``except BaseException`` cleanups run (Python runs none on a default SIGTERM, and
    asyncio's own SIGINT handler raises KeyboardInterrupt on the second Ctrl-C, wherever
    the cleanup is). The first signal cancels; later ones only say that cleanup goes on.
    Raises :class:`CommandInterrupted` once the command has unwound."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    owner = os.getpid()
    got: list[int] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if not got:
            got.append(signum)
            _progress(f"{name}: interrupted, cleaning up")
            task.cancel()
        else:
            _progress(f"{name}: still cleaning up (what the command made is being undone)")

    def handler(signum: int, _frame: object) -> None:
        if os.getpid() != owner:
            # A forked child that inherited this handler (pyroute2 forks helpers into the
            # lab namespace and SIGTERMs them when done): it dies as it would have.
            # Not loop.add_signal_handler: its wakeup fd is shared with such children,
            # whose signals then reached this loop as if they were this command's.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        loop.call_soon_threadsafe(on_signal, signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        await coro
    except asyncio.CancelledError:
        if not got:
            raise
        raise CommandInterrupted(f"interrupted by {signal.Signals(got[0]).name}",
                                 signum=got[0]) from None
    finally:
        for signum, old in previous.items():
            # Interrupted, the command exits 130/143 next: a later Ctrl-C (the terminal's
            # second one) must not turn that into death by signal on the way out.
            signal.signal(signum, signal.SIG_IGN if got else old)


def command(fn: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async command; map vmbeam errors to their exit codes and clear messages."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            asyncio.run(_interruptible(fn(*args, **kwargs)))
        except VmbeamError as exc:
            # A refused settle says how it saw each end (scripts decide on these).
            extra = ({"source": exc.source, "destination": exc.destination}
                     if isinstance(exc, SettleRefusedError) else None)
            _fail(str(exc), type(exc).__name__, exc.exit_code, bool(kwargs.get("as_json")),
                  extra)

    return wrapper


class _Cli(click.Group):
    """The top-level group. click's own usage errors, and errors raised before a command
    runs (e.g. settings from the environment), are reported like every other error: one
    line on stderr, their exit code (2 for usage), a JSON document with ``--json``."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        argv = [str(a) for a in (args[0] if args and args[0] is not None
                                 else kwargs.get("args") or sys.argv[1:])]
        as_json = "--json" in (argv[:argv.index("--")] if "--" in argv else argv)
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # click >= 8.2: help, not an error
                exc.show()
                sys.exit(exc.exit_code)
            msg = exc.format_message()
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                msg += f" (see {exc.ctx.command_path} --help)"
            _fail(msg, type(exc).__name__, exc.exit_code, as_json)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except VmbeamError as exc:
            _fail(str(exc), type(exc).__name__, exc.exit_code, as_json)
        if isinstance(rv, int) and not isinstance(rv, bool) and rv:
            sys.exit(rv)  # ctx.exit(code) comes back as a return value in this mode
        return rv


def _settings(ctx: click.Context) -> Settings:
    obj: Settings = ctx.obj
    return obj


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


@click.group(cls=_Cli)
@click.option("--state-dir", envvar="VMBEAM_STATE_DIR",
              help="State directory (default /var/lib/vmbeam-kvm).")
@click.option("--accel", type=click.Choice([a.value for a in Accel]), envvar="VMBEAM_ACCEL",
              help="Accelerator for new guests: auto probes KVM, else TCG.")
@click.option("-v", "--verbose", is_flag=True, help="Log QMP traffic details.")
@click.pass_context
def main(ctx: click.Context, state_dir: str | None, accel: str | None, verbose: bool) -> None:
    """vmbeam-kvm: move running guests between co-located VMs without copying their RAM."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.CRITICAL)
    ctx.meta["vmbeam.verbose"] = verbose
    if state_dir == "":
        # Path("") is the current directory: never what an empty value means.
        raise BadInputError("--state-dir is empty")
    settings = Settings()
    if state_dir is not None:
        settings = replace(settings, state_dir=Path(state_dir))
    if accel is not None:
        settings = replace(settings, accel=Accel(accel))
    ctx.obj = settings


# --------------------------------------------------------------------------------- guest
@main.group()
def guest() -> None:
    """Start, list, inspect and stop guests."""


@guest.command("start")
@click.argument("name")
@click.option("--memory", required=True, help="Guest RAM, e.g. 256M or 1G.")
@click.option("--image", type=click.Choice(["test", "linux", "disk"]),
              help="What boots: the test guest, the Linux test guest, or the first --disk "
              "through firmware (default: disk with --disk, else test).")
@click.option("--touch", default="70%", show_default=True,
              help="Share of RAM the guest fills and keeps mutating.")
@click.option("--qemu", help="QEMU binary (default qemu-system-x86_64).")
@click.option("--cloud-vm", "cloud_vm", help="Run the guest inside this cloud VM (L1).")
@click.option("--net/--no-net", default=None,
              help="NIC on the lab network (cloud VMs; default: for Linux guests).")
@click.option("--hugepages", is_flag=True,
              help="Back the guest's region with the host's reserved huge pages.")
@click.option("--cpus", type=click.IntRange(1, 64), default=1, show_default=True,
              help="vCPUs of the guest (either topology).")
@click.option("--disk", "disks", multiple=True, metavar="PATH",
              help="A qcow2 or raw file on this host as a virtio disk (repeatable); the guest "
              "writes a qcow2 overlay in its state dir, the file stays unchanged; in a cloud VM "
              "it is a beam disk (README).")
@click.option("--disk-in-place", is_flag=True,
              help="The guest writes its --disk files themselves (no overlay).")
@click.option("--cloud-init", "cloud_init", metavar="USER-DATA",
              help="A user-data file for the guest's own OS (cloud-init): given as a NoCloud "
              "seed disk, its last, with meta-data naming the guest and (with a NIC) its "
              "lab address.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait for the guest's first heartbeat (test and linux images; a guest "
              "booted from its disk is running once its QEMU runs).")
@json_option
@click.pass_context
@command
async def guest_start(ctx: click.Context, name: str, memory: str, image: str | None,
                      touch: str,
                      qemu: str | None, cloud_vm: str | None, net: bool | None,
                      hugepages: bool, cpus: int, disks: tuple[str, ...], disk_in_place: bool,
                      cloud_init: str | None, wait: bool, as_json: bool) -> None:
    """Start guest NAME with its RAM in a new beam region."""
    # What needs no store is refused before the state directory is touched.
    check_name(name)
    check_guest_memory(memory, in_cloud_vm=cloud_vm is not None)
    parse_percent(touch)
    async with Host(_settings(ctx)) as host:
        _, _, img = host.check_new_guest(name, memory, image=image, touch=touch, qemu=qemu,
                                         cloud_vm=cloud_vm, hugepages=hugepages, cpus=cpus,
                                         disks=disks, disk_in_place=disk_in_place,
                                         cloud_init=cloud_init)
        image, wait = img.value, wait and img.heartbeats
        where = f" in cloud VM {cloud_vm}" if cloud_vm else ""
        _progress(f"starting guest {name}{where} ({memory}, {cpus} vCPU"
                  f"{'s' if cpus > 1 else ''}, image {image}"
                  + (f", touch {touch})" if img.heartbeats else ")"))
        if cloud_vm:
            rec = await host.cloud.start_guest(
                name, cloud_vm, memory, image=image, touch=touch, net=net, cpus=cpus,
                disks=host.check_disks(disks, in_place=disk_in_place, beam=True),
                disk_in_place=disk_in_place,
                user_data=None if cloud_init is None else read_user_data(cloud_init))
            try:
                if wait and await host.cloud.wait_heartbeat(rec, timeout=1200) is None:
                    raise LaunchError(f"guest {name!r} sent no heartbeat in {cloud_vm}")
            except BaseException:  # also interrupted: a start that did not finish is undone
                await host.stop_guest(name)
                raise
            st = await host.status(name)
            _emit(as_json, st.to_json(), f"guest {name} running in {cloud_vm}")
            return
        g = await host.start_guest(name, memory, image=image, touch=touch, qemu=qemu,
                                   hugepages=hugepages, cpus=cpus, disks=disks,
                                   disk_in_place=disk_in_place, cloud_init=cloud_init)
        if wait:
            timeout = 120 + 30 * parse_size(memory) / (1 << 30) + (240 if image == "linux"
                                                                   else 0)
            try:
                await g.wait_ready(timeout=timeout)
            except BaseException:  # also interrupted: a start that did not finish is undone
                await host.stop_guest(name)
                raise
        st = await host.status(name)
        _emit(as_json, st.to_json(), f"guest {name} running (pid {st.pid}, {st.accel})")


@guest.command("list")
@json_option
@click.pass_context
@command
async def guest_list(ctx: click.Context, as_json: bool) -> None:
    """List guests."""
    async with Host(_settings(ctx)) as host:
        sts = [await host.status(r.name) for r in host.guests()]
    lines = [f"{'NAME':16} {'STATE':12} {'MEMORY':>7} {'IMAGE':6} {'PID':>7} {'HB':>6} MEM-OK"]
    for s in sts:
        hb = s.heartbeat.seq if s.heartbeat else "-"
        lines.append(f"{s.name:16} {s.state:12} {format_size(s.memory_bytes):>7} {s.image:6} "
                     f"{s.pid:>7} {hb:>6} {s.memory_ok}")
    _emit(as_json, [s.to_json() for s in sts], "\n".join(lines))


@guest.command("status")
@click.argument("name")
@json_option
@click.pass_context
@command
async def guest_status(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show a guest's state, heartbeat and memory verdict."""
    async with Host(_settings(ctx)) as host:
        s = await host.status(name)
    hb = s.heartbeat
    verdict = "unknown" if s.memory_ok is None else ("good" if s.memory_ok else "CORRUPT")
    human = (f"guest {s.name}: {s.state} (QEMU pid {s.pid}, {s.run_state or 'not running'})\n"
             f"  memory {format_size(s.memory_bytes)}, {s.cpus} vCPU(s), image {s.image}, touch "
             f"{s.touch_percent}%, accel {s.accel}, region {s.region_id or '-'}\n"
             f"  heartbeat {'seq ' + str(hb.seq) + ', round ' + str(hb.round) if hb else '-'}"
             f", memory verdict {verdict}"
             + "".join(f"\n  {d['id']} ({d['serial']}): {d['path']} {d['format']}, {d['mode']}"
                       + (f" over {d['backing']}" if d["backing"] else "")
                       + (f", disk workload at record {s.disk_acks[d['serial']]}"
                          if d["serial"] in s.disk_acks else "") for d in s.disks))
    _emit(as_json, s.to_json(), human)


@guest.command("stop")
@click.argument("name")
@json_option
@click.pass_context
@command
async def guest_stop(ctx: click.Context, name: str, as_json: bool) -> None:
    """Stop a guest and release its region."""
    async with Host(_settings(ctx)) as host:
        await host.stop_guest(name)
    _emit(as_json, {"guest": name, "status": "stopped"}, f"guest {name} stopped")


@guest.command("settle")
@click.argument("name")
@json_option
@click.pass_context
@command
async def guest_settle(ctx: click.Context, name: str, as_json: bool) -> None:
    """Settle a needs-action or unreachable guest: keep the one copy that runs with a good
    memory verdict, stop the other, release what it held; it is movable again.

    Exit 4 (nothing changed, both ends' state in the message) where it cannot tell which
    copy to keep; exit 2 for a guest in a state that needs no settling."""
    async with Host(_settings(ctx)) as host:
        res = await host.settle_guest(name)
    where = f"in cloud VM {res.cloud_vm}" if res.cloud_vm else f"QEMU pid {res.pid}"
    _emit(as_json, res.to_json(),
          f"guest {name} settled: {res.kept} kept, running {where} (was {res.previous_state}"
          f"; source {res.source}, destination {res.destination})")


# ------------------------------------------------------------------------------- migrate
@main.command()
@click.argument("name")
@click.option("--local", is_flag=True, help="Move to a new QEMU process on this host.")
@click.option("--to", "to", help="Move into this co-located cloud VM (L1).")
@click.option("--mode", type=click.Choice([m.value for m in MigrationMode]),
              default="auto", show_default=True,
              help="auto: zero-copy where the memory can be shared (a guest on this host, "
              "or between cloud VMs of this host; cpr-transfer for a memfd guest), else "
              "precopy; --json says why (mode_reason).")
@click.option("--qemu", help="QEMU binary for the destination (live update).")
@click.option("--timeout", type=float, help="Seconds allowed before the switch (--local).")
@click.option("--prefault", is_flag=True,
              help="Zero-copy on this host: the destination maps all of the guest's memory "
              "before the switch (contents untouched; untouched pages get allocated).")
@click.option("--tail-window", type=click.FloatRange(0, 10), default=0.0,
              show_default=True, help="Seconds of the guest's work rate to compare before "
              "the move and right after the switch (post_switch_slowdown); 0: pause only.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show progress on stderr even with --json (phases, RAM streamed).")
@json_option
@click.pass_context
@command
async def migrate(ctx: click.Context, name: str, local: bool, to: str | None, mode: str,
                  qemu: str | None, timeout: float | None, prefault: bool, tail_window: float,
                  verbose: bool, as_json: bool) -> None:
    """Migrate guest NAME without copying its RAM (or by precopy).

    Progress goes to stderr: each phase with its time, and a bar while precopy streams
    RAM (quiet with --json unless -v)."""
    show = verbose or bool(ctx.meta.get("vmbeam.verbose")) or not as_json
    progress = _MoveProgress() if show else None
    if local == (to is not None):
        raise BadInputError("say where to: --local (a new QEMU process on this host) or "
                            "--to CLOUD_VM")
    if to is not None and (qemu is not None or timeout is not None or prefault):
        raise BadInputError("--qemu, --timeout and --prefault apply to --local migrations "
                            "only")
    if to is not None and mode == MigrationMode.CPR_TRANSFER.value:
        raise BadInputError("cpr-transfer is a local-only mode")
    async with Host(_settings(ctx)) as host:
        # Unknown guests and cloud VMs are refused before any lock file or journal entry.
        rec = host.store.get_guest(name)
        if to is not None:
            if not rec.cloud_vm:
                raise BadInputError(f"guest {name!r} runs on this host, not in a cloud VM: "
                                    f"use --local")
            check_movable(rec)
            host.cloud.running_vm(rec.cloud_vm)
            if host.cloud.running_vm(to).name == rec.cloud_vm:
                raise BadInputError(f"guest {name!r} already runs in {to!r}")
            # A cross-tenant request is refused (and logged) by the migration itself.
            if host.cloud.vm(to).tenant == rec.tenant:
                _progress(f"migrating {name} ({mode}) to cloud VM {to}")
            nopts = MigrationOptions(mode=MigrationMode(mode), progress=progress,
                                     tail_window=tail_window)
            nres = await host.cloud.migrate(name, to, options=nopts)
            _emit(as_json, nres.to_json(),
                  f"{name}: {nres.mode} {nres.source_cloud_vm} -> {nres.dest_cloud_vm} in "
                  f"{nres.total_ms:.1f} ms (downtime {nres.downtime_ms} ms, the guest "
                  f"saw {_ms(nres.pause_ms)}), "
                  f"{nres.ram_transferred_bytes} bytes of RAM sent, source detached: "
                  f"{nres.source_detached}, guest ok: {nres.guest_ok}")
            return
        opts = MigrationOptions(mode=MigrationMode(mode), qemu=qemu, timeout=timeout,
                                progress=progress, tail_window=tail_window, prefault=prefault)
        host.check_migration(name, opts)
        _progress(f"migrating {name} ({mode}) to a new local QEMU")
        res = await host.migrate(name, opts)
    ratio = "n/a" if res.shared_frames_ratio is None else f"{res.shared_frames_ratio:.4f}"
    _emit(as_json, res.to_json(),
          f"{name}: {res.mode} migration {res.status} in {res.total_ms:.1f} ms (downtime "
          f"{res.downtime_ms} ms, the guest saw {_ms(res.pause_ms)}), "
          f"{res.ram_transferred_bytes} bytes of RAM sent, shared "
          f"frames {ratio}, guest ok: {res.guest_ok}")


def _ms(pause: float | None) -> str:
    return "no ticks" if pause is None else f"{pause:.1f} ms"


# ------------------------------------------------------------------------------ cloud VMs
@main.group("cloud-vm")
def cloud_vm() -> None:
    """Cloud VMs (L1) on this host, each rented by one tenant."""


@cloud_vm.command("start")
@click.argument("name")
@click.option("--tenant", required=True)
@click.option("--memory", default="2G", show_default=True)
@click.option("--cpus", type=click.IntRange(1, 64), default=CLOUD_VM_CPUS, show_default=True)
@json_option
@click.pass_context
@command
async def cloud_vm_start(ctx: click.Context, name: str, tenant: str, memory: str, cpus: int,
                         as_json: bool) -> None:
    """Boot cloud VM NAME on the lab network and wait for its agent."""
    from .lab import lab_network
    settings = _settings(ctx)
    check_name(name, "cloud VM name", CLOUD_VM_NAME_MAX)
    settings.check_lab()
    lab = lab_network(settings)
    async with Host(settings) as host:
        host.validate_new_cloud_vm(name, tenant, memory, cpus, lab)
        _progress(f"booting cloud VM {name} (tenant {tenant}, {memory}, {cpus} CPUs)")
        rec = await host.start_cloud_vm(name, tenant, memory, cpus, lab=lab)
    _emit(as_json, _cvm_json(rec), f"cloud VM {name} running (pid {rec.pid}, {rec.ip})")


def _cvm_json(rec: Any) -> dict[str, Any]:
    return {"name": rec.name, "tenant": rec.tenant, "state": rec.state.value,
            "memory_bytes": rec.memory, "cpus": rec.cpus, "pid": rec.pid, "ip": rec.ip,
            "accel": rec.accel or None, "regions": rec.regions(),
            "disks": sorted(a["path"] for a in rec.disks().values()),
            "namespace": rec.lab, "tap": rec.tap}


@cloud_vm.command("list")
@json_option
@click.pass_context
@command
async def cloud_vm_list(ctx: click.Context, as_json: bool) -> None:
    """List cloud VMs."""
    async with Host(_settings(ctx)) as host:
        vms = [_cvm_json(r) for r in host.store.cloud_vms()]
    lines = [f"{'NAME':12} {'TENANT':10} {'STATE':9} {'IP':16} REGIONS"]
    lines += [f"{v['name']:12} {v['tenant']:10} {v['state']:9} {v['ip']:16} "
              f"{len(v['regions'])}" for v in vms]
    _emit(as_json, vms, "\n".join(lines))


@cloud_vm.command("stop")
@click.argument("name")
@json_option
@click.pass_context
@command
async def cloud_vm_stop(ctx: click.Context, name: str, as_json: bool) -> None:
    """Stop cloud VM NAME, its guests and their regions."""
    async with Host(_settings(ctx)) as host:
        await host.cloud.stop_cloud_vm(name)
    _emit(as_json, {"name": name, "status": "stopped"}, f"cloud VM {name} stopped")


def _cloud_vm_list(value: str | None) -> list[str] | None:
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    for n in names:
        check_name(n, "cloud VM name", CLOUD_VM_NAME_MAX)
    return names or None


def _evacuation_lines(ev: Any, verb: str) -> list[str]:
    lines = [f"{verb} {ev.cloud_vm}: {ev.summary()['completed']} of {len(ev.moves)} guests "
             f"moved in {ev.wall_ms:.0f} ms ({ev.parallel} at a time)"]
    for m in ev.moves:
        pause = "" if m.pause_ms is None else f", pause {m.pause_ms:.1f} ms"
        lines.append(f"  {m.guest:16} {m.source_cloud_vm} -> {m.dest_cloud_vm}: {m.status}"
                     f"{pause}{': ' + m.error if m.error else ''}")
    return lines


def _evacuation_command(name: str) -> Callable[[Callable[..., Any]], Any]:
    """The options evacuate and rejuvenate share (NAME, --to, --parallel, --json)."""
    decorators: list[Callable[[Any], Any]] = [
        cloud_vm.command(name), click.argument("name"),
        click.option("--to", "to", help="Destination cloud VMs, comma-separated (default: "
                     "every running cloud VM of the same tenant)."),
        click.option("--parallel", type=click.IntRange(1, 64),
                     help="Moves at once (default: one per host CPU)."),
        json_option, click.pass_context]

    def wrap(fn: Callable[..., Any]) -> Any:
        for deco in reversed(decorators):
            fn = deco(fn)
        return fn
    return wrap


@_evacuation_command("evacuate")
@command
async def cloud_vm_evacuate(ctx: click.Context, name: str, to: str | None,
                            parallel: int | None, as_json: bool) -> None:
    """Move every guest out of cloud VM NAME, zero-copy, several at once.

    A guest whose move fails rolls back alone; the exit code is the worst guest's."""
    check_name(name, "cloud VM name", CLOUD_VM_NAME_MAX)
    dests = _cloud_vm_list(to)
    async with Host(_settings(ctx)) as host:
        ev = await host.evacuate(name, dests, parallel=parallel,
                                 progress=lambda msg: _progress(f"evacuate: {msg}"))
    _emit(as_json, ev.to_json(), "\n".join(_evacuation_lines(ev, "evacuated")))
    if ev.exit_code:
        sys.exit(ev.exit_code)


@_evacuation_command("rejuvenate")
@command
async def cloud_vm_rejuvenate(ctx: click.Context, name: str, to: str | None,
                              parallel: int | None, as_json: bool) -> None:
    """Evacuate cloud VM NAME, boot it again fresh, and move its guests back."""
    check_name(name, "cloud VM name", CLOUD_VM_NAME_MAX)
    dests = _cloud_vm_list(to)
    async with Host(_settings(ctx)) as host:
        rj = await host.rejuvenate(name, dests, parallel=parallel,
                                   progress=lambda msg: _progress(f"rejuvenate: {msg}"))
    lines = _evacuation_lines(rj.out, "out of")
    if rj.restarted:
        lines.append(f"cloud VM {name} restarted in {rj.restart_ms:.0f} ms")
    else:
        lines.append(f"cloud VM {name} NOT restarted: a guest could not be moved out")
    if rj.back is not None:
        lines += _evacuation_lines(rj.back, "back into")
    _emit(as_json, rj.to_json(), "\n".join(lines))
    if rj.exit_code:
        sys.exit(rj.exit_code)


# ---------------------------------------------------------------------------------- lab
@main.group()
def lab() -> None:
    """The embedded default topology: two cloud VMs of tenant-a, one of tenant-b."""


@lab.command("up")
@json_option
@click.pass_context
@command
async def lab_up(ctx: click.Context, as_json: bool) -> None:
    """Build the lab network and boot its cloud VMs."""
    from .lab import lab_up as do_lab_up
    settings = _settings(ctx)
    settings.check_lab()
    async with Host(settings) as host:
        _progress(f"lab: booting cloud VMs on {settings.lab_subnet} (namespace "
                  f"{settings.lab_namespace})")
        tenants = await do_lab_up(host)
    out: dict[str, Any] = {"cloud_vms": tenants, "network": settings.lab_subnet,
                           "namespace": settings.lab_namespace}
    _emit(as_json, out, "\n".join(f"{t}: {', '.join(n)}" for t, n in tenants.items()))


@lab.command("down")
@json_option
@click.pass_context
@command
async def lab_down(ctx: click.Context, as_json: bool) -> None:
    """Stop every guest and cloud VM, remove the lab network."""
    from .lab import lab_down as do_lab_down
    async with Host(_settings(ctx)) as host:
        removed = await do_lab_down(host)
    _emit(as_json, {"status": "down", "namespaces_removed": removed}, "lab down")


# -------------------------------------------------------------------------------- hosts
@main.group("host")
def host_group() -> None:
    """Other L0 hosts, reached over SSH (key authentication, host key pinned at add)."""


@host_group.command("identity")
@json_option
@click.pass_context
@command
async def host_identity(ctx: click.Context, as_json: bool) -> None:
    """This host's identity (machine id, boot id, state store id)."""
    async with Host(_settings(ctx)) as host:
        ident = host.identity()
    _emit(as_json, ident.to_json(), f"machine {ident.machine_id}, boot {ident.boot_id}, "
                                    f"store {ident.store_id} ({ident.hostname})")


@host_group.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--identity", "identity_file", default="",
              help="Private key ssh offers (default: ssh's own).")
@click.option("--remote-command", default="vmbeam-kvm", show_default=True,
              help="How to run vmbeam-kvm on that host (e.g. with its --state-dir).")
@click.option("--host-key", help="The host's public key (a known_hosts key: TYPE BASE64); "
              "default: pinned from the host on first contact.")
@json_option
@click.pass_context
@command
async def host_add(ctx: click.Context, name: str, url: str, identity_file: str,
                   remote_command: str, host_key: str | None, as_json: bool) -> None:
    """Add host NAME at ssh://[USER@]ADDR[:PORT]: pin its key, ask who it is."""
    from .hosts import SshTarget, check_host_name
    check_host_name(name)
    SshTarget.parse(url)
    async with Host(_settings(ctx)) as host:
        rec = await host.hosts.add(name, url, identity_file=identity_file,
                                   remote_command=remote_command, host_key=host_key)
        here = host.identity()
    out = {"name": rec.name, "url": rec.url, "fingerprint": rec.fingerprint,
           "identity": rec.identity.to_json(), "co_located": rec.identity.same_l0(here)}
    where = ", co-located with this one" if out["co_located"] else ""
    _emit(as_json, out, f"host {rec.name} added ({rec.url}, key {rec.fingerprint}, machine "
                        f"{rec.machine_id}{where})")


@host_group.command("list")
@json_option
@click.pass_context
@command
async def host_list(ctx: click.Context, as_json: bool) -> None:
    """This host and every added host, each asked who it is now."""
    async with Host(_settings(ctx)) as host:
        here = host.identity()
        others = await asyncio.gather(*(host.hosts.status(r, here)
                                        for r in host.store.hosts()))
    out = {"this": here.to_json(), "hosts": list(others)}
    lines = [f"this host: machine {here.machine_id}, store {here.store_id}"]
    lines += [f"{h['name']:12} {h['url']:32} "
              f"{'reachable' if h['reachable'] else 'UNREACHABLE'}"
              f"{', co-located' if h['co_located'] else ''}" for h in others]
    _emit(as_json, out, "\n".join(lines))


@host_group.command("remove")
@click.argument("name")
@json_option
@click.pass_context
@command
async def host_remove(ctx: click.Context, name: str, as_json: bool) -> None:
    """Forget host NAME and its pinned key."""
    async with Host(_settings(ctx)) as host:
        host.hosts.remove(name)
    _emit(as_json, {"name": name, "status": "removed"}, f"host {name} removed")


# ---------------------------------------------------------------------------- accelerator
@main.command("accel")
@click.option("--reprobe", is_flag=True, help="Measure again instead of reading the cache.")
@json_option
@click.pass_context
@command
async def accel_cmd(ctx: click.Context, reprobe: bool, as_json: bool) -> None:
    """Show the accelerator new guests and cloud VMs get, and the measurements behind it.

    `auto` runs the same guest work under TCG and KVM and takes KVM only where it is clearly
    faster; the verdict is cached per kernel, QEMU binary and /dev/kvm flavour."""
    settings = _settings(ctx)
    async with Host(settings) as host:
        _progress("accel: measuring TCG and KVM (about 10 s)" if reprobe else
                  "accel: the cached verdict, or measuring TCG and KVM (about 10 s)")
        guest_accel, cvm_accel, found = await host.accel(reprobe=reprobe)
    probed = found.to_json()
    # guest/cloud_vm: what this setting gives; auto: what the measurement chose.
    out = {"setting": settings.accel.value, "guest": guest_accel, "cloud_vm": cvm_accel,
           "auto": {"guest": probed.pop("guest"), "cloud_vm": probed.pop("cloud_vm")},
           **probed}

    def rates(run: Any) -> str:
        if run is None:
            return "not run"
        if not run["completed"]:
            return f"failed: {run['error']}"
        return (f"ready {run['ready_s']:.2f} s, first touch {run['fill_pages_per_s']:,.0f} "
                f"pages/s, loop {run['work_steps_per_s']:,.0f} steps/s")
    human = (f"guests: {guest_accel}, cloud VMs: {cvm_accel} (--accel {settings.accel.value}; "
             f"/dev/kvm: {found.flavour})\n"
             f"  auto for guests: {found.guest}: {found.reason}\n"
             f"  auto for cloud VMs: {found.cloud_vm}: {found.cloud_vm_reason}\n"
             f"  TCG: {rates(out['tcg'])}\n  KVM: {rates(out['kvm'])}")
    _emit(as_json, out, human)


# ------------------------------------------------------------------------------- regions
@main.group()
def region() -> None:
    """Beam regions."""


@region.command("list")
@json_option
@click.pass_context
@command
async def region_list(ctx: click.Context, as_json: bool) -> None:
    """Every region in a cloud VM: size, tenant, and the cloud VMs it is attached to."""
    async with Host(_settings(ctx)) as host:
        vms = host.store.cloud_vms()
        regions = host.store.regions()
        for r in regions:
            atts = [(v.name, v.attachments.get(r["region_id"])) for v in vms]
            r["attached_to"] = [n for n, a in atts if a is not None and not a.get("revoked")]
            # Revoked from these cloud VMs (no access left); their eject is pending.
            r["ejecting_from"] = [n for n, a in atts if a is not None and a.get("revoked")]
        for g in host.store.guests():
            if not g.cloud_vm and g.region_id:
                regions.append({"region_id": g.region_id, "guest": g.name, "tenant": "",
                                "ram_size": g.memory, "size": g.memory + 4096,
                                "attached_to": [], "host_process": g.pid})
    lines = [f"{'REGION':38} {'GUEST':12} {'TENANT':10} {'SIZE':>7} ATTACHED-TO"]
    lines += [f"{r['region_id']:38} {r['guest']:12} {r['tenant'] or '-':10} "
              f"{format_size(r['ram_size']):>7} {','.join(r['attached_to']) or '-'}"
              for r in regions]
    _emit(as_json, regions, "\n".join(lines))


# --------------------------------------------------------------------------------- bench
@main.group()
def bench() -> None:
    """Benchmarks."""


def _bench_sizes(sizes: str, *, in_cloud_vm: bool) -> list[int]:
    """Every size of ``--sizes``, each checked as a new guest's."""
    size_list = [check_guest_memory(s, in_cloud_vm=in_cloud_vm)
                 for s in sizes.split(",") if s.strip()]
    if not size_list:
        raise BadInputError("--sizes is empty: give e.g. 128M,1G")
    return size_list


def _bench_guests(ctx: click.Context, cpus: str, disk_sizes: str, disk_fill: str
                  ) -> tuple[list[int], list[int], int]:
    """``--cpus``, ``--disk-size`` (0: no disk) and ``--disk-fill``, checked: vCPU counts,
    disk sizes, the percentage of each disk written (the bench writes its data disks into
    the state dir, so the largest fill must fit there)."""
    try:
        cpu_list = [check_cpus(int(c)) for c in cpus.split(",") if c.strip()]
    except ValueError as exc:
        raise BadInputError(f"invalid --cpus {cpus!r}: give e.g. 1,2,4,8") from exc
    disk_list = [parse_size(d.strip()) for d in disk_sizes.split(",") if d.strip()]
    if not cpu_list or not disk_list:
        raise BadInputError("--cpus and --disk-size need at least one value each")
    for d in disk_list:
        if d % (1 << 20):
            raise BadInputError(f"--disk-size {format_size(d)} is no whole number of MiB")
    fill = parse_percent(disk_fill)
    check_free_space(_settings(ctx).state_dir, max(disk_list) * fill // 100,
                     f"--disk-size {format_size(max(disk_list))} at {fill}%")
    return list(dict.fromkeys(cpu_list)), list(dict.fromkeys(disk_list)), fill


def _check_plot_path(path: Path | None) -> None:
    """Refuse a plot that could not be written, before the benchmark rather than after."""
    if path is None:
        return
    if importlib.util.find_spec("matplotlib") is None:
        raise BadInputError("--plot needs matplotlib: pip install 'vmbeam-kvm[plot]'")
    if path.is_dir():
        raise BadInputError(f"--plot {path} is a directory")
    parent = path.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"--plot {path}: {parent} is not a writable directory")


def bench_guest_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options that say which guests a bench moves, beside ``--sizes``."""
    f = click.option("--disk-fill", default="10%", show_default=True,
                     help="How much of each data disk is written before the moves.")(f)
    f = click.option("--disk-size", default="0", show_default=True,
                     help="Data disk sizes, e.g. 0,10G (0: no disk); each a row.")(f)
    return click.option("--cpus", default="1", show_default=True,
                        help="vCPU counts, e.g. 1,2,4,8; each a row.")(f)


@bench.command("flat")
@click.option("--sizes", default="1G,4G,8G", show_default=True)
@click.option("--repeat", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--touch", default="70%", show_default=True)
@click.option("--methods", default=",".join(m.value for m in METHODS), show_default=True)
@click.option("--prefault", is_flag=True,
              help=f"Add a row of zero-copy moves that prefault the destination ({PREFAULT}).")
@click.option("--hugepages", is_flag=True, help="Region guests on the host's huge pages.")
@click.option("--precopy-max", default=None,
              help="Leave precopy out for guests larger than this (e.g. 8G).")
@click.option("--tail-window", type=click.FloatRange(0, 10), default=TAIL_WINDOW,
              show_default=True, help="Seconds of work rate compared (post_switch_slowdown).")
@bench_guest_options
@click.option("--plot", "plot_path", type=click.Path(path_type=Path))
@json_option
@click.pass_context
@command
async def bench_flat_cmd(ctx: click.Context, sizes: str, repeat: int, touch: str, methods: str,
                         prefault: bool, hugepages: bool, precopy_max: str | None,
                         tail_window: float, cpus: str, disk_size: str, disk_fill: str,
                         plot_path: Path | None, as_json: bool) -> None:
    """Zero-copy vs precopy vs cpr-transfer on this host, per guest size, vCPU count and
    disk size."""
    # Every argument is checked before the first guest boots, not after minutes of runs.
    size_list = _bench_sizes(sizes, in_cloud_vm=False)
    pct = parse_percent(touch)
    cpu_list, disk_list, fill = _bench_guests(ctx, cpus, disk_size, disk_fill)
    try:
        modes = [MigrationMode(m.strip()) for m in methods.split(",") if m.strip()]
        if any(m not in METHODS for m in modes):
            raise ValueError("auto is no method to measure")
    except ValueError as exc:
        raise BadInputError(f"unknown method in {methods!r}") from exc
    if not modes:
        raise BadInputError("--methods is empty")
    modes = list(dict.fromkeys(modes))  # one row per method
    check_tail_window(tail_window)
    pre_max = parse_size(precopy_max) if precopy_max is not None else None
    if hugepages:
        for size in size_list:
            check_huge_pages(size)
    _check_plot_path(plot_path)
    async with Host(_settings(ctx)) as host:
        rows = await bench_flat(host, size_list, repeat=repeat, touch=pct, methods=modes,
                                tail_window=tail_window, prefault=prefault,
                                hugepages=hugepages, precopy_max=pre_max, cpus=cpu_list,
                                disk_sizes=disk_list, disk_fill=fill, progress=_progress)
    if plot_path is not None:
        plot(rows, plot_path)
        _progress(f"plot written to {plot_path}")
    _emit(as_json, [r.to_json() for r in rows], markdown_table(rows))
    if as_json:
        click.echo(markdown_table(rows), err=True)


@bench.command("nested")
@click.option("--sizes", default="128M,256M,512M", show_default=True)
@click.option("--repeat", type=click.IntRange(1, 50), default=1, show_default=True)
@click.option("--touch", default="70%", show_default=True)
@click.option("--tail-window", type=click.FloatRange(0, 10), default=TAIL_WINDOW,
              show_default=True, help="Seconds of work rate compared (post_switch_slowdown).")
@click.option("--guests", type=click.IntRange(0, ROOT_PORTS), default=0, show_default=True,
              help="Also evacuate this many guests of the first size at once, there and "
              "back (a row with method 'evacuate').")
@bench_guest_options
@click.option("--plot", "plot_path", type=click.Path(path_type=Path))
@json_option
@click.pass_context
@command
async def bench_nested_cmd(ctx: click.Context, sizes: str, repeat: int, touch: str,
                           tail_window: float, guests: int, cpus: str, disk_size: str,
                           disk_fill: str, plot_path: Path | None, as_json: bool) -> None:
    """Zero-copy vs precopy between two co-located cloud VMs (boots the lab if needed), per
    guest size, vCPU count and (beam) disk size."""
    from .bench import bench_evacuation, bench_nested
    from .lab import DEFAULT_LAB, lab_network, start_cloud_vms
    size_list = _bench_sizes(sizes, in_cloud_vm=True)
    pct = parse_percent(touch)
    cpu_list, disk_list, fill = _bench_guests(ctx, cpus, disk_size, disk_fill)
    check_tail_window(tail_window)
    _check_plot_path(plot_path)
    _settings(ctx).check_lab()
    pair = DEFAULT_LAB["tenant-a"]
    async with Host(_settings(ctx)) as host:
        have = {vm.name for vm in host.store.cloud_vms()}
        started = [n for n in pair if n not in have]
        net = lab_network(_settings(ctx))
        try:
            _progress(f"booting cloud VMs {started}" if started else "using the running lab")
            await start_cloud_vms(host, [("tenant-a", n) for n in started], net)
            rows = await bench_nested(host, size_list, cloud_vms=(pair[0], pair[1]),
                                      repeat=repeat, touch=pct, tail_window=tail_window,
                                      cpus=cpu_list, disk_sizes=disk_list, disk_fill=fill,
                                      progress=_progress)
            evac = None if not guests else await bench_evacuation(
                host, size_list[0], guests, cloud_vms=(pair[0], pair[1]), repeat=repeat,
                touch=pct, progress=_progress)
        finally:
            for n in started:
                with contextlib.suppress(VmbeamError):
                    await host.cloud.stop_cloud_vm(n)
            if started and not host.store.cloud_vms():
                await net.destroy()
    if plot_path is not None:
        plot(rows, plot_path, "vmbeam-kvm: L2 migration between co-located cloud VMs")
    table = markdown_table(rows)
    if evac is not None:
        wall, pause = evac["wall_ms"] or {}, evac["pause_ms"] or {}
        table += (f"\n\nevacuate {evac['guests']} x {format_size(evac['memory_bytes'])}: wall "
                  f"{wall.get('median')} ms (max {wall.get('max')}), pause median "
                  f"{pause.get('median')} ms, max {pause.get('max')} ms, all completed: "
                  f"{evac['all_completed']}")
    _emit(as_json, [r.to_json() for r in rows] + ([evac] if evac else []), table)
    if as_json:
        click.echo(markdown_table(rows), err=True)


if __name__ == "__main__":
    main()
