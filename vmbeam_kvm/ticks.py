"""Guest ticks: the pause a guest really sees, and its work rate, on L0's clock.

The test guest (images/testguest) sends on its second serial port (COM2, chardev id
``ticks``) one byte every millisecond of its own time and, every tenth tick, a line
``w<hex>\n`` with the number of work steps it has done since boot. Its QEMU normally sinks
COM2 into a ``null`` chardev; during a move the engine points it (``chardev-change``, or the
destination's command line) at a :class:`TickMeter`: a TCP listener whose kernel timestamps
every segment as it arrives (``SO_TIMESTAMPNS``), so neither this process's scheduling nor
the GIL can stretch a gap. QEMU's serial writes one byte at a time and the chardev sets
``TCP_NODELAY``, so every tick is a segment of its own.

- **pause**: the longest gap between two arrivals around the switch — the time the guest
  could not run, whichever QEMU's clock or report says otherwise.
- **work rate**: work steps per second of L0 time over a window, before the switch and
  right after the guest runs again; their ratio is ``post_switch_slowdown``.

Why TCP with QEMU as the client, not UDP: a QEMU whose meter went away (the command died)
must not notice. A connected UDP chardev gets the ICMP errors of a closed port, and QEMU's
blocking read of them can wedge its main loop (seen: the guest froze, its QMP went silent);
a socket chardev just disconnects and drops what the guest writes after.

The same meter serves both topologies: a nested guest's QEMU (in a cloud VM) connects
across the lab network to a meter listening in the lab's namespace.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

CHARDEV_ID = "ticks"
TICK_US = 1000          # the guest's tick period (its tick_us= default)
_SO_TIMESTAMPNS = 35     # <asm-generic/socket.h>; socket module lacks it on 3.11
_TS = struct.Struct("qq")


def null_backend() -> dict[str, Any]:
    """The ``chardev-change`` backend that sinks ticks (a guest not being measured)."""
    return {"type": "null", "data": {}}


def tcp_backend(host: str, port: int) -> dict[str, Any]:
    """The ``chardev-change`` backend that sends ticks to a meter at ``host:port``."""
    return {"type": "socket", "data": {
        "addr": {"type": "inet", "data": {"host": host, "port": str(port)}},
        "server": False, "nodelay": True}}


def chardev_arg(to: tuple[str, int] | None) -> str:
    """The ``-chardev`` option of COM2: to a meter, or the null sink. A meter that cannot
    be reached must not keep a destination QEMU from starting: QEMU connects in the
    background and retries (``reconnect-ms``)."""
    if to is None:
        return f"null,id={CHARDEV_ID}"
    return (f"socket,id={CHARDEV_ID},host={to[0]},port={to[1]},server=off,nodelay=on,"
            f"reconnect-ms=1000")


@dataclass(frozen=True)
class TailFigures:
    """What the ticks say about one switch (times are L0 wall-clock seconds)."""

    pause_ms: float
    gap_start: float
    gap_end: float
    rate_before: float | None  # work steps per second
    rate_after: float | None

    @property
    def slowdown(self) -> float | None:
        if not self.rate_before or self.rate_after is None:
            return None
        return round(self.rate_after / self.rate_before, 3)


class _Stream:
    """One QEMU's connection: its bytes parsed into work lines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.line: bytearray | None = None
        self.line_t = 0.0


