"""A QEMU process and its QMP session.

A :class:`QemuProcess` is either launched by us or re-attached to by pid (guests outlive the
command that started them). A process is identified by pid *and* start time, so a recycled pid
is never mistaken for the guest. QMP goes through ``qemu.qmp``; its errors become
:class:`~vmbeam_kvm.errors.QMPCommandError`.

Every QEMU launched here writes a pidfile (QEMU's own ``-pidfile``, beside its QMP socket), so
that a QEMU whose pid never reached the store — its command was interrupted, or a restart
replaced it — is still found by what it is (:func:`find_qemus`): a process whose command line
names a pidfile in that directory. A recycled pid never matches, its command line differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from ..errors import LaunchError, QMPCommandError


@dataclass(frozen=True)
class ProcessRef:
    """A process identity that survives pid reuse: pid plus kernel start time."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        return cls(pid, _start_time(pid))

    def _state(self) -> str:
        """The very process's state letter in /proc (R, S, T, Z...); "" when it is gone
        or its pid was recycled."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                stat = f.read()
        except OSError:
            return ""
        fields = stat[stat.rindex(")") + 2:].split()
        return fields[0] if int(fields[19]) == self.start_time else ""

    def alive(self) -> bool:
        """True while the very process is running (not a zombie, not a recycled pid)."""
        return self._state() not in ("", "Z", "X")

    def stopped(self) -> bool:
        """True while the very process is stopped by a signal (SIGSTOP, a tracer): it
        answers nothing, QMP included, until it is continued."""
        return self._state() in ("T", "t")


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError as exc:
        raise LaunchError(f"process {pid} is gone") from exc
    return int(stat[stat.rindex(")") + 2:].split()[19])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_memory_bytes(pids: list[int]) -> int:
    """Host memory held by a group of QEMU processes, shared memory counted once.

    Private and file-backed pages come from each process's PSS; guest RAM in a memfd is
    counted by the memfd's allocated size, once per memfd, whether or not a process has the
    pages mapped right now (a freshly migrated QEMU maps only what its guest touched since).
    """
    total = 0
    memfds: dict[int, int] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(("Pss_Anon:", "Pss_File:")):
                        total += int(line.split()[1]) * 1024
            for fd in os.listdir(f"/proc/{pid}/fd"):
                path = f"/proc/{pid}/fd/{fd}"
                with contextlib.suppress(OSError):
                    if os.readlink(path).startswith("/memfd:"):
                        st = os.stat(path)
                        memfds[st.st_ino] = st.st_blocks * 512
        except OSError:
            continue  # the process exited meanwhile
    return total + sum(memfds.values())


def pidfile_for(qmp_path: Path) -> Path:
    """The pidfile of the QEMU whose QMP socket is ``qmp_path`` (``qmp-1.sock`` ->
    ``qmp-1.pid``)."""
    return qmp_path.with_suffix(".pid")


def _pidfile_arg(pid: int) -> Path | None:
    """The ``-pidfile`` argument of process ``pid``'s command line, if it has one."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    for flag, value in itertools.pairwise(argv):
        if flag == b"-pidfile":
            return Path(os.fsdecode(value))
    return None


def find_qemus(directory: Path) -> list[tuple[ProcessRef, Path]]:
    """Every live process started with ``-pidfile`` in ``directory`` or below it, with
    its pidfile: QEMUs of one guest or cloud VM, whatever the store says of them.

    The command line, not the pidfile's content, is the proof (a pidfile can be stale,
    or not written yet by a QEMU that was just exec'd)."""
    root = os.path.realpath(directory)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pidfile = _pidfile_arg(int(entry))
        if pidfile is None:
            continue
        path = os.path.realpath(pidfile)
        if path != root and not path.startswith(root + os.sep):
            continue
        with contextlib.suppress(LaunchError):
            ref = ProcessRef.of(int(entry))
            if ref.alive():
                found.append((ref, pidfile))
    return found


