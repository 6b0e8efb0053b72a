"""Virtual IaaS: cloud VMs (L1, TCG) on this host, test guests (L2, TCG in TCG) inside them.

One lab for the module (``lab up`` / ``lab down`` through the CLI): l1a and l1b of tenant-a,
l1c of tenant-b, on a bridge in a namespace of the test's own.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmbeam_kvm import GuestBusyError, Host, MigrationError, diskcheck
from vmbeam_kvm.agent.protocol import AgentClient
from vmbeam_kvm.migrate.faults import injected
from vmbeam_kvm.qemu.features import Guarantees, guarantees
from vmbeam_kvm.region import references

from .conftest import REPO, attached, cli, run_cli, settings_of

MiB = 1 << 20


@pytest.fixture
def nested_guest(lab: dict[str, Any]) -> Iterator[str]:
    st = cli(lab, "guest", "start", "n1", "--cloud-vm", "l1a", "--memory", "256M")
    assert st["cloud_vm"] == "l1a" and st["tenant"] == "tenant-a" and st["memory_ok"] is True
    yield "n1"
    cli(lab, "guest", "stop", "n1")
    assert cli(lab, "region", "list") == []  # stopping the guest released its region


def test_zero_copy_between_cloud_vms(lab: dict[str, Any], nested_guest: str) -> None:
    assert attached(lab, nested_guest) == ["l1a"]
    seq = cli(lab, "guest", "status", nested_guest)["heartbeat"]["seq"]
    for src, dst in (("l1a", "l1b"), ("l1b", "l1a")):
        res = cli(lab, "migrate", nested_guest, "--to", dst)
        assert res["mode"] == "zero-copy" and res["status"] == "completed"
        assert "both cloud VMs run on this host" in res["mode_reason"]  # --mode auto
        assert (res["source_cloud_vm"], res["dest_cloud_vm"]) == (src, dst)
        assert res["ram_transferred_bytes"] < MiB and res["guest_ok"] is True
        assert res["network_bytes"] < 2 * MiB  # device state only crossed the L1-L1 link
        assert res["source_detached"] is True and res["tls"] is True
        # L0's pagemap: both cloud VMs' QEMUs map the guest's pages on the same frames.
        assert res["shared_frames_ratio"] is not None and res["shared_frames_ratio"] >= 0.99
        assert res["frames"]["present_both"] > 0
        assert res["command_ms"] >= res["total_ms"] + res["phases_ms"]["share"]
        # The guest's own ticks crossed the lab network to L0: the pause it saw.
        assert res["pause_ms"] is not None and res["pause_ms"] > 0
        assert res["peak_qemu_memory_bytes"] > res["memory_bytes"]  # the region, once
        assert set(res["phases_ms"]) == {"share", "prepare", "switch", "confirm", "relocate"}
        # Independent look through L0's view: the region is attached where the guest runs.
        assert attached(lab, nested_guest) == [dst]
        st = cli(lab, "guest", "status", nested_guest)
        assert st["cloud_vm"] == dst and st["run_state"] == "running"
        assert st["heartbeat"]["seq"] > seq and st["memory_ok"] is True
        seq = st["heartbeat"]["seq"]


def test_precopy_over_lab_network(lab: dict[str, Any], nested_guest: str) -> None:
    res = cli(lab, "migrate", nested_guest, "--to", "l1b", "--mode", "precopy")
    assert res["mode"] == "precopy" and res["guest_ok"] is True
    assert res["tls"] is False  # VMBEAM_MIGRATION_TLS=auto: bulk TLS is too slow under TCG
    assert res["ram_transferred_bytes"] > 100 * MiB  # the RAM itself crossed the network
    assert res["shared_frames_ratio"] is None and res["pause_ms"] is not None
    assert res["network_bytes"] >= res["ram_transferred_bytes"]
    assert attached(lab, nested_guest) == ["l1b"]  # a fresh region, the old one released


def test_cross_tenant_refused(lab: dict[str, Any], nested_guest: str) -> None:
    proc = run_cli(lab["state"], "migrate", nested_guest, "--to", "l1c", env=lab["env"])
    assert proc.returncode == 2 and "refused" in proc.stderr and "tenant-b" in proc.stderr
    assert attached(lab, nested_guest) == ["l1a"]
    st = cli(lab, "guest", "status", nested_guest)
    assert st["cloud_vm"] == "l1a" and st["run_state"] == "running" and st["memory_ok"]
    # ...and the refusal is in the audit log.
    assert any(e["subject"] == nested_guest and "l1c" in e["detail"] for e in _events(lab))


def _events(lab: dict[str, Any]) -> list[dict[str, Any]]:
    from vmbeam_kvm.store import Store
    store = Store(lab["state"])
    try:
        return store.events("refused")
    finally:
        store.close()


async def test_guest_that_dies_is_reported_lost(lab: dict[str, Any]) -> None:
    cli(lab, "guest", "start", "n2", "--cloud-vm", "l1b", "--memory", "128M")
    async with Host(settings_of(lab)) as host:
        agent = host.cloud.agent(host.cloud.vm("l1b"))
        await agent.call("qmp", name="n2", cmd="quit")  # dies behind L0's back
    st = cli(lab, "guest", "status", "n2")
    assert st["state"] == "lost" and st["alive"] is False
    proc = run_cli(lab["state"], "migrate", "n2", "--to", "l1a", env=lab["env"])
    assert proc.returncode == 2 and "lost" in proc.stderr
    cli(lab, "guest", "stop", "n2")
    assert attached(lab, "n2") == [] and cli(lab, "region", "list") == []


def test_readme_nested_api_example(lab: dict[str, Any]) -> None:
    text = (REPO / "README.md").read_text()
    section = text.split("## Cloud VMs", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    env = {**os.environ, **lab["env"], "VMBEAM_STATE_DIR": str(lab["state"]),
           "VMBEAM_ACCEL": "tcg"}
    proc = subprocess.run([sys.executable, "-c", code.group(1)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    _total_ms, sent, detached = proc.stdout.splitlines()[0].split()
    assert int(sent) < MiB and detached == "True"
    assert "'running': True" in proc.stdout
    assert cli(lab, "region", "list") == [] and cli(lab, "guest", "list") == []


async def test_migration_stream_needs_the_key(lab: dict[str, Any], nested_guest: str) -> None:
    """A peer without this migration's pre-shared key cannot feed the destination."""
    async with Host(settings_of(lab)) as host:
        src_agent = host.cloud.agent(host.cloud.vm("l1a"))

        async def wrong_key(_dst: AgentClient) -> None:
            await src_agent.call("migration_tls", name=nested_guest, endpoint="client",
                                 key="00" * 32)

        with pytest.raises(MigrationError) as err, injected(before_switch=wrong_key):
            await host.cloud.migrate(nested_guest, "l1b")
        assert err.value.source_resumed and "TLS handshake failed" in str(err.value)
        rec = host.store.get_guest(nested_guest)
        assert rec.cloud_vm == "l1a"
        hb0 = await host.cloud.heartbeat(rec)
        hb1 = await host.cloud.wait_heartbeat(rec, hb0.seq if hb0 else -1, timeout=60)
        assert hb1 is not None and hb1.ok
        assert (await host.cloud.agent(host.cloud.vm("l1b")).call("ping"))["guests"] == []
    assert attached(lab, nested_guest) == ["l1a"]
    res = cli(lab, "migrate", nested_guest, "--to", "l1b")  # with the right key: fine
    assert res["tls"] is True and res["guest_ok"] is True