class TickMeter:
    """A TCP listener receiving one guest's ticks from each of its QEMUs in turn, with a
    reader thread (see module doc). ``bind`` is the local address (``127.0.0.1`` for guests
    on this host, L0's address on the lab bridge for guests in cloud VMs); ``netns`` the
    namespace to listen in."""

    def __init__(self, bind: str = "127.0.0.1", netns: str | None = None) -> None:
        self.sock = _listener(bind, netns)
        self.host, self.port = self.sock.getsockname()[:2]
        self.arrivals: list[float] = []          # every segment, in arrival order
        self.work: list[tuple[float, int]] = []  # (arrival of its 'w', steps)
        self.connections = 0                      # QEMUs that connected so far
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._read, name="tick-meter", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.host, self.port

    def _read(self) -> None:
        try:
            while not self._closed.is_set():
                for key, _ in self._sel.select(timeout=0.1):
                    if key.data is None:
                        self._accept()
                    else:
                        self._receive(key.data)
        finally:
            for key in list(self._sel.get_map().values()):
                if key.data is not None:
                    key.data.sock.close()
            self._sel.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        conn.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        self._sel.register(conn, selectors.EVENT_READ, _Stream(conn))
        with self._lock:
            self.connections += 1

    def _receive(self, st: _Stream) -> None:
        # One byte per read: the timestamp is that of the segment the byte came in.
        try:
            data, anc, _, _ = st.sock.recvmsg(1, socket.CMSG_SPACE(_TS.size))
        except OSError:
            data, anc = b"", []
        if not data:
            self._sel.unregister(st.sock)
            st.sock.close()
            return
        t = time.time()
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                sec, ns = _TS.unpack(raw[:_TS.size])
                t = sec + ns * 1e-9
        with self._lock:
            self.arrivals.append(t)
            self._parse(st, t, data[0])

    def _parse(self, st: _Stream, t: float, b: int) -> None:
        if st.line is not None:
            if b == 0x0A:
                with contextlib.suppress(ValueError):
                    self.work.append((st.line_t, int(st.line.decode(), 16)))
                st.line = None
            elif len(st.line) < 17:
                st.line.append(b)
            else:
                st.line = None  # not a work line: drop it
        elif b == ord("w"):
            st.line, st.line_t = bytearray(), t

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._thread.join(timeout=2)
            self.sock.close()

    def __enter__(self) -> TickMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- figures ----------------------------------------------------------------------------
    def seen_after(self, t: float) -> bool:
        with self._lock:
            return bool(self.arrivals) and self.arrivals[-1] > t

    def first_arrival(self) -> float | None:
        with self._lock:
            return self.arrivals[0] if self.arrivals else None

    def last_arrival(self) -> float | None:
        with self._lock:
            return self.arrivals[-1] if self.arrivals else None

    async def wait_connections(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` QEMUs have connected; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.connections < n:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def wait_after(self, t: float, timeout: float) -> bool:
        """Wait until a tick arrives after ``t`` (wall clock); False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.seen_after(t):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def longest_gap(self, start: float, end: float) -> tuple[float, float] | None:
        """The longest gap between consecutive arrivals that overlaps ``[start, end]``,
        as (last arrival before it, first after it); None without arrivals on both sides."""
        with self._lock:
            arr = list(self.arrivals)
        i = max(bisect.bisect_left(arr, start) - 1, 0)
        j = bisect.bisect_right(arr, end)
        best: tuple[float, float] | None = None
        for a, b in _pairs(arr, i, min(j + 1, len(arr))):
            if best is None or b - a > best[1] - best[0]:
                best = (a, b)
        return best

    def rate(self, start: float, end: float) -> float | None:
        """Work steps per second between the first and last work line in ``[start, end]``
        (None with fewer than two, or under 50 ms apart)."""
        with self._lock:
            pts = [(t, w) for t, w in self.work if start <= t <= end]
        if len(pts) < 2 or pts[-1][0] - pts[0][0] < 0.05:
            return None
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])

    def figures(self, switch_start: float, switch_end: float,
                window: float) -> TailFigures | None:
        """The pause around a switch (the guest stopped at or after ``switch_start`` and ran
        again by ``switch_end``), with the work rate over ``window`` seconds on each side."""
        gap = self.longest_gap(switch_start, switch_end)
        if gap is None:
            return None
        a, b = gap
        return TailFigures(round((b - a) * 1000, 3), a, b,
                           self.rate(a - window, a), self.rate(b, b + window))


def _pairs(arr: list[float], i: int, j: int) -> Iterator[tuple[float, float]]:
    for k in range(i, j - 1):
        yield arr[k], arr[k + 1]


def _listener(bind: str, netns: str | None) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((bind, 0))
            s.listen(8)
        except BaseException:
            s.close()
            raise
        return s

    if netns is None:
        return make()
    # A socket keeps the namespace it was made in: make it on a thread of its own that
    # enters the namespace (setns changes only the calling thread).
    from pyroute2 import netns as _netns

    out: list[socket.socket | BaseException] = []

    def in_ns() -> None:
        try:
            _netns.pushns(netns)
            try:
                out.append(make())
            finally:
                _netns.popns()
        except BaseException as exc:  # handed to the caller
            out.append(exc)

    t = threading.Thread(target=in_ns)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]
