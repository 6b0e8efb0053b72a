"""Lab networks: real namespaces, bridges and taps via pyroute2, removed without a trace."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from vmbeam_kvm.net import LabNetwork


@pytest.fixture
def lab() -> Iterator[LabNetwork]:
    net = LabNetwork(f"vbt-{os.getpid()}", "10.231.7.0/24")
    yield net
    net.destroy()
    assert not net.exists()


def test_bridge_taps_and_cleanup(lab: LabNetwork) -> None:
    lab.create()
    lab.create()  # idempotent
    lab.add_tap("tap-a")
    lab.add_tap("tap-b")
    assert sorted(lab.taps()) == ["tap-a", "tap-b"]
    out = subprocess.run(["ip", "-n", lab.ns, "-o", "link", "show", "master", "br0"],
                         capture_output=True, text=True, check=True).stdout
    assert "tap-a" in out and "tap-b" in out
    addr = subprocess.run(["ip", "-n", lab.ns, "-o", "addr", "show", "br0"],
                          capture_output=True, text=True, check=True).stdout
    assert f"{lab.gateway}/24" in addr
    # Nothing leaks into the host's own namespace.
    host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "tap-a" not in host_links
    lab.remove_tap("tap-a")
    assert lab.taps() == ["tap-b"]
    assert lab.address(1) == "10.231.7.2/24"