def test_cloud_vm_list(lab: dict[str, Any]) -> None:
    vms = cli(lab, "cloud-vm", "list")
    assert {(v["name"], v["tenant"], v["state"]) for v in vms} == {
        ("l1a", "tenant-a", "running"), ("l1b", "tenant-a", "running"),
        ("l1c", "tenant-b", "running")}
    assert len({v["ip"] for v in vms}) == 3


def test_cloud_vm_that_dies_is_reported_and_cleaned_up(lab: dict[str, Any]) -> None:
    """Last user of l1c: its QEMU is killed with a guest inside."""
    cli(lab, "guest", "start", "n3", "--cloud-vm", "l1c", "--memory", "128M")
    l1c = next(v for v in cli(lab, "cloud-vm", "list") if v["name"] == "l1c")
    os.kill(l1c["pid"], 9)
    time.sleep(0.5)
    l1c = next(v for v in cli(lab, "cloud-vm", "list") if v["name"] == "l1c")
    assert l1c["state"] == "lost" and l1c["regions"] == []
    st = cli(lab, "guest", "status", "n3")
    assert st["state"] == "lost" and st["alive"] is False
    assert attached(lab, "n3") == []  # the region went with the dead QEMU's fds
    proc = run_cli(lab["state"], "guest", "start", "n4", "--cloud-vm", "l1c", "--memory",
                   "128M", env=lab["env"])
    assert proc.returncode == 2 and "not running" in proc.stderr
    cli(lab, "guest", "stop", "n3")
    cli(lab, "cloud-vm", "stop", "l1c")
    assert "l1c" not in {v["name"] for v in cli(lab, "cloud-vm", "list")}
    links = subprocess.run(["ip", "-n", lab["env"]["VMBEAM_LAB_NS"], "-o", "link"],
                           capture_output=True, text=True, check=True).stdout
    assert "tap-l1c" not in links and cli(lab, "region", "list") == []


