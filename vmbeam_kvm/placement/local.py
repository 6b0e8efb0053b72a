"""The local placement: guests whose QEMU runs on this host, reached over QMP directly.

Each guest's QEMU instance (the first, then one more per move) has its own QMP socket,
serial log and QEMU log in the guest's directory of the state store; its RAM is a beam
region (a memfd) passed to QEMU as an fd.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from .. import disks
from ..checks import MAX_SOCKET_PATH
from ..errors import BadInputError, QMPCommandError
from ..heartbeat import Heartbeat, SerialStatus, read_status, wait_for_heartbeat
from ..qemu.machine import GuestImage, MachineSpec, RamBackend, build_argv
from ..qemu.process import ProcessRef, QemuProcess, kill_strays
from ..region import BeamRegion
from ..runtime import Runtime
from ..store import GuestRecord, GuestState
from . import GuestStatus


class LocalPlacement:
    """Guests on this host (see module docstring)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.store = rt.store

    def instance_paths(self, name: str, instance: int) -> tuple[Path, Path, Path]:
        """QMP socket, serial log and QEMU log of one QEMU instance of a guest."""
        d = self.store.guest_dir(name)
        qmp = d / f"qmp-{instance}.sock"
        if len(str(qmp)) > MAX_SOCKET_PATH:
            raise BadInputError(f"state directory path too long for a unix socket: {qmp}")
        return qmp, d / f"serial-{instance}.log", d / f"qemu-{instance}.log"

    def spec_of(self, rec: GuestRecord, qemu: str | None = None) -> MachineSpec:
        """The machine a (new) QEMU of ``rec`` runs, with ``qemu`` as its binary if given."""
        s = self.rt.settings
        return MachineSpec(rec.name, rec.memory, GuestImage(rec.image), rec.touch, rec.accel,
                           s.resolve_qemu(qemu or rec.qemu), s.images_dir,
                           RamBackend(rec.backend), cpus=rec.cpus, disks=disks.loads(rec.disks))

    def process(self, rec: GuestRecord) -> QemuProcess:
        """The QEMU process that currently runs ``rec`` (re-attached if needed)."""
        return self.rt.procs.attach(ProcessRef(rec.pid, rec.pid_start), Path(rec.qmp_path),
                                    Path(rec.log_path))

    async def start(self, rec: GuestRecord, spec: MachineSpec, *, huge: bool = False) -> None:
        """Launch the guest's first QEMU (on a new beam region, of huge pages if ``huge``,
        unless ``spec`` says memfd) and record it running; raises LaunchError when QEMU
        does not come up."""
        qmp, serial, qlog = self.instance_paths(rec.name, 0)
        # The name was free until this command reserved it: a QEMU still running in its
        # directory was orphaned by an earlier command that died (SIGKILL) mid-start.
        kill_strays(self.store.guest_dir(rec.name))

        def spawned(proc: QemuProcess) -> None:
            # Recorded (still ``starting``) before anything is awaited: whatever interrupts
            # the start from here, `guest stop` finds this very QEMU.
            self.rt.procs.adopt(proc)
            rec.pid, rec.pid_start = proc.ref.pid, proc.ref.start_time
            rec.qmp_path, rec.serial_path, rec.log_path = str(qmp), str(serial), str(qlog)
            self.store.update_guest(rec)

        if spec.backend is RamBackend.REGION:
            with BeamRegion.create(spec.memory, rec.name, huge=huge) as region:
                argv = build_argv(spec, qmp_path=qmp, serial_path=serial, ram_fd=region.fd)
                rec.region_id = region.region_id
                await QemuProcess.launch(argv, qmp, qlog, pass_fds=[region.fd],
                                         on_spawn=spawned)
        else:
            argv = build_argv(spec, qmp_path=qmp, serial_path=serial)
            await QemuProcess.launch(argv, qmp, qlog, on_spawn=spawned)
        rec.state = GuestState.RUNNING
        self.store.update_guest(rec)

    async def stop(self, rec: GuestRecord) -> None:
        with self.store.lock_guest(rec.name):
            if rec.pid:
                proc = self.process(rec)
                await proc.quit()
                self.rt.procs.forget(proc)
            # Any other QEMU of this guest (a start or a move that was interrupted before
            # its pid was recorded) is found by its pidfile, not by the record.
            kill_strays(self.store.guest_dir(rec.name))
            self.store.remove_guest(rec.name)
            shutil.rmtree(self.store.state_dir / "guests" / rec.name, ignore_errors=True)

    async def status(self, rec: GuestRecord, *, busy: bool = False) -> GuestStatus:
        proc = self.process(rec) if rec.pid else None
        alive = proc is not None and proc.alive()
        if not alive and rec.state is GuestState.RUNNING and not busy:
            # Died behind our back: record it rather than pretend.
            rec.state = GuestState.LOST
            self.store.update_guest(rec)
        run_state = None
        if alive and proc is not None and not busy:
            with contextlib.suppress(QMPCommandError):
                run_state = await proc.run_state()
        # A record still starting has no serial log yet (Path("") would be the cwd).
        serial = (read_status(Path(rec.serial_path)) if rec.serial_path
                  else SerialStatus(False, False, None))
        hb = serial.heartbeat
        return GuestStatus(
            name=rec.name, state=rec.state.value, image=rec.image, memory_bytes=rec.memory,
            touch_percent=rec.touch, accel=rec.accel, pid=rec.pid, alive=alive,
            run_state=run_state, booted=serial.booted, ready=serial.ready, heartbeat=hb,
            memory_ok=None if hb is None else hb.ok, region_id=rec.region_id,
            instance=rec.instance, serial_log=rec.serial_path, busy=busy, cpus=rec.cpus,
            disks=[d.to_json() for d in disks.loads(rec.disks)], disk_acks=serial.disk_acks)

    async def qmp(self, rec: GuestRecord, cmd: str, args: dict[str, Any] | None = None
                  ) -> Any:
        return await self.process(rec).execute(cmd, args)

    async def heartbeat(self, rec: GuestRecord) -> Heartbeat | None:
        return read_status(Path(rec.serial_path)).heartbeat if rec.serial_path else None

    async def wait_heartbeat(self, rec: GuestRecord, after_seq: int = -1,
                             timeout: float = 120.0) -> Heartbeat | None:
        return await wait_for_heartbeat(Path(rec.serial_path), after_seq=after_seq,
                                        timeout=timeout)
