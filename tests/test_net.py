"""Lab networks: real namespaces, bridges and taps via pyroute2's async API, removed without a
trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from vmbeam_kvm.errors import NetworkError
from vmbeam_kvm.net import LabNetwork

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