def http_get(lab: dict[str, Any], ip: str, tries: int = 30) -> str:
    """Fetch the Linux guest's page from the lab network's own endpoint (its namespace)."""
    code = (f"import urllib.request; print(urllib.request.urlopen('http://{ip}:8080/', "
            f"timeout=3).read().decode().strip())")
    last = ""
    for _ in range(tries):
        proc = subprocess.run(["ip", "netns", "exec", lab["env"]["VMBEAM_LAB_NS"],
                               sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout.strip()
        last = proc.stderr.strip().splitlines()[-1:]  # type: ignore[assignment]
        time.sleep(1)
    return f"unreachable: {last}"


@pytest.mark.timeout(1500)  # a Debian kernel under TCG inside TCG boots in ~5 minutes
def test_linux_guest_network_follows_the_move(lab: dict[str, Any], tmp_path: Path) -> None:
    """The Linux guest, with its disk workload on a beam disk (raw, in place), moves l1a >
    l1b > l1a: its address follows it, its kernel goes on writing the disk in each cloud VM,
    every block it acknowledged is in L0's file, which checks clean after the guest stops."""
    disk = tmp_path / "wl.raw"
    diskcheck.make_disk(disk, 32 * MiB)
    st = cli(lab, "guest", "start", "web", "--cloud-vm", "l1a", "--memory", "256M",
             "--image", "linux", "--touch", "20%", "--disk", str(disk), "--disk-in-place",
             timeout=1300)
    acked = 0
    try:
        ip = st["ip"].split("/")[0]
        assert ip and http_get(lab, ip) == "VMBEAM-LINUXGUEST"
        for dst in ("l1b", "l1a"):
            before = wait_disk_acks(lab, "web", acked)
            res = cli(lab, "migrate", "web", "--to", dst)
            assert res["guest_ok"] is True and res["ram_transferred_bytes"] < MiB
            assert res["disk_bytes_copied"] == 0
            assert http_get(lab, ip) == "VMBEAM-LINUXGUEST"  # same address, served from dst
            assert cli(lab, "guest", "status", "web")["cloud_vm"] == dst
            acked = wait_disk_acks(lab, "web", before)  # its kernel writes on, in dst
            verdict = diskcheck.check(diskcheck.read_file(disk), acked, settled=False)
            assert verdict.ok, verdict
    finally:
        cli(lab, "guest", "stop", "web")
    verdict = diskcheck.check(diskcheck.read_file(disk), acked, settled=False)
    assert verdict.ok, verdict
    clean, say = diskcheck.fsck(disk)
    assert clean, say


def wait_disk_acks(lab: dict[str, Any], guest: str, more_than: int) -> int:
    """The newest block the guest's disk workload made durable, once newer than given."""
    for _ in range(120):
        n = int(cli(lab, "guest", "status", guest)["disk_acks"].get("vmbeam-0", 0))
        if n > more_than:
            return n
        time.sleep(1)
    raise AssertionError(f"{guest}'s disk workload made nothing durable after {more_than}")


async def test_two_guests_into_one_cloud_vm_at_once(lab: dict[str, Any]) -> None:
    """Two moves into l1b overlap (one Host, as an API user would); a second command on a
    guest in flight is busy (exit 2) and changes nothing."""
    names = ("c1", "c2")
    async with Host(settings_of(lab)) as host:
        for n in names:
            await host.cloud.start_guest(n, "l1a", "128M", touch=70)
        for n in names:
            assert await host.cloud.wait_heartbeat(host.store.get_guest(n), timeout=120)
        moves = [asyncio.create_task(host.cloud.migrate(n, "l1b")) for n in names]
        await asyncio.sleep(0.3)  # both moves hold their guests' locks now
        with pytest.raises(GuestBusyError):
            await host.cloud.migrate("c1", "l1b")
        with pytest.raises(GuestBusyError):
            await host.stop_guest("c1")
        results = await asyncio.gather(*moves)
        assert all(r.guest_ok for r in results)
        assert [len(host.store.migrations(n)) for n in names] == [1, 1]  # refusals: none
        await host.disconnect()
    assert attached(lab, "c1") == ["l1b"] and attached(lab, "c2") == ["l1b"]
    for n in names:
        st = cli(lab, "guest", "status", n)
        assert st["run_state"] == "running" and st["memory_ok"] is True
        cli(lab, "guest", "stop", n)
    assert cli(lab, "region", "list") == []


@pytest.mark.parametrize("cpus", [2, 4, 8])
async def test_guest_moves_with_its_vcpus(lab: dict[str, Any], cpus: int) -> None:
    """``--cpus N`` reaches the L2 QEMU through the agent, and the incoming L2 in the
    destination cloud VM gets the same -smp (a 1-vCPU TCG cloud VM runs it all the same):
    there and back, asked of each L2 QEMU."""
    name = f"smp{cpus}"
    async with Host(settings_of(lab)) as host:
        rec = await host.cloud.start_guest(name, "l1a", "64M", touch=50, cpus=cpus)
        try:
            assert await host.cloud.wait_heartbeat(rec, timeout=120)
            assert len(await host.cloud.qmp(rec, "query-cpus-fast")) == cpus
            for dst in ("l1b", "l1a"):
                res = await host.cloud.migrate(name, dst)
                assert res.guest_ok and res.ram_transferred_bytes < MiB
                rec = host.store.get_guest(name)
                assert rec.cloud_vm == dst and rec.cpus == cpus
                assert len(await host.cloud.qmp(rec, "query-cpus-fast")) == cpus
            assert (await host.status(name)).cpus == cpus
        finally:
            await host.stop_guest(name)


def test_bench_nested_by_vcpus_and_disk(lab: dict[str, Any]) -> None:
    """bench nested --cpus 2 --disk-size 32M on the lab: zero-copy moves a 2-vCPU guest
    with a beam disk both ways, 0 disk bytes copied; precopy of it is refused (beam disks
    are not copied between cloud VMs yet), said in its row, not a crash."""
    rows = cli(lab, "bench", "nested", "--sizes", "128M", "--repeat", "2", "--cpus", "2",
               "--disk-size", "32M", timeout=900)
    by = {r["method"]: r for r in rows}
    zc, pre = by["zero-copy"], by["precopy"]
    assert zc["cpus"] == 2 and zc["disk_size_bytes"] == 32 * MiB and zc["repeats"] == 2
    assert zc["guest_ok"] and not zc["failures"] and zc["disk_bytes_copied"]["max"] == 0
    assert pre["failures"] and pre["failures"][0].startswith("refused")
    assert cli(lab, "region", "list") == [] and cli(lab, "guest", "list") == []


# -- patched QEMU (README "Patched QEMU"): run against stock QEMU these report the
# -- guarantee as missing (xfail) instead of passing or skipping silently.
async def _guarantees_of(host: Host, vm: str) -> Guarantees:
    return await guarantees(host.cloud.l1(host.cloud.vm(vm)).execute)


async def test_relocate_revokes_a_paused_source(lab: dict[str, Any], nested_guest: str) -> None:
    """A source cloud VM paused between switch and relocate (neither its agent nor its
    kernel can answer) loses the guest's memory at once; it ejects once resumed."""
    async with Host(settings_of(lab)) as host:
        if not (await _guarantees_of(host, "l1a")).revoke:
            pytest.xfail("guarantee missing: x-revoke-memory-backend (stock QEMU): "
                         "relocation needs the source cloud VM's help")
        src = host.cloud.vm("l1a")
        l1a = host.cloud.l1(src)
        rid = host.store.get_guest(nested_guest).region_id
        inode = await host.cloud.region_inode(src, rid)
        assert inode is not None and references(l1a.pid, inode)

        async def pause_source(_dst: AgentClient) -> None:
            await l1a.execute("stop")

        try:
            with injected(after_switch=pause_source):
                res = await host.cloud.migrate(nested_guest, "l1b")
            assert await l1a.run_state() == "paused"  # it stayed paused throughout
            assert res.guest_ok is True and res.source_detached is True
            assert res.source_revoked_ms is not None and res.source_revoked_ms < 1000
            assert res.source_ejected is False  # a paused L1 cannot acknowledge
            assert not references(l1a.pid, inode)  # L0's own look: no mapping, no fd
            assert "region" not in " ".join(res.guarantees_missing)
        finally:
            await l1a.execute("cont")
        # Resumed, l1a ejects the device and runs on; the guest can move back into it.
        assert await host.cloud.settle(host.cloud.vm("l1a"), rid, 60)
        assert (await host.cloud.agent(host.cloud.vm("l1a")).ping()).guests == []
        back = await host.cloud.migrate(nested_guest, "l1a")
        assert back.guest_ok is True and back.source_ejected is True


async def test_zero_copy_is_checked_by_qemu(lab: dict[str, Any], nested_guest: str) -> None:
    """Both L2 QEMUs prove, inside the migration stream, that l1b's BAR is l1a's memory."""
    async with Host(settings_of(lab)) as host:
        res = await host.cloud.migrate(nested_guest, "l1b")
        assert res.guest_ok is True
        if not res.shared_ram_checked:
            pytest.xfail(f"guarantee missing: {res.guarantees_missing}")
        assert res.guarantees_missing == []


async def test_pause_meter_across_the_lab_network(lab: dict[str, Any],
                                                  nested_guest: str) -> None:
    """The instrument for nested guests: ticks sent by the L2's QEMU inside a cloud VM,
    timestamped on L0 in the lab's namespace, read a deliberate stop (through the agent)
    within the times the stop can have lasted."""
    from vmbeam_kvm.ticks import CHARDEV_ID, TickMeter, null_backend, tcp_backend

    from .test_pause import _stop_for

    settings = settings_of(lab)
    async with Host(settings) as host:
        guest = await host.guest(nested_guest)
        gw = host.cloud.lab(host.cloud.vm("l1a")).gateway
        with TickMeter(gw, settings.lab_ns) as meter:
            await guest.qmp("chardev-change", {"id": CHARDEV_ID,
                                               "backend": tcp_backend(*meter.endpoint)})
            assert await meter.wait_after(time.time() + 0.3, 20)
            for _ in range(3):
                start = time.time()
                inner, outer = await _stop_for(guest.qmp, 0.2)
                assert await meter.wait_after(time.time() + 0.05, 10)
                gap = meter.longest_gap(start, time.time())
                assert gap is not None
                pause = (gap[1] - gap[0]) * 1000
                # Within what the stop can have lasted, give or take how much more the
                # L1's network stack (TCG) delays one tick than another (and one tick).
                assert inner * 1000 - 10 <= pause <= outer * 1000 + 10, (inner, outer, pause)
            await guest.qmp("chardev-change", {"id": CHARDEV_ID, "backend": null_backend()})
        res = await host.cloud.migrate(nested_guest, "l1b")
        assert res.guest_ok and res.pause_ms is not None
        await host.disconnect()