def kill_found(ref: ProcessRef, pidfile: Path) -> None:
    """SIGKILL a process :func:`find_qemus` returned, if it is still that very process (same
    start time, same pidfile), and wait until it is gone."""
    if not ref.alive() or _pidfile_arg(ref.pid) != pidfile:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(ref.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(ref.pid, os.WNOHANG)  # our own child (launched by this command)
    for _ in range(400):
        if not ref.alive():
            return
        time.sleep(0.005)


def kill_strays(directory: Path, keep: ProcessRef | None = None) -> list[int]:
    """Kill every QEMU with a pidfile under ``directory`` except ``keep``; their pids."""
    killed = []
    for ref, pidfile in find_qemus(directory):
        if ref != keep:
            kill_found(ref, pidfile)
            killed.append(ref.pid)
    return killed


class QemuState(Enum):
    """Lifecycle of a QemuProcess handle (enforced by :func:`require`)."""

    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"


_M = TypeVar("_M", bound=Callable[..., Awaitable[Any]])


def require(*states: QemuState) -> Callable[[_M], _M]:
    """Guard a QMP method: refuse (QMPCommandError) unless the handle is in ``states``.

    A handle learns it has EXITED when it sees the process gone (``alive``), kills it or
    sees it quit; from then on no command is sent to a pid that may be reused.
    """
    def wrap(fn: _M) -> _M:
        @functools.wraps(fn)
        async def guarded(self: QemuProcess, *args: Any, **kw: Any) -> Any:
            if self.state not in states or not self.alive():
                cmd = str(args[0]) if args else fn.__name__
                raise QMPCommandError(f"{cmd}: QEMU {self.pid} is {self.state.value}",
                                      command=cmd, disconnected=True)
            return await fn(self, *args, **kw)
        return guarded  # type: ignore[return-value]
    return wrap


class QemuProcess:
    """A running QEMU, launched or re-attached, with a lazily connected QMP session."""

    def __init__(self, ref: ProcessRef, qmp_path: Path, log_path: Path,
                 popen: subprocess.Popen[bytes] | None = None) -> None:
        self.ref = ref
        self.qmp_path = qmp_path
        self.log_path = log_path
        self._popen = popen
        self._qmp: QMPClient | None = None
        self.state = QemuState.RUNNING if ref.alive() else QemuState.EXITED
        # Seconds one QMP command may take (None: no limit). A cloud VM's QEMU gets one:
        # a stopped (SIGSTOP) or wedged one would otherwise hang every caller for good.
        self.call_timeout: float | None = None

    @property
    def pid(self) -> int:
        return self.ref.pid

    # -- lifecycle ------------------------------------------------------------------------
    @classmethod
    async def launch(cls, argv: Sequence[str], qmp_path: Path, log_path: Path, *,
                     pass_fds: Sequence[int] = (), connect: bool = True,
                     timeout: float = 20.0, netns: str | None = None,
                     on_spawn: Callable[[QemuProcess], None] | None = None,
                     pidfile: bool = True) -> QemuProcess:
        """Start QEMU detached from our session (it outlives us) and connect to its QMP.

        QEMU writes its pid to :func:`pidfile_for` ``qmp_path`` (unless ``pidfile`` is
        false: the agent's L2s, whose names a stale copy may still hold, keep their own
        books; QEMU refuses a pidfile another QEMU holds). ``on_spawn`` is called with
        the new process before anything is awaited, so that the caller can record what runs
        before waiting on it (an interrupted wait then leaves no QEMU the store cannot
        name). ``netns`` runs QEMU inside that network namespace (where its taps live).
        """
        preexec = None
        if netns is not None:
            from pyroute2 import netns as pr_netns

            def preexec() -> None:
                pr_netns.setns(netns, flags=0)

        log_path.parent.mkdir(parents=True, exist_ok=True)
        stale = [qmp_path]
        if pidfile:
            stale.append(pidfile_for(qmp_path))
            argv = [*argv, "-pidfile", str(pidfile_for(qmp_path))]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with open(log_path, "ab") as log:
            log.write(f"# {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
            log.flush()
            try:
                popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, pass_fds=tuple(pass_fds),
                                         start_new_session=True, preexec_fn=preexec)
            except OSError as exc:
                raise LaunchError(f"cannot execute {argv[0]}: {exc.strerror}") from exc
        proc = cls(ProcessRef(popen.pid, _start_time(popen.pid)), qmp_path, log_path, popen)
        proc.state = QemuState.STARTING
        if on_spawn is not None:
            try:
                on_spawn(proc)
            except BaseException:
                proc.kill()
                raise
        if connect:
            try:
                await proc.connect(timeout)
            except BaseException:
                proc.kill()
                raise
        return proc

    @classmethod
    def attach(cls, ref: ProcessRef, qmp_path: Path, log_path: Path) -> QemuProcess:
        """Re-attach to a QEMU started by an earlier command (QMP connects on first use)."""
        return cls(ref, qmp_path, log_path)

    async def connect(self, timeout: float = 20.0) -> None:
        """Wait for QEMU's QMP socket and negotiate; fail early if QEMU dies meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise LaunchError(f"QEMU exited during start-up: {self.log_tail()}")
            if self.qmp_path.exists():
                client = QMPClient(f"qemu-{self.pid}")
                try:
                    # QEMU's QMP socket serves one client at a time: a second one is
                    # accepted but never greeted while the first stays connected.
                    async with asyncio.timeout(max(deadline - time.monotonic(), 1.0)):
                        await client.connect(str(self.qmp_path))
                except ConnectError:
                    pass
                except TimeoutError:
                    with contextlib.suppress(QMPError, OSError, EOFError):
                        await client.disconnect()
                    raise LaunchError(f"QEMU {self.pid} did not answer on {self.qmp_path} "
                                      f"within {timeout:.0f} s (QMP serves one client at a "
                                      f"time: is another command connected?)") from None
                else:
                    self._qmp = client
                    self.state = QemuState.RUNNING
                    return
            if time.monotonic() > deadline:
                raise LaunchError(f"QEMU did not open its QMP socket within {timeout:.0f} s: "
                                  f"{self.log_tail()}")
            await asyncio.sleep(0.02)

    def alive(self) -> bool:
        if self.state is QemuState.EXITED:
            return False
        if (self._popen is not None and self._popen.poll() is not None) or not self.ref.alive():
            self.state = QemuState.EXITED
            return False
        return True

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        tail = [t for t in text if not t.startswith("# ")][-lines:]
        return " | ".join(tail) or "(log empty)"

    async def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit; True if it did."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        self._reap()
        return True

    def _reap(self) -> None:
        self.state = QemuState.EXITED
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=1)

    def kill(self) -> None:
        """SIGKILL the process (if it is still the same process) and reap it."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self._drop_qmp()
        if self._popen is not None:
            self._popen.wait()
        else:
            for _ in range(200):
                if not self.ref.alive():
                    break
                time.sleep(0.005)
        self.state = QemuState.EXITED

    async def quit(self, timeout: float = 10.0) -> None:
        """Ask QEMU to quit over QMP; SIGKILL it if it does not exit in time."""
        if self.alive():
            with contextlib.suppress(QMPCommandError):
                await self.execute("quit")
            if not await self.wait_exit(timeout):
                self.kill()
        await self.close()
        self._reap()

    async def close(self) -> None:
        """Disconnect QMP; the process keeps running."""
        if self._qmp is not None:
            client, self._qmp = self._qmp, None
            with contextlib.suppress(QMPError, OSError, EOFError):
                await client.disconnect()

    def _drop_qmp(self) -> None:
        # After a SIGKILL the session is dead; disconnecting later would only log noise.
        if self._qmp is not None:
            client, self._qmp = self._qmp, None
            with contextlib.suppress(RuntimeError):
                task = asyncio.get_running_loop().create_task(client.disconnect())
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def __aenter__(self) -> QemuProcess:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- QMP ------------------------------------------------------------------------------
    @require(QemuState.STARTING, QemuState.RUNNING)
    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run one QMP command; any failure becomes QMPCommandError (also for a QEMU
        that is not running: ``disconnected`` then)."""
        if self._qmp is None:
            try:
                await self.connect(timeout=5)
            except LaunchError as exc:
                raise QMPCommandError(f"{cmd}: {exc}", command=cmd,
                                      disconnected=True) from exc
        assert self._qmp is not None
        try:
            async with asyncio.timeout(self.call_timeout):
                return await self._qmp.execute(cmd, args)
        except TimeoutError:
            self._drop_qmp()  # a late reply must not meet the next command
            raise QMPCommandError(f"{cmd}: QEMU {self.pid} did not answer within "
                                  f"{self.call_timeout:.0f} s", command=cmd) from None
        except ExecuteError as exc:
            raise QMPCommandError(f"{cmd}: {exc.error_class}: {exc}", command=cmd,
                                  error_class=exc.error_class) from exc
        except (QMPError, OSError, EOFError) as exc:
            self._drop_qmp()
            raise QMPCommandError(f"{cmd}: QMP connection to QEMU {self.pid} failed: "
                                  f"{exc!r}", command=cmd, disconnected=True) from exc

    async def session(self) -> QMPClient:
        """The connected QMP client (for events and fd passing)."""
        if self._qmp is None:
            await self.execute("query-status")
        assert self._qmp is not None
        return self._qmp

    async def run_state(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``inmigrate``, ``postmigrate``, ...)."""
        status = await self.execute("query-status")
        return str(status["status"])
