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
        await start_cloud_vms(host, todo, net)
    except BaseException:
        await lab_down(host)
        raise
    vms = host.store.cloud_vms()
    return {t: [v.name for v in vms if v.tenant == t] for t in DEFAULT_LAB}


async def start_cloud_vms(host: Host, vms: list[tuple[str, str]], net: LabNetwork) -> None:
    """Boot cloud VMs ``(tenant, name)`` on ``net`` side by side. If one fails, or the
    command is interrupted, the others are cancelled and this raises only once every start
    has undone itself: ``gather`` would raise at the first, while the rest are still
    booting or cleaning up, and the caller's cleanup would race them."""
    tasks = [asyncio.ensure_future(host.cloud.start_cloud_vm(n, t, lab=net)) for t, n in vms]
    if not tasks:
        return
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # retrieved: the first error is the one raised
        raise


async def lab_down(host: Host) -> None:
    """Stop every guest and cloud VM and remove the lab network."""
    await host.stop_all()
    await lab_network(host.settings).destroy()
