"""Lab networks: real namespaces, bridges and taps via pyroute2's async API, removed without a
trace."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vmbeam_kvm import Settings
from vmbeam_kvm.errors import LabInUseError, NetworkError
from vmbeam_kvm.lab import lab_network
from vmbeam_kvm.net import LabNetwork

from .conftest import run_cli

NS = f"vbt-{os.getpid()}"
PEER = f"vbt-{os.getpid()}-peer"  # a second namespace, to send traffic over the bridge


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def netns_list() -> str:
    return ip("netns", "list")


def stats_bytes(ns: str, ifname: str) -> tuple[int, int]:
    """(rx, tx) bytes of ``ifname`` in ``ns`` as iproute2 reads them."""
    stats = json.loads(ip("-n", ns, "-j", "-s", "link", "show", "dev", ifname))[0]["stats64"]
    return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])


@pytest.fixture
async def lab() -> AsyncIterator[LabNetwork]:
    net = LabNetwork(NS, "10.231.7.0/24")
    assert NS not in netns_list()
    try:
        yield net
    finally:
        try:
            await net.destroy()
            assert not net.exists()
        finally:
            for ns in (NS, PEER):  # a failed destroy must not leak into later tests
                if ns in netns_list():
                    subprocess.run(["ip", "netns", "del", ns], check=False)
    assert NS not in netns_list() and PEER not in netns_list()


async def test_bridge_taps_and_cleanup(lab: LabNetwork) -> None:
    await lab.create()
    await lab.create()  # idempotent
    assert lab.exists()
    await lab.add_tap("tap-a")
    await lab.add_tap("tap-b")
    await lab.add_tap("tap-b")  # idempotent
    assert sorted(await lab.taps()) == ["tap-a", "tap-b"]
    out = ip("-n", lab.ns, "-o", "link", "show", "master", "br0")
    assert "tap-a" in out and "tap-b" in out
    for ifname in ("br0", "lo", "tap-a"):  # up (a tap has no carrier until QEMU opens it)
        assert ",UP" in ip("-n", lab.ns, "-o", "link", "show", ifname)
    addr = ip("-n", lab.ns, "-o", "-4", "addr", "show", "br0")
    assert f"{lab.gateway}/24" in addr
    await lab.create()  # again, with taps: the gateway is not added twice, taps stay
    assert ip("-n", lab.ns, "-o", "-4", "addr", "show", "br0").count(lab.gateway) == 1
    assert sorted(await lab.taps()) == ["tap-a", "tap-b"]
    # Nothing leaks into the host's own namespace.
    host_links = ip("-o", "link")
    assert "tap-a" not in host_links and "br0" not in host_links
    await lab.remove_tap("tap-a")
    await lab.remove_tap("tap-a")  # a missing tap is no failure
    assert await lab.taps() == ["tap-b"]
    assert lab.address(1) == "10.231.7.2/24"
    await lab.destroy()
    assert not lab.exists() and lab.ns not in netns_list()
    await lab.destroy()  # idempotent


async def test_link_bytes(lab: LabNetwork) -> None:
    await lab.create()
    await lab.add_tap("tap-a")
    # A tap no QEMU has opened has no carrier: nothing crossed it.
    assert await lab.link_bytes("tap-a") == 0 == sum(stats_bytes(lab.ns, "tap-a"))
    assert await lab.link_bytes("nope0") == 0  # missing interface
    # Real traffic: a veth from the bridge to a peer namespace, UDP from there to the
    # gateway (ARP and the datagrams in on vb-a, ARP replies and ICMP unreachables out).
    ip("netns", "add", PEER)
    ip("-n", lab.ns, "link", "add", "vb-a", "type", "veth", "peer", "name", "vb-b",
       "netns", PEER)
    ip("-n", lab.ns, "link", "set", "vb-a", "master", "br0", "up")
    ip("-n", PEER, "addr", "add", "10.231.7.50/24", "dev", "vb-b")
    ip("-n", PEER, "link", "set", "vb-b", "up")
    send = ("import socket, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for _ in range(10):\n"
            f"    s.sendto(b'x' * 1000, ('{lab.gateway}', 9))\n"
            "    time.sleep(0.02)\n")
    subprocess.run(["ip", "netns", "exec", PEER, sys.executable, "-c", send], check=True,
                   timeout=30)
    rx0, tx0 = stats_bytes(lab.ns, "vb-a")
    got = await lab.link_bytes("vb-a")
    rx1, tx1 = stats_bytes(lab.ns, "vb-a")
    assert rx0 >= 10 * 1000 and tx0 > 0  # both directions carried something
    assert rx0 + tx0 <= got <= rx1 + tx1  # rx + tx, of this interface, read just now


async def test_missing_namespace_is_not_created(lab: LabNetwork) -> None:
    """Reads and removals on a namespace that does not exist answer empty, and never create
    it (pyroute2 would, by default, on opening a socket there)."""
    assert not lab.exists()
    assert await lab.link_bytes("tap-a") == 0
    assert NS not in netns_list()
    assert await lab.taps() == []
    assert NS not in netns_list()
    await lab.remove_tap("tap-a")
    assert NS not in netns_list()
    with pytest.raises(NetworkError, match=rf"tap tap-a in namespace {NS}.*does not exist"):
        await lab.add_tap("tap-a")
    assert NS not in netns_list()
    await lab.destroy()
    assert not lab.exists()


async def test_errors_name_the_interface(lab: LabNetwork) -> None:
    await lab.create()
    with pytest.raises(NetworkError, match="invalid interface name 'tap-far-too-long'"):
        await lab.add_tap("tap-far-too-long")  # 16 bytes: the kernel takes 15
    ip("-n", lab.ns, "link", "del", "br0")
    with pytest.raises(NetworkError, match=rf"tap tap-a in namespace {NS}: there is no "
                                           rf"bridge br0"):
        await lab.add_tap("tap-a")
    assert await lab.taps() == []
    await lab.create()  # rebuilds the bridge in the existing namespace
    await lab.add_tap("tap-a")
    assert await lab.taps() == ["tap-a"]


# -- owners: a lab network belongs to one state directory ------------------------------------
async def test_another_owners_namespace_is_left_alone(lab: LabNetwork) -> None:
    """Two state directories pointed at one namespace: the second is refused before it
    touches anything, and its cleanup removes nothing of the first's."""
    a = LabNetwork(NS, lab.subnet, "/tmp/state-a")
    b = LabNetwork(NS, lab.subnet, "/tmp/state-b")
    await a.create()
    await a.add_tap("tap-a")
    assert await a.owner_of() == "/tmp/state-a" == await b.owner_of()
    assert "vmbeam-kvm lab of /tmp/state-a" in ip("-n", NS, "-d", "link", "show", "br0")
    with pytest.raises(LabInUseError, match=rf"lab namespace {NS} belongs to the lab of "
                                            r"state directory /tmp/state-a") as err:
        await b.create()
    assert (err.value.ns, err.value.owner, err.value.exit_code) == (NS, "/tmp/state-a", 2)
    assert not await b.destroy()  # not b's: it stays, with a's tap
    assert b.exists() and await a.taps() == ["tap-a"]
    assert await a.owner_of() == "/tmp/state-a"
    assert await b.check_built({"x": "tap-a"}) == [
        f"lab namespace {NS} belongs to state directory /tmp/state-a"]
    await a.create()  # its owner builds it again as often as it likes
    assert await a.destroy() and not a.exists()


