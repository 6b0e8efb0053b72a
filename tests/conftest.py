"""Shared fixtures: a private state directory and Host per test, real QEMU under TCG."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

# Imported here, at collection, on purpose: hypothesis's pytest plugin imports it at the end
# of a session that did not, and pytest's assertion rewriting of it then hits CPython
# 3.11.7's "AST constructor recursion depth mismatch" (SystemError, exit 1 after a green run).
import hypothesis  # noqa: F401
import pytest

from vmbeam_kvm import Accel, Guest, Host, Settings

STATE_PREFIX = "vbt-"
REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "vmbeam_kvm.cli"]
# Open fds when the suite starts, so the last test can prove none leaked.
FD_BASELINE = set(os.listdir("/proc/self/fd"))


def qemu_pids(marker: str) -> list[int]:
    """Live QEMU processes whose command line mentions ``marker`` (a state dir path)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if b"qemu-system" in cmd and marker.encode() in cmd and ") Z" not in stat:
            pids.append(int(entry.name))
    return pids


def assert_same_bytes(got: bytes, want: bytes | bytearray) -> None:
    """A disk read back holds exactly what it must (the first differing offset if not)."""
    assert len(got) == len(want)
    if got != want:
        bad = next(i for i in range(len(got)) if got[i] != want[i])
        pytest.fail(f"disk differs at offset {bad}: {got[bad]:#x} != {want[bad]:#x}")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Short path under /tmp: QMP sockets live here (108-byte sun_path limit).
    path = Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def settings(state_dir: Path) -> Settings:
    return Settings(state_dir=state_dir, accel=Accel.TCG)


@contextlib.asynccontextmanager
async def open_host(settings: Settings) -> AsyncIterator[Host]:
    """A Host that stops everything it holds on exit, and proves no QEMU was left."""
    try:
        async with Host(settings) as h:
            try:
                yield h
            finally:
                await h.stop_all()
    finally:
        # Also when the test or stop_all failed: a leaked TCG guest slows every later test.
        leftover = qemu_pids(str(settings.state_dir))
        for pid in leftover:
            os.kill(pid, 9)
    assert not leftover, f"QEMU processes left behind: {leftover}"


@pytest.fixture
async def host(settings: Settings) -> AsyncIterator[Host]:
    async with open_host(settings) as h:
        yield h


@pytest.fixture(scope="session")
def kvm_runs() -> str:
    """Skip, with the reason, unless ``/dev/kvm`` runs the test guest at all (even slowly,
    as ``kvm_pvm`` does): the KVM tests (``pytest -k kvm``) run wherever it does."""
    from vmbeam_kvm.accel import kvm_flavour, kvm_usable, probe_run

    if not kvm_usable():
        pytest.skip(f"/dev/kvm is not usable here (flavour {kvm_flavour()})")
    s = Settings()
    run = asyncio.run(probe_run("kvm", s.resolve_qemu(), s.images_dir, deadline=60))
    if not run.completed:
        pytest.skip(f"/dev/kvm ({kvm_flavour()}) cannot run the test guest: {run.error}")
    return kvm_flavour()


@pytest.fixture
async def kvm_host(kvm_runs: str, state_dir: Path) -> AsyncIterator[Host]:
    """A Host whose guests run under ``-accel kvm`` (see :func:`kvm_runs`)."""
    async with open_host(Settings(state_dir=state_dir, accel=Accel.KVM)) as h:
        yield h


@pytest.fixture
async def guest(host: Host) -> AsyncIterator[Guest]:
    """A running 256 MiB test guest, 70 % of its RAM filled and mutating."""
    async with await host.start_guest("g1", "256M", touch=70) as g:
        await g.wait_ready(timeout=60)
        yield g


def run_cli(state_dir: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "VMBEAM_STATE_DIR": str(state_dir), "VMBEAM_ACCEL": "tcg",
                **(env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPO)


# -- the lab of cloud VMs (one per test module that asks for it) ---------------------------
@pytest.fixture(scope="module")
def lab() -> Iterator[dict[str, Any]]:
    state = Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir="/tmp"))
    env = {"VMBEAM_LAB_NS": f"vbt-lab-{os.getpid()}", "VMBEAM_LAB_SUBNET": "10.231.9.0/24"}
    info: dict[str, Any] = {"state": state, "env": env}
    try:
        proc = run_cli(state, "lab", "up", "--json", env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["cloud_vms"] == {"tenant-a": ["l1a", "l1b"], "tenant-b": ["l1c"]}
        info["lab"] = out
        yield info
    finally:
        down = run_cli(state, "lab", "down", "--json", env=env, timeout=300)
        leftover = qemu_pids(str(state))
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        shutil.rmtree(state, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        assert leftover == [], "lab down left QEMU processes"
        assert env["VMBEAM_LAB_NS"] not in netns, "lab down left its namespace"


def cli(lab: dict[str, Any], *args: str, rc: int = 0, timeout: float = 300) -> Any:
    proc = run_cli(lab["state"], *args, "--json", env=lab["env"], timeout=timeout)
    assert proc.returncode == rc, proc.stderr
    return json.loads(proc.stdout)


def settings_of(lab: dict[str, Any]) -> Settings:
    return Settings(state_dir=lab["state"], accel=Accel.TCG, lab_ns=lab["env"]["VMBEAM_LAB_NS"],
                    lab_subnet=lab["env"]["VMBEAM_LAB_SUBNET"])


def attached(lab: dict[str, Any], guest: str) -> list[str]:
    regions = cli(lab, "region", "list")
    return [vm for r in regions if r["guest"] == guest for vm in r["attached_to"]]
