"""The agent wire protocol: JSON lines over the cloud VM's virtio-serial channel.

Request ``{"id": N, "op": NAME, "args": {...}}``; reply ``{"id": N, "ok": true, "result": ...}``
or ``{"id": N, "ok": false, "error": TEXT, "type": ERROR_CLASS}``. Ids pair replies with
requests, so stale lines left in the channel by an earlier session are ignored.

L0 speaks it through :class:`AgentClient`'s typed methods (one per :class:`Op`), whose
replies are the dataclasses below; ``call`` is the untyped wire underneath.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

from ..config import AGENT_LOCK_WAIT, agent_call_timeout
from ..errors import AgentError
from ..heartbeat import Heartbeat

PORT_NAME = "org.vmbeam.agent"
# How long a command waits for a cloud VM's agent channel that another command holds.
LOCK_WAIT = AGENT_LOCK_WAIT


class Op(StrEnum):
    """The agent's operations (the server implements ``op_<name>``)."""

    PING = "ping"
    REGIONS = "regions"
    VERIFY_REGION = "verify_region"
    START_GUEST = "start_guest"
    QMP = "qmp"
    MIGRATION_TLS = "migration_tls"
    STATUS = "status"
    STOP_GUEST = "stop_guest"
    SIGNAL = "signal"
    RESTART = "restart"


@dataclass(frozen=True)
class Pong:
    """``ping``: the agent is up; which guests it runs."""

    name: str
    pid: int
    guests: list[str]


@dataclass(frozen=True)
class L2Started:
    """``start_guest``: the L2 QEMU's pid, the agent's pid, the region it maps."""

    pid: int
    agent_pid: int
    region: dict[str, Any]


@dataclass(frozen=True)
class L2Status:
    """``status`` of one L2 guest; :data:`GONE` where it certainly does not run."""

    alive: bool
    run_state: str | None
    pid: int = 0
    agent_pid: int = 0
    heartbeat: Heartbeat | None = None
    region_id: str = ""
    disk_acks: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, d: dict[str, Any]) -> L2Status:
        hb = d.get("heartbeat")
        return cls(alive=bool(d["alive"]), run_state=d.get("run_state"),
                   pid=int(d.get("pid", 0)), agent_pid=int(d.get("agent_pid", 0)),
                   heartbeat=None if hb is None else Heartbeat(**hb),
                   region_id=str(d.get("region_id", "")),
                   disk_acks={str(k): int(v) for k, v in d.get("disk_acks", {}).items()})


