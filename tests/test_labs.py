"""Two labs side by side, and cloud VMs that are busy while a move uses them (issue 15,
findings 5 and 6).

Lab A is the module's lab (conftest ``lab``: l1a, l1b, l1c); a second state directory B gets
one cloud VM at most (TCG cloud VMs are costly on two cores). B's cloud VM has A's names on
purpose — cloud VM ``l1a``, tap ``tap-l1a``, A's subnet and so A's l1a address — each in its
own namespace.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmbeam_kvm import Host, Settings
from vmbeam_kvm.agent.protocol import AgentClient
from vmbeam_kvm.migrate.faults import injected

from .conftest import STATE_PREFIX, cli, qemu_pids, run_cli, settings_of

TENANT_A = ("l1a", "l1b")


def netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def links(ns: str) -> str:
    return subprocess.run(["ip", "-n", ns, "-d", "-o", "link"], capture_output=True,
                          text=True, check=True).stdout


def assert_lab_a_whole(lab: dict[str, Any]) -> None:
    """A's namespace, bridge (naming A as its owner) and the taps of its three cloud VMs,
    each on the bridge, as iproute2 sees them; and the cloud VMs running."""
    ns = lab["env"]["VMBEAM_LAB_NS"]
    assert ns in netns_list(), "lab A's namespace is gone"
    have = links(ns)
    assert f"vmbeam-kvm lab of {Path(lab['state']).resolve()}" in have
    for vm in ("l1a", "l1b", "l1c"):
        line = next((x for x in have.splitlines() if f": tap-{vm}:" in x), "")
        assert "master br0" in line, f"tap-{vm} of lab A is missing or off its bridge"
    assert {v["name"]: v["state"] for v in cli(lab, "cloud-vm", "list")} == {
        "l1a": "running", "l1b": "running", "l1c": "running"}


def one_error_line(proc: subprocess.CompletedProcess[str]) -> None:
    errors = [x for x in proc.stderr.splitlines() if x.startswith("vmbeam-kvm: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr


def move_on(lab: dict[str, Any], name: str) -> None:
    """Move guest ``name`` to the other cloud VM of tenant-a: it arrives running, memory
    good (A's lab still carries moves)."""
    src = cli(lab, "guest", "status", name)["cloud_vm"]
    dst = TENANT_A[1 - TENANT_A.index(src)]
    res = cli(lab, "migrate", name, "--to", dst)
    assert res["status"] == "completed" and res["guest_ok"] is True
    assert (res["source_cloud_vm"], res["dest_cloud_vm"]) == (src, dst)
    st = cli(lab, "guest", "status", name)
    assert st["cloud_vm"] == dst and st["run_state"] == "running" and st["memory_ok"] is True


@pytest.fixture(scope="module")
def guest_a(lab: dict[str, Any]) -> Iterator[str]:
    """Guest t of lab A, in l1b (as in finding 5)."""
    st = cli(lab, "guest", "start", "t", "--cloud-vm", "l1b", "--memory", "128M")
    assert st["memory_ok"] is True
    yield "t"
    cli(lab, "guest", "stop", "t")


@pytest.fixture
def state_b() -> Iterator[Path]:
    """A second state directory; whatever of it a test leaves is removed, and reported."""
    path = Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir="/tmp"))
    ns = Settings(state_dir=path, lab_ns="").lab_namespace
    try:
        yield path
    finally:
        leftover = qemu_pids(str(path))
        for pid in leftover:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        left_ns = ns in netns_list()
        if left_ns:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(path, ignore_errors=True)
    assert not leftover and not left_ns, f"state dir B left {leftover}, namespace {left_ns}"


def test_second_state_dir_on_the_same_namespace_is_refused(lab: dict[str, Any], guest_a: str,
                                                           state_b: Path) -> None:
    """Finding 5: B's `lab up` on the namespace A's lab runs in used to fail on A's busy
    taps and then delete A's namespace (A's next move: "No route to host"). Now B is
    refused before it touches anything, B's `lab down` leaves A's lab be, and A moves on."""
    env_b = dict(lab["env"])  # A's namespace and subnet, as the one global default was
    up = run_cli(state_b, "lab", "up", "--json", env=env_b, timeout=300)
    assert_lab_a_whole(lab)
    assert up.returncode == 2, up.stderr
    err = json.loads(up.stdout)
    assert err["error_type"] == "LabInUseError"
    assert f"belongs to the lab of state directory {Path(lab['state']).resolve()}" in err["error"]
    one_error_line(up)
    assert qemu_pids(str(state_b)) == []
    down = run_cli(state_b, "lab", "down", "--json", env=env_b, timeout=300)
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout) == {"status": "down", "namespaces_removed": []}
    assert_lab_a_whole(lab)
    move_on(lab, guest_a)


