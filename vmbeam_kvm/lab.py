"""The lab: the embedded default topology of cloud VMs on one lab network.

``lab up`` boots tenant-a's two cloud VMs and tenant-b's one on the lab network (a
namespace of our own, :mod:`vmbeam_kvm.net`); ``lab down`` stops every guest and cloud VM
and removes the network.

Each state directory has a lab of its own: its namespace is named after the state directory
(``Settings.lab_namespace``) and its bridge names the state directory as owner, so two labs
run side by side; ``lab up`` and ``lab down`` of one never touch the other's.
"""

from __future__ import annotations

import asyncio
import contextlib

from .cloudvm import CloudVMState
from .config import Settings
from .errors import LabDamagedError, NetworkError, VmbeamError
from .host import Host
from .net import LabNetwork

DEFAULT_LAB = {"tenant-a": ["l1a", "l1b"], "tenant-b": ["l1c"]}


def lab_network(settings: Settings | None = None, ns: str | None = None) -> LabNetwork:
    """The lab network of these settings (namespace ``ns``: by default the settings'),
    owned by their state directory."""
    s = settings or Settings()
    return LabNetwork(ns or s.lab_namespace, s.lab_subnet, s.lab_owner)


async def lab_problems(host: Host) -> list[str]:
    """What the recorded cloud VMs rely on and no longer have: each one running, its
    namespace, bridge and tap there (empty: the lab is whole)."""
    problems: list[str] = []
    by_ns: dict[str, dict[str, str]] = {}
    for vm in host.store.cloud_vms():
        if vm.state is not CloudVMState.RUNNING:
            problems.append(f"cloud VM {vm.name} is {vm.state.value}")
        elif vm.lab and vm.tap:
            by_ns.setdefault(vm.lab, {})[vm.name] = vm.tap
    for ns, taps in sorted(by_ns.items()):
        problems += await lab_network(host.settings, ns).check_built(taps)
    return problems


async def lab_up(host: Host) -> dict[str, list[str]]:
    """Boot the embedded default lab (idempotent); tenant -> cloud VM names.

    Refuses (:class:`LabDamagedError`, nothing changed) when cloud VMs it would keep have
    lost what they run on, and (:class:`~vmbeam_kvm.errors.LabInUseError`) a namespace of
    another state directory's lab. When booting fails, what this call started is stopped and
    the namespace removed only if this call created it.
    """
    net = lab_network(host.settings)
    problems = await lab_problems(host)
    if problems:
        raise LabDamagedError(
            f"the lab of {host.settings.state_dir} is damaged: {'; '.join(problems)}; "
            f"`lab down` then `lab up` rebuilds it (or `cloud-vm stop` the broken ones)",
            problems=tuple(problems))
    net.check_owner(await net.owner_of())
    created = not net.exists()
    have = {vm.name for vm in host.store.cloud_vms()}
    todo = [(t, n) for t, names in DEFAULT_LAB.items() for n in names if n not in have]
    started: list[str] = []

    async def boot(tenant: str, name: str) -> None:
        await host.cloud.start_cloud_vm(name, tenant, lab=net)
        started.append(name)

    try:
        # A task group: when one boot fails the others are cancelled (each undoes itself)
        # before the cleanup below, not left booting beside it.
        async with asyncio.TaskGroup() as tg:
            for t, n in todo:
                tg.create_task(boot(t, n))
    except BaseException as exc:
        for n in started:  # only what this call started (a name may be another's by now)
            with contextlib.suppress(VmbeamError):
                await host.cloud.stop_cloud_vm(n)
        if created and not host.store.cloud_vms():
            with contextlib.suppress(NetworkError):
                await net.destroy()
        if isinstance(exc, BaseExceptionGroup):
            raise exc.exceptions[0] from None  # the first error, as gather gave it
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


async def lab_down(host: Host) -> list[str]:
    """Stop every guest and cloud VM and remove the lab network (this state directory's
    namespaces only: one another state directory owns stays); the namespaces removed."""
    spaces = {host.settings.lab_namespace} | {vm.lab for vm in host.store.cloud_vms()
                                               if vm.lab}
    await host.stop_all()
    return [ns for ns in sorted(spaces) if await lab_network(host.settings, ns).destroy()]