GONE = L2Status(alive=False, run_state=None)


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class AgentClient:
    """L0 side of one cloud VM's agent channel (a unix socket served by the L1 QEMU)."""

    def __init__(self, path: Path, name: str = "", console: Path | None = None) -> None:
        self.path = path
        self.name = name or path.parent.name
        self.console = console  # the cloud VM's console log, quoted when it stops answering
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(int(time.time() * 1000) % 10**9)
        self._lock = asyncio.Lock()
        self._lock_fd: int | None = None

    async def connect(self, timeout: float = 10.0) -> None:
        """Take the channel: QEMU serves the agent's socket to one client at a time, so a
        process holds ``agent.lock`` (beside the socket) while it is connected; another
        command waits up to ``LOCK_WAIT`` seconds for it, then gets a clear error."""
        if self._writer is not None:
            return
        await self._lock_channel()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    str(self.path), limit=1 << 22)
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    self._unlock_channel()
                    raise AgentError(f"cannot reach the agent of {self.name}: {exc}") from exc
                await asyncio.sleep(0.1)

    async def _lock_channel(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self.path.with_name(self.path.stem + ".lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_fd = fd
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise AgentError(f"the agent of cloud VM {self.name} is in use by another "
                                     f"vmbeam-kvm command (waited {LOCK_WAIT:.0f} s)") from None
                await asyncio.sleep(0.05)

    def _unlock_channel(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the only fd of it releases the flock
            self._lock_fd = None

    async def close(self) -> None:
        """Let go of the channel (and its lock) for other commands."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._reader = self._writer = None
        self._unlock_channel()

    async def __aenter__(self) -> AgentClient:
        await self.connect()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Send one request and wait for its reply (requests on one channel are serialised);
        ``timeout`` None: :func:`~vmbeam_kvm.config.agent_call_timeout`."""
        if timeout is None:
            timeout = agent_call_timeout()
        async with self._lock:
            if self._writer is None:
                await self.connect()
            assert self._reader is not None and self._writer is not None
            req_id = next(self._ids)
            try:
                self._writer.write(encode({"id": req_id, "op": op, "args": args}))
                await self._writer.drain()
            except OSError as exc:  # the cloud VM's QEMU went away under us
                await self.close()
                raise AgentError(f"agent of cloud VM {self.name}: channel lost ({exc})"
                                 f"{self.console_tail()}") from exc
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        line = await self._reader.readline()
                        if not line:
                            await self.close()
                            raise AgentError(f"agent of {self.name} closed the channel"
                                             f"{self.console_tail()}")
                        with contextlib.suppress(ValueError):
                            reply = json.loads(line)
                            if isinstance(reply, dict) and reply.get("id") == req_id:
                                break
            except OSError as exc:
                await self.close()
                raise AgentError(f"agent of cloud VM {self.name}: channel lost ({exc})"
                                 f"{self.console_tail()}") from exc
            except TimeoutError:
                await self.close()  # the late reply must not be taken for the next one
                raise AgentError(f"agent of cloud VM {self.name} did not answer {op} within "
                                 f"{timeout:.0f} s{self.console_tail()}") from None
        if not reply.get("ok"):
            raise AgentError(f"{self.name}: {op}: {reply.get('error')}", reply.get("type", ""))
        return reply.get("result")

    def console_tail(self, lines: int = 8) -> str:
        """The end of the cloud VM's console, for errors that say why it stopped answering."""
        if self.console is None:
            return ""
        try:
            with open(self.console, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 16384))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        tail = [t.rstrip() for t in text.splitlines() if t.strip()][-lines:]
        return f"; console of {self.name} ({self.console}) ends:\n  " + "\n  ".join(tail)

    # -- typed operations -------------------------------------------------------------
    async def qmp(self, guest: str, cmd: str, args: dict[str, Any] | None = None,
                  timeout: float | None = None) -> Any:
        """Run a QMP command on the QEMU of ``guest`` in this cloud VM."""
        return await self.call(Op.QMP, timeout=timeout, name=guest, cmd=cmd, args=args)

    async def ping(self, timeout: float | None = None) -> Pong:
        r = await self.call(Op.PING, timeout=timeout)
        return Pong(name=str(r["name"]), pid=int(r["pid"]), guests=list(r["guests"]))

    async def start_guest(self, name: str, *, memory: int, image: str, touch: int,
                          region_id: str, incoming: bool = False, mac: str = "",
                          ip: str = "", ticks: bool = True,
                          ticks_to: tuple[str, int] | None = None, cpus: int = 1,
                          disks: list[dict[str, Any]] | None = None) -> L2Started:
        """Start the L2 QEMU of ``name`` on the mapped region ``region_id`` (``incoming``:
        waiting for a migration stream; ``ticks``: with a tick port, sending to
        ``ticks_to`` if given; ``cpus``: its -smp; ``disks``: each disk's
        :meth:`~vmbeam_kvm.disks.Disk.wire` form, plugged here by L0); raises AgentError
        (remote RegionError when the region is not mapped here or holds another size)."""
        # cpus and disks only when used: an agent started before they existed answers.
        extra: dict[str, Any] = {"cpus": cpus} if cpus != 1 else {}
        if disks:
            extra["disks"] = disks
        r = await self.call(Op.START_GUEST, name=name, memory=memory, image=image,
                            touch=touch, region_id=region_id, incoming=incoming, mac=mac,
                            ip=ip, ticks=ticks, ticks_to=list(ticks_to) if ticks_to else None,
                            **extra)
        return L2Started(pid=int(r["pid"]), agent_pid=int(r["agent_pid"]),
                         region=dict(r["region"]))

    async def status(self, name: str, timeout: float | None = None) -> L2Status:
        """The guest's L2 QEMU as the agent sees it; AgentError with remote_type
        ``BadInputError`` when the agent runs no such guest."""
        return L2Status.of(await self.call(Op.STATUS, timeout=timeout, name=name))

    async def stop_guest(self, name: str, *, kill: bool = False,
                         timeout: float | None = None) -> bool:
        """Quit (or SIGKILL) the guest's L2 QEMU; False when the agent had no such guest."""
        return bool((await self.call(Op.STOP_GUEST, timeout=timeout, name=name,
                                     kill=kill))["stopped"])

    async def migration_tls(self, name: str, endpoint: str, key: str) -> str:
        """Give the guest's QEMU a TLS-PSK credential; returns its object id."""
        r = await self.call(Op.MIGRATION_TLS, name=name, endpoint=endpoint, key=key)
        return str(r["tls_creds"])

    async def signal(self, name: str, signum: int) -> int:
        """Send ``signum`` to the guest's L2 QEMU; returns its pid."""
        return int((await self.call(Op.SIGNAL, name=name, signum=signum))["pid"])

    async def restart(self) -> None:
        """Make the agent exit so that init starts it afresh (guests keep running)."""
        await self.call(Op.RESTART)

    async def wait_ready(self, timeout: float,
                         alive: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Wait until the agent answers ``ping`` (the cloud VM has booted); ``alive`` tells
        whether the cloud VM's QEMU still runs (no point waiting for a dead one)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result: dict[str, Any] = await self.call(Op.PING, timeout=3)
                return result
            except AgentError as exc:
                if alive is not None and not alive():
                    raise AgentError(f"cloud VM {self.name}'s QEMU exited"
                                     f"{self.console_tail()}") from exc
                if time.monotonic() > deadline:
                    raise AgentError(f"agent of cloud VM {self.name} did not answer within "
                                     f"{timeout:.0f} s{self.console_tail()}") from exc
                await self.close()
                await asyncio.sleep(0.5)
