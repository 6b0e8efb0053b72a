"""Lab networks: a bridge inside a network namespace of our own, with a tap per cloud VM.

Cloud VMs (L1) talk to each other only over such a bridge; nothing is attached to the host's
own interfaces, and the namespace is the unit of cleanup (removing it removes the bridge and
every tap). Built on pyroute2's asyncio API: every link and address operation is a coroutine
over an :class:`pyroute2.AsyncIPRoute` opened in the namespace, run on the caller's event loop.
Only creating and removing the namespace itself runs in a worker thread, as pyroute2 has no
async form of those. (pyroute2 still forks a short-lived child, synchronously, to open each
socket in the namespace and to create a tap: a stall of some 10-15 ms per call.) Failures
raise :class:`~vmbeam_kvm.errors.NetworkError` naming the namespace (and interface).

A lab network has an *owner*, the state directory whose lab it is, written on its bridge as
the interface alias (``vmbeam-kvm lab of <state dir>``). Names inside the namespace (``br0``,
``tap-<cloud VM>``) are the namespace's own, so labs in two namespaces never meet; where two
state directories are pointed at one namespace (``VMBEAM_LAB_NS``), the alias says whose it
is: :meth:`LabNetwork.create` refuses another owner's namespace and
:meth:`LabNetwork.destroy` leaves it alone.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2 import AsyncIPRoute, NetlinkError, netns

from .errors import BadInputError, LabInUseError, NetworkError

log = logging.getLogger(__name__)

BRIDGE = "br0"
IFNAMSIZ = 16  # the kernel's limit on an interface name, including its NUL
OWNER_ALIAS = "vmbeam-kvm lab of "  # + the owner: the bridge's alias (IFLA_IFALIAS)
# Another command creates the bridge and then names its owner: how long an unnamed bridge
# may stay so before it is taken as a lab of no one's (one made by a release before owners).
_CLAIM_WAIT = 1.0


def _check_ifname(ifname: str) -> None:
    # pyroute2 reports a failed tuntap creation as success: refuse a name the kernel would
    # refuse (too long, or with '/' or blanks), with our own message, before trying.
    if (not 0 < len(ifname.encode()) < IFNAMSIZ or ifname in (".", "..")
            or any(c == "/" or c.isspace() for c in ifname)):
        raise NetworkError(f"invalid interface name {ifname!r}")


async def _index(ipr: Any, ifname: str) -> int | None:
    """The index of link ``ifname`` in ``ipr``'s namespace, None if there is none."""
    found = await ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


async def _add_link(ipr: Any, **spec: Any) -> bool:
    """``ip link add``, where another process creating the same link first is no failure;
    True when this call created it."""
    try:
        await ipr.link("add", **spec)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise
        return False
    return True


async def _alias(ipr: Any, index: int) -> str:
    for link in await ipr.link("get", index=index):
        return str(link.get("ifalias") or "")
    return ""


def _owner_in(alias: str) -> str:
    return alias[len(OWNER_ALIAS):] if alias.startswith(OWNER_ALIAS) else ""