async def test_unowned_namespaces(lab: LabNetwork) -> None:
    """A bridge that names no owner (a lab of an earlier release) is claimed; an ownerless
    namespace with nothing in it is anyone's to remove, one with interfaces is not."""
    ip("netns", "add", NS)
    assert await lab.owner_of() == ""
    ip("-n", NS, "link", "add", "br0", "type", "bridge")
    ip("-n", NS, "link", "add", "other0", "type", "veth", "peer", "name", "other1")
    mine = LabNetwork(NS, lab.subnet, "/tmp/state-a")
    assert not await mine.destroy() and mine.exists()  # holds something of someone's
    ip("-n", NS, "link", "del", "other0")
    await mine.create()  # claims the bridge
    assert await mine.owner_of() == "/tmp/state-a"
    assert await lab.destroy() and not lab.exists()  # an owner-less handle: no checks


async def test_check_built_names_what_is_missing(lab: LabNetwork) -> None:
    net = LabNetwork(NS, lab.subnet, "/tmp/state-a")
    taps = {"vm1": "tap-vm1", "vm2": "tap-vm2"}
    assert await net.check_built(taps) == [
        f"lab namespace {NS} of vm1, vm2 is gone (removed by something other than this "
        f"state directory's `lab down`)"]
    await net.create()
    await net.add_tap("tap-vm1")
    await net.add_tap("tap-vm2")
    assert await net.check_built(taps) == []
    ip("-n", NS, "link", "set", "tap-vm2", "nomaster")
    ip("-n", NS, "link", "del", "tap-vm1")
    assert await net.check_built(taps) == [
        f"tap tap-vm1 of cloud VM vm1 is missing from lab namespace {NS}",
        f"tap tap-vm2 of cloud VM vm2 is not on bridge br0 of lab namespace {NS}"]
    ip("-n", NS, "link", "del", "br0")
    assert await net.check_built(taps) == [f"bridge br0 is missing from lab namespace {NS}"]