def test_two_labs_side_by_side(lab: dict[str, Any], guest_a: str, state_b: Path) -> None:
    """B, on its own namespace (named after its state directory), runs a cloud VM with A's
    names and address beside A; B's `lab up` checks what B's cloud VMs rely on (finding 5:
    it reported success on an empty namespace); B's `lab down` removes only what is B's."""
    env_b = {"VMBEAM_LAB_NS": "", "VMBEAM_LAB_SUBNET": lab["env"]["VMBEAM_LAB_SUBNET"]}
    ns_a, ns_b = lab["env"]["VMBEAM_LAB_NS"], Settings(state_dir=state_b, lab_ns="").lab_namespace
    start = run_cli(state_b, "cloud-vm", "start", "l1a", "--tenant", "tenant-a", "--json",
                    env=env_b, timeout=400)
    assert start.returncode == 0, start.stderr
    vm_b = json.loads(start.stdout)
    vm_a = next(v for v in cli(lab, "cloud-vm", "list") if v["name"] == "l1a")
    assert (vm_b["namespace"], vm_a["namespace"]) == (ns_b, ns_a) and ns_a != ns_b
    assert vm_b["tap"] == vm_a["tap"] == "tap-l1a" and vm_b["ip"] == vm_a["ip"]
    have_b = links(ns_b)
    assert f"vmbeam-kvm lab of {state_b.resolve()}" in have_b
    assert "tap-l1a" in have_b and "tap-l1b" not in have_b  # B's own, and only B's
    assert_lab_a_whole(lab)
    move_on(lab, guest_a)  # A carries moves while B runs beside it

    # B's namespace removed behind B's back (finding 5's "empty namespace"): lab up sees
    # it, says what is gone, and boots nothing.
    subprocess.run(["ip", "netns", "del", ns_b], check=True)
    pids = qemu_pids(str(state_b))
    up = run_cli(state_b, "lab", "up", "--json", env=env_b, timeout=300)
    assert up.returncode == 2, up.stderr
    err = json.loads(up.stdout)
    assert err["error_type"] == "LabDamagedError"
    one_error_line(up)
    assert f"lab namespace {ns_b} of l1a is gone" in err["error"] and "lab down" in err["error"]
    assert qemu_pids(str(state_b)) == pids and ns_b not in netns_list()

    down = run_cli(state_b, "lab", "down", "--json", env=env_b, timeout=300)
    assert down.returncode == 0, down.stderr
    assert qemu_pids(str(state_b)) == []
    assert_lab_a_whole(lab)
    move_on(lab, guest_a)


async def test_cloud_vm_stop_during_a_move_is_busy(lab: dict[str, Any], guest_a: str) -> None:
    """Finding 6: `cloud-vm stop l1b` while a move placed the guest in l1b quit l1b beneath
    it (both exit 0, then the guest was lost). Now stopping either end, or starting a cloud
    VM of the destination's name, is refused (exit 2, one line) while the move runs, and the
    move ends with the guest running in the destination, memory good.

    The stops run as CLI commands at the end of prepare (the destination L2 waits for the
    stream there): a fault hook holds the move until they have answered."""
    seen: dict[str, subprocess.CompletedProcess[str]] = {}

    async with Host(settings_of(lab)) as host:
        src = host.store.get_guest(guest_a).cloud_vm
        dst = TENANT_A[1 - TENANT_A.index(src)]

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return run_cli(lab["state"], *args, "--json", env=lab["env"], timeout=120)

        async def try_to_stop(_dst: AgentClient) -> None:
            for vm in (dst, src):
                seen[vm] = await asyncio.to_thread(run, "cloud-vm", "stop", vm)
                if seen[vm].returncode != 2:
                    return  # it went: the assertions below say so (no second one)
            seen["start"] = await asyncio.to_thread(run, "cloud-vm", "start", dst,
                                                    "--tenant", "tenant-a")

        with injected(before_switch=try_to_stop):
            res = await host.cloud.migrate(guest_a, dst)
        await host.disconnect()
    for vm in (dst, src):
        proc = seen[vm]
        assert proc.returncode == 2, proc.stderr
        err = json.loads(proc.stdout)
        assert err["error_type"] == "CloudVMBusyError"
        assert err["error"] == (f"cloud VM {vm!r} is busy: a move of {guest_a} into or out "
                                f"of it is running; try again when it has ended")
        one_error_line(proc)
    assert seen["start"].returncode == 2, seen["start"].stderr
    assert res.guest_ok is True and res.dest_cloud_vm == dst
    st = cli(lab, "guest", "status", guest_a)
    assert st["cloud_vm"] == dst and st["run_state"] == "running" and st["memory_ok"] is True
    assert_lab_a_whole(lab)
    move_on(lab, guest_a)  # nothing of the move was left holding a cloud VM