@dataclass(frozen=True)
class LabNetwork:
    """A lab network: namespace ``ns``, bridge ``br0`` with ``gateway`` in ``subnet``, of
    ``owner`` (a state directory; "" for a network nobody owns: no ownership checks)."""

    ns: str
    subnet: str
    owner: str = ""

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> str:
        return str(self.network.network_address + 1)

    def address(self, index: int) -> str:
        """The ``index``-th host address (2, 3, ...), with prefix, for a cloud VM."""
        addr = self.network.network_address + 1 + index
        if addr not in self.network or addr == self.network.broadcast_address:
            raise BadInputError(f"lab network {self.subnet} is full")
        return f"{addr}/{self.network.prefixlen}"

    def exists(self) -> bool:
        """Whether the namespace exists (a look at /run/netns: cheap, never blocks)."""
        return self.ns in netns.listnetns()

    def _ipr(self) -> Any:
        # flags=0: pyroute2's default (O_CREAT) would quietly create a missing namespace.
        return AsyncIPRoute(netns=self.ns, flags=0)

    async def owner_of(self) -> str | None:
        """Whose lab the namespace is: the owner named on its bridge; "" when it has no
        bridge or one that names no owner; None when there is no such namespace."""
        if not self.exists():
            return None
        try:
            async with self._ipr() as ipr:
                br = await _index(ipr, BRIDGE)
                return "" if br is None else _owner_in(await _alias(ipr, br))
        except FileNotFoundError:
            if self.exists():
                raise NetworkError(f"reading the owner of namespace {self.ns}: cannot enter "
                                   f"the namespace") from None
            return None
        except Exception as exc:
            raise NetworkError(f"reading the owner of namespace {self.ns}: {exc}") from exc

    def _in_use(self, other: str) -> LabInUseError:
        return LabInUseError(
            f"lab namespace {self.ns} belongs to the lab of state directory {other}, not "
            f"{self.owner}: nothing in it was touched (unset VMBEAM_LAB_NS to give each "
            f"state directory a namespace of its own, or choose another)",
            ns=self.ns, owner=other)

    def check_owner(self, have: str | None) -> None:
        """Raise :class:`LabInUseError` when ``have`` (from :meth:`owner_of`) is another
        owner than ours."""
        if self.owner and have and have != self.owner:
            raise self._in_use(have)

    async def _claim(self, ipr: Any, br: int, created: bool) -> None:
        """Name our owner on bridge ``br``, unless it names another (then refuse)."""
        if not self.owner:
            return
        deadline = asyncio.get_running_loop().time() + (0 if created else _CLAIM_WAIT)
        while True:
            have = _owner_in(await _alias(ipr, br))
            self.check_owner(have)
            if have == self.owner:
                return
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)  # its creator may be about to name itself
        await ipr.link("set", index=br, ifalias=OWNER_ALIAS + self.owner)
        self.check_owner(_owner_in(await _alias(ipr, br)))

    async def create(self) -> None:
        """Create the namespace and its bridge, with the gateway address, up (idempotent).
        Raises :class:`LabInUseError` (nothing touched) when the namespace is another
        owner's lab."""
        if not self.exists():
            try:
                # pyroute2 has no async netns creation: netns.create forks a child (unshare
                # and bind mount) and waits for it, so it runs off the event loop.
                await asyncio.to_thread(netns.create, self.ns)
            except FileExistsError:
                pass  # another process created it meanwhile
            except Exception as exc:
                raise NetworkError(f"creating network namespace {self.ns}: {exc}") from exc
        prefixlen = self.network.prefixlen
        try:
            async with self._ipr() as ipr:
                br = await _index(ipr, BRIDGE)
                created = False
                if br is None:
                    created = await _add_link(ipr, ifname=BRIDGE, kind="bridge")
                    br = await _index(ipr, BRIDGE)
                if br is None:
                    raise NetworkError(f"bridge {BRIDGE} in namespace {self.ns} was not "
                                       f"created")
                await self._claim(ipr, br, created)
                have = {(str(a.get("address")), int(a["prefixlen"]))
                        async for a in await ipr.get_addr(family=socket.AF_INET, index=br)}
                if (self.gateway, prefixlen) not in have:
                    try:
                        await ipr.addr("add", index=br, address=self.gateway,
                                       prefixlen=prefixlen)
                    except NetlinkError as exc:
                        if exc.code != errno.EEXIST:
                            raise
                await ipr.link("set", index=br, state="up")
                lo = await _index(ipr, "lo")
                if lo is not None:
                    await ipr.link("set", index=lo, state="up")
        except (NetworkError, LabInUseError):
            raise
        except Exception as exc:
            raise NetworkError(f"building bridge {BRIDGE} in namespace {self.ns}: "
                               f"{exc}") from exc

    async def add_tap(self, ifname: str) -> None:
        """Create tap ``ifname`` in the namespace, enslaved to the bridge and up (idempotent)."""
        _check_ifname(ifname)
        where = f"tap {ifname} in namespace {self.ns}"
        if not self.exists():
            raise NetworkError(f"creating {where}: the namespace does not exist")
        try:
            async with self._ipr() as ipr:
                br = await _index(ipr, BRIDGE)
                if br is None:
                    raise NetworkError(f"creating {where}: there is no bridge {BRIDGE}")
                tap = await _index(ipr, ifname)
                if tap is None:
                    await _add_link(ipr, ifname=ifname, kind="tuntap", mode="tap")
                    # pyroute2 reports a failed tuntap creation as success: look.
                    tap = await _index(ipr, ifname)
                    if tap is None:
                        raise NetworkError(f"creating {where}: the kernel did not create it")
                await ipr.link("set", index=tap, master=br, state="up")
        except NetworkError:
            raise
        except Exception as exc:
            raise NetworkError(f"creating {where}: {exc}") from exc

    async def remove_tap(self, ifname: str) -> None:
        """Remove tap ``ifname``; a missing tap or namespace is no failure."""
        _check_ifname(ifname)
        if not self.exists():
            return
        try:
            async with self._ipr() as ipr:
                for idx in await ipr.link_lookup(ifname=ifname):
                    try:
                        await ipr.link("del", index=idx)
                    except NetlinkError as exc:
                        if exc.code != errno.ENODEV:  # gone meanwhile
                            raise
        except FileNotFoundError:
            if self.exists():
                raise NetworkError(f"removing tap {ifname} in namespace {self.ns}: "
                                   f"cannot enter the namespace") from None
        except Exception as exc:
            raise NetworkError(f"removing tap {ifname} in namespace {self.ns}: {exc}") from exc

    async def taps(self) -> list[str]:
        """Names of the namespace's interfaces other than ``lo`` and the bridge."""
        if not self.exists():
            return []
        try:
            async with self._ipr() as ipr:
                return [str(link.get("ifname")) async for link in await ipr.get_links()
                        if link.get("ifname") not in ("lo", BRIDGE)]
        except FileNotFoundError:
            if self.exists():
                raise NetworkError(f"listing interfaces in namespace {self.ns}: cannot enter "
                                   f"the namespace") from None
            return []
        except Exception as exc:
            raise NetworkError(f"listing interfaces in namespace {self.ns}: {exc}") from exc

    async def check_built(self, taps: dict[str, str]) -> list[str]:
        """What is missing for cloud VMs whose taps are ``taps`` (cloud VM -> tap name): the
        namespace, its bridge (with our owner on it), each tap on the bridge. One line per
        problem; empty when all is there."""
        if not self.exists():
            return [f"lab namespace {self.ns} of {', '.join(sorted(taps))} is gone (removed "
                    f"by something other than this state directory's `lab down`)"]
        try:
            async with self._ipr() as ipr:
                br = await _index(ipr, BRIDGE)
                if br is None:
                    return [f"bridge {BRIDGE} is missing from lab namespace {self.ns}"]
                have = _owner_in(await _alias(ipr, br))
                if self.owner and have and have != self.owner:
                    return [f"lab namespace {self.ns} belongs to state directory {have}"]
                out = []
                for vm, tap in sorted(taps.items()):
                    idx = await _index(ipr, tap)
                    if idx is None:
                        out.append(f"tap {tap} of cloud VM {vm} is missing from lab "
                                   f"namespace {self.ns}")
                        continue
                    master = [link.get("master") for link in
                              await ipr.link("get", index=idx)]
                    if br not in master:
                        out.append(f"tap {tap} of cloud VM {vm} is not on bridge {BRIDGE} "
                                   f"of lab namespace {self.ns}")
                return out
        except FileNotFoundError:
            return [f"lab namespace {self.ns} cannot be entered"]
        except Exception as exc:
            raise NetworkError(f"checking lab namespace {self.ns}: {exc}") from exc

    async def link_bytes(self, ifname: str) -> int:
        """rx_bytes + tx_bytes of interface ``ifname`` in the namespace (IFLA_STATS64); 0 when
        the interface or the namespace does not exist."""
        _check_ifname(ifname)
        if not self.exists():
            return 0
        try:
            async with self._ipr() as ipr:
                try:
                    links = await ipr.link("get", ifname=ifname)
                except NetlinkError as exc:
                    if exc.code == errno.ENODEV:
                        return 0
                    raise
                for link in links:
                    stats = link.get("IFLA_STATS64")
                    if stats:
                        return int(stats["rx_bytes"]) + int(stats["tx_bytes"])
                return 0
        except FileNotFoundError:
            if self.exists():
                raise NetworkError(f"reading counters of {ifname} in namespace {self.ns}: "
                                   f"cannot enter the namespace") from None
            return 0
        except Exception as exc:
            raise NetworkError(f"reading counters of {ifname} in namespace {self.ns}: "
                               f"{exc}") from exc

    async def destroy(self) -> bool:
        """Remove the namespace, if it is ours: the bridge and every tap go with it
        (idempotent). Ours: its bridge names our owner, or it names none and nothing but
        ``lo`` and the bridge is left in it (a lab of no one's, or one whose building
        failed early). Another's is left as it is. True when it was removed."""
        have = await self.owner_of()
        if have is None:
            return False
        if self.owner and have != self.owner and (have or await self.taps()):
            log.info("leaving namespace %s: it is the lab of %s", self.ns,
                     have or "no vmbeam-kvm state directory")
            return False
        try:
            # Blocking umount2 and unlink through ctypes (no async form in pyroute2).
            await asyncio.to_thread(netns.remove, self.ns)
        except FileNotFoundError:
            return False  # removed meanwhile
        except Exception as exc:
            raise NetworkError(f"removing network namespace {self.ns}: {exc}") from exc
        return True
