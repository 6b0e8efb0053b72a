"""The lab: the embedded default topology of cloud VMs on one lab network.

``lab up`` boots tenant-a's two cloud VMs and tenant-b's one on the lab network (a
namespace of our own, :mod:`vmbeam_kvm.net`); ``lab down`` stops every guest and cloud VM
and removes the network.
"""

from __future__ import annotations

import asyncio

from .config import Settings
from .host import Host
from .net import LabNetwork

DEFAULT_LAB = {"tenant-a": ["l1a", "l1b"], "tenant-b": ["l1c"]}


def lab_network(settings: Settings | None = None) -> LabNetwork:
    """The lab network of these settings (namespace and subnet are settings)."""
    s = settings or Settings()
    return LabNetwork(s.lab_ns, s.lab_subnet)


async def lab_up(host: Host) -> dict[str, list[str]]:
    """Boot the embedded default lab (idempotent); tenant -> cloud VM names."""
    net = lab_network(host.settings)
    have = {vm.name for vm in host.store.cloud_vms()}
    todo = [(t, n) for t, names in DEFAULT_LAB.items() for n in names if n not in have]
    try:
        await asyncio.gather(*(host.cloud.start_cloud_vm(n, t, lab=net) for t, n in todo))
    except BaseException:
        await lab_down(host)
        raise
    vms = host.store.cloud_vms()
    return {t: [v.name for v in vms if v.tenant == t] for t in DEFAULT_LAB}


async def lab_down(host: Host) -> None:
    """Stop every guest and cloud VM and remove the lab network."""
    await host.stop_all()
    await lab_network(host.settings).destroy()