def test_each_state_dir_has_a_namespace_of_its_own(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMBEAM_LAB_NS", raising=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    a, b = Settings(state_dir=tmp_path / "a"), Settings(state_dir=tmp_path / "b")
    assert a.lab_namespace != b.lab_namespace
    assert re.fullmatch(r"vmbeam-lab-[0-9a-f]{10}", a.lab_namespace)
    # One state directory however it is spelled: one lab, one owner.
    alias = Settings(state_dir=tmp_path / "link")
    assert (alias.lab_namespace, alias.lab_owner) == (a.lab_namespace, str(tmp_path / "a"))
    assert lab_network(a) == LabNetwork(a.lab_namespace, a.lab_subnet, str(tmp_path / "a"))
    monkeypatch.setenv("VMBEAM_LAB_NS", "")  # empty means unset
    assert Settings(state_dir=tmp_path / "a").lab_namespace == a.lab_namespace
    monkeypatch.setenv("VMBEAM_LAB_NS", "vbt-explicit")  # an override, as tests set it
    assert Settings(state_dir=tmp_path / "a").lab_namespace == "vbt-explicit"


async def test_commands_on_another_owners_namespace_change_nothing(lab: LabNetwork,
                                                                   state_dir: Path) -> None:
    """`lab up` and `cloud-vm start` pointed at another state directory's lab namespace: exit
    2, one line, nothing recorded or created in this state directory or that namespace."""
    def snapshot() -> list[str]:  # the files; the store's rows are read below
        return sorted(str(p.relative_to(state_dir)) for p in state_dir.rglob("*")
                      if not p.name.startswith("state.db-"))

    other = LabNetwork(NS, lab.subnet, "/tmp/state-other")
    await other.create()
    await other.add_tap("tap-x")
    env = {"VMBEAM_LAB_NS": NS, "VMBEAM_LAB_SUBNET": lab.subnet}
    run_cli(state_dir, "guest", "list", env=env)  # the store exists: compare it, not its birth
    before = snapshot()
    for args in (["lab", "up"], ["cloud-vm", "start", "c1", "--tenant", "t"]):
        proc = run_cli(state_dir, *args, "--json", env=env, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert json.loads(proc.stdout)["error_type"] == "LabInUseError"
        assert proc.stderr.count("vmbeam-kvm: error:") == 1
        assert snapshot() == before
        assert json.loads(run_cli(state_dir, "cloud-vm", "list", "--json", env=env).stdout) == []
        assert await other.owner_of() == "/tmp/state-other" and await other.taps() == ["tap-x"]
    down = run_cli(state_dir, "lab", "down", "--json", env=env, timeout=60)
    assert json.loads(down.stdout) == {"status": "down", "namespaces_removed": []}
    assert other.exists()
