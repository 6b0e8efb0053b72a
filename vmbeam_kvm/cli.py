"""The ``vmbeam-kvm`` command line.

Every command takes ``--json`` (one JSON document on stdout); human progress goes to stderr.
Exit codes: 0 success, 2 bad input (nothing changed), 3 migration failed and the source guest
runs again, 4 unsafe state needing action, 1 any other failure.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from .bench import bench_flat, markdown_table, plot
from .config import Accel, Settings
from .errors import BadInputError, VmbeamError
from .host import Host
from .migration import MigrationMode, MigrationOptions
from .units import format_size, parse_size

P = ParamSpec("P")
T = TypeVar("T")


def _progress(msg: str) -> None:
    click.echo(f"vmbeam-kvm: {msg}", err=True)


def _emit(as_json: bool, data: Any, human: str) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(human)


def command(fn: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async command; map vmbeam errors to their exit codes and clear messages."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            asyncio.run(fn(*args, **kwargs))
        except VmbeamError as exc:
            if kwargs.get("as_json"):
                click.echo(json.dumps({"error": str(exc), "error_type": type(exc).__name__,
                                       "exit_code": exc.exit_code}))
            click.echo(f"vmbeam-kvm: error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def _settings(ctx: click.Context) -> Settings:
    obj: Settings = ctx.obj
    return obj


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


@click.group()
@click.option("--state-dir", type=click.Path(path_type=Path), envvar="VMBEAM_STATE_DIR",
              help="State directory (default /var/lib/vmbeam-kvm).")
@click.option("--accel", type=click.Choice([a.value for a in Accel]), envvar="VMBEAM_ACCEL",
              help="Accelerator for new guests: auto probes KVM, else TCG.")
@click.option("-v", "--verbose", is_flag=True, help="Log QMP traffic details.")
@click.pass_context
def main(ctx: click.Context, state_dir: Path | None, accel: str | None, verbose: bool) -> None:
    """vmbeam-kvm: move running guests between co-located VMs without copying their RAM."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.CRITICAL)
    settings = Settings()
    if state_dir is not None:
        settings = replace(settings, state_dir=state_dir)
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
@click.option("--image", type=click.Choice(["test", "linux"]), default="test", show_default=True)
@click.option("--touch", default="70%", show_default=True,
              help="Share of RAM the guest fills and keeps mutating.")
@click.option("--qemu", help="QEMU binary (default qemu-system-x86_64).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait for the guest's first heartbeat.")
@json_option
@click.pass_context
@command
async def guest_start(ctx: click.Context, name: str, memory: str, image: str, touch: str,
                      qemu: str | None, wait: bool, as_json: bool) -> None:
    """Start guest NAME with its RAM in a new beam region."""
    async with Host(_settings(ctx)) as host:
        _progress(f"starting guest {name} ({memory}, image {image}, touch {touch})")
        g = await host.start_guest(name, memory, image=image, touch=touch, qemu=qemu)
        if wait:
            timeout = 120 + 30 * parse_size(memory) / (1 << 30) + (240 if image == "linux"
                                                                   else 0)
            try:
                await g.wait_ready(timeout=timeout)
            except VmbeamError:
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
             f"  memory {format_size(s.memory_bytes)}, image {s.image}, touch "
             f"{s.touch_percent}%, accel {s.accel}, region {s.region_id or '-'}\n"
             f"  heartbeat {'seq ' + str(hb.seq) + ', round ' + str(hb.round) if hb else '-'}"
             f", memory verdict {verdict}")
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


# ------------------------------------------------------------------------------- migrate
@main.command()
@click.argument("name")
@click.option("--local", is_flag=True, help="Move to a new QEMU process on this host.")
@click.option("--mode", type=click.Choice([m.value for m in MigrationMode]),
              default=MigrationMode.ZERO_COPY.value, show_default=True)
@click.option("--qemu", help="QEMU binary for the destination (live update).")
@click.option("--timeout", type=float, help="Seconds allowed before the switch.")
@json_option
@click.pass_context
@command
async def migrate(ctx: click.Context, name: str, local: bool, mode: str, qemu: str | None,
                  timeout: float | None, as_json: bool) -> None:
    """Migrate guest NAME without copying its RAM (or by precopy)."""
    if not local:
        raise BadInputError("say where to: --local (a new QEMU process on this host)")
    async with Host(_settings(ctx)) as host:
        _progress(f"migrating {name} ({mode}) to a new local QEMU")
        res = await host.migrate(name, MigrationOptions(mode=MigrationMode(mode), qemu=qemu,
                                                        timeout=timeout))
    ratio = "n/a" if res.shared_frames_ratio is None else f"{res.shared_frames_ratio:.4f}"
    _emit(as_json, res.to_json(),
          f"{name}: {res.mode} migration {res.status} in {res.total_ms:.1f} ms (downtime "
          f"{res.downtime_ms} ms), {res.ram_transferred_bytes} bytes of RAM sent, shared "
          f"frames {ratio}, guest ok: {res.guest_ok}")


# --------------------------------------------------------------------------------- bench
@main.group()
def bench() -> None:
    """Benchmarks."""


@bench.command("flat")
@click.option("--sizes", default="1G,4G,8G", show_default=True)
@click.option("--repeat", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--touch", default="70%", show_default=True)
@click.option("--methods", default=",".join(m.value for m in MigrationMode), show_default=True)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path))
@json_option
@click.pass_context
@command
async def bench_flat_cmd(ctx: click.Context, sizes: str, repeat: int, touch: str, methods: str,
                         plot_path: Path | None, as_json: bool) -> None:
    """Zero-copy vs precopy vs cpr-transfer on this host, per guest size."""
    from .units import parse_percent
    size_list = [parse_size(s) for s in sizes.split(",") if s.strip()]
    try:
        modes = [MigrationMode(m.strip()) for m in methods.split(",") if m.strip()]
    except ValueError as exc:
        raise BadInputError(f"unknown method in {methods!r}") from exc
    async with Host(_settings(ctx)) as host:
        rows = await bench_flat(host, size_list, repeat=repeat, touch=parse_percent(touch),
                                methods=modes, progress=_progress)
    if plot_path is not None:
        plot(rows, plot_path)
        _progress(f"plot written to {plot_path}")
    _emit(as_json, [r.to_json() for r in rows], markdown_table(rows))
    if as_json:
        click.echo(markdown_table(rows), err=True)


if __name__ == "__main__":
    main()
