"""Lab networks: a bridge inside a network namespace of our own, with a tap per cloud VM.

Cloud VMs (L1) talk to each other only over such a bridge; nothing is attached to the host's
own interfaces, and the namespace is the unit of cleanup (removing it removes the bridge and
every tap). Built with pyroute2.
"""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass

from pyroute2 import NetNS, netns

from .errors import BadInputError, VmbeamError

BRIDGE = "br0"


class NetworkError(VmbeamError):
    """A lab network could not be built or changed."""


@dataclass(frozen=True)
class LabNetwork:
    """A lab network: namespace ``ns``, bridge ``br0`` with ``gateway`` in ``subnet``."""

    ns: str
    subnet: str

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
        return self.ns in netns.listnetns()

    def create(self) -> None:
        """Create the namespace and its bridge (idempotent)."""
        if not self.exists():
            netns.create(self.ns)
        try:
            with NetNS(self.ns) as ns:
                if not ns.link_lookup(ifname=BRIDGE):
                    ns.link("add", ifname=BRIDGE, kind="bridge")
                br = ns.link_lookup(ifname=BRIDGE)[0]
                if not ns.get_addr(index=br):
                    ns.addr("add", index=br, address=self.gateway,
                            prefixlen=self.network.prefixlen)
                ns.link("set", index=br, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        except Exception as exc:
            raise NetworkError(f"building lab network {self.ns}: {exc}") from exc

    def add_tap(self, ifname: str) -> None:
        """Create tap ``ifname`` in the namespace, enslaved to the bridge."""
        try:
            with NetNS(self.ns) as ns:
                if not ns.link_lookup(ifname=ifname):
                    ns.link("add", ifname=ifname, kind="tuntap", mode="tap")
                tap = ns.link_lookup(ifname=ifname)[0]
                ns.link("set", index=tap, master=ns.link_lookup(ifname=BRIDGE)[0], state="up")
        except Exception as exc:
            raise NetworkError(f"creating tap {ifname} in {self.ns}: {exc}") from exc

    def remove_tap(self, ifname: str) -> None:
        if not self.exists():
            return
        with NetNS(self.ns) as ns, contextlib.suppress(Exception):
            for idx in ns.link_lookup(ifname=ifname):
                ns.link("del", index=idx)

    def taps(self) -> list[str]:
        if not self.exists():
            return []
        with NetNS(self.ns) as ns:
            return [str(link.get("ifname")) for link in ns.get_links()
                    if link.get("ifname") not in ("lo", BRIDGE)]

    def destroy(self) -> None:
        """Remove the namespace: the bridge and every tap go with it."""
        if self.exists():
            netns.remove(self.ns)
