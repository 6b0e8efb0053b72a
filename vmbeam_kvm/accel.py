"""Choosing the accelerator: KVM only where it is measured to be clearly faster than TCG.

``/dev/kvm`` existing is not enough, and neither is "a guest boots under it": on hosts with a
software KVM flavour (``kvm_pvm``) the test guest boots in about 4 s and then pays about
0.4 ms for every page it touches first, some 50 times slower than TCG (docs/design.md §8). A
probe with a deadline near the measured boot time races (two probes in a row disagreed), so
``auto`` *measures*: it runs the same small piece of guest work — the test guest filling part
of 64 MiB and then running its mutation loop for a second — under TCG and under KVM, and takes
KVM only where both rates say so (:func:`decide`). The ratios seen are far from the
thresholds on both kinds of host, so the verdict does not flip with load.

Cloud VMs boot a Debian kernel, which ``kvm_pvm`` cannot run at all (it runs only PVM guest
kernels): they take KVM only where the guest verdict is KVM *and* ``/dev/kvm`` is a hardware
flavour (``kvm_intel``, ``kvm_amd``).

The verdict and its figures are cached in the state directory per kernel, QEMU binary and
``/dev/kvm`` flavour (``accel-probe.json``); ``vmbeam-kvm accel --json`` shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import Accel
from .errors import BadInputError
from .qemu.machine import GuestImage, MachineSpec, RamBackend, build_argv, kvm_cpu

# The probe's piece of work: a 64 MiB test guest touching a quarter of it (4,096 pages from
# 4 MiB up), then one second of its loop. TCG does it all in about 1.5 s here.
PROBE_MEMORY = 64 << 20
PROBE_TOUCH = 25
WORK_WINDOW = 1.0
# A run that has not finished its work by then is slower than TCG, whatever it would do later.
PROBE_DEADLINE = 20.0
# "Clearly faster": the loop at least twice TCG's rate, and touching new memory at no less
# than half TCG's rate (kvm_pvm here: about 0.02 of it; hardware KVM: above 1).
MIN_WORK_RATIO = 2.0
MIN_FILL_RATIO = 0.5
HARDWARE_FLAVOURS = ("kvm_intel", "kvm_amd")
CACHE_NAME = "accel-probe.json"

_BOOT_RE = re.compile(rb"^VMBEAM-\w+ boot\b", re.M)
_READY_RE = re.compile(rb"^READY pages=(\d+)(?: fill_ms=(\d+))?", re.M)
_HB_RE = re.compile(rb"^HB seq=\d+ round=(\d+) cursor=(\d+) bad=\d+ ok=([01])\s*$", re.M)


def kvm_flavour() -> str:
    """Which module provides ``/dev/kvm``: kvm_intel, kvm_amd, kvm_pvm, none or unknown."""
    if not os.path.exists("/dev/kvm"):
        return "none"
    for name in (*HARDWARE_FLAVOURS, "kvm_pvm"):
        if os.path.isdir(f"/sys/module/{name}"):
            return name
    return "unknown"


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


@dataclass(frozen=True)
class ProbeRun:
    """What one run of the probe's work measured under one accelerator."""

    accel: str
    completed: bool               # reached READY and ran its loop for the whole window
    ready_s: float | None = None  # from launch to READY (boot and fill: what a user waits)
    boot_s: float | None = None   # from launch to the boot line
    fill_pages_per_s: float | None = None  # pages touched first per second (guest's clock)
    work_steps_per_s: float | None = None  # loop steps per second of host time
    error: str = ""


@dataclass(frozen=True)
class AccelVerdict:
    """The accelerator ``auto`` means on this host, with the figures it was chosen from."""

    guest: str      # for guests on this host
    cloud_vm: str   # for cloud VMs (L1s boot a Debian kernel)
    reason: str
    cloud_vm_reason: str
    flavour: str
    key: str
    probed_at: float
    tcg: ProbeRun | None = None
    kvm: ProbeRun | None = None
    kvm_cpu: str = ""  # the -cpu KVM guests get here (machine.kvm_cpu); "" without KVM

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AccelVerdict:
        runs = {k: (None if data.get(k) is None else ProbeRun(**data[k]))
                for k in ("tcg", "kvm")}
        return cls(**{**data, **runs})


def decide(tcg: ProbeRun | None, kvm: ProbeRun | None, flavour: str) -> tuple[str, str, str, str]:
    """(guest accel, reason, cloud-VM accel, reason) from two probe runs: a pure rule."""
    if kvm is None:
        guest, why = "tcg", f"/dev/kvm is not usable (flavour {flavour})"
    elif not kvm.completed:
        guest, why = "tcg", f"KVM did not finish the probe's work: {kvm.error}"
    elif tcg is None or not tcg.completed:
        # TCG is the yardstick; without it KVM, which did the work, is the better bet.
        guest, why = "kvm", "KVM did the probe's work and TCG did not: " + (
            tcg.error if tcg else "not run")
    else:
        assert kvm.work_steps_per_s and tcg.work_steps_per_s
        assert kvm.fill_pages_per_s and tcg.fill_pages_per_s
        work = kvm.work_steps_per_s / tcg.work_steps_per_s
        fill = kvm.fill_pages_per_s / tcg.fill_pages_per_s
        figures = f"loop {work:.2f}x and memory first touched {fill:.3f}x TCG's rate"
        if work >= MIN_WORK_RATIO and fill >= MIN_FILL_RATIO:
            guest, why = "kvm", f"KVM is clearly faster: {figures}"
        else:
            guest, why = "tcg", (f"KVM is not clearly faster: {figures} (needs loop >= "
                                 f"{MIN_WORK_RATIO}x and first touch >= {MIN_FILL_RATIO}x)")
    if guest != "kvm":
        return guest, why, "tcg", "guests do not take KVM here either"
    if flavour not in HARDWARE_FLAVOURS:
        return guest, why, "tcg", (f"/dev/kvm is {flavour}: a cloud VM's Debian kernel cannot "
                                   f"boot under it (kvm_pvm runs only PVM guest kernels)")
    return guest, why, "kvm", f"/dev/kvm is {flavour} and KVM is faster for guests"


async def probe_run(accel: str, qemu: str, images_dir: Path,
                    deadline: float = PROBE_DEADLINE) -> ProbeRun:
    """Run the probe's work under ``accel`` and measure it (never raises for a slow or
    failing accelerator: that is a finding)."""
    spec = MachineSpec("accel-probe", PROBE_MEMORY, GuestImage.TEST, PROBE_TOUCH, accel, qemu,
                       images_dir, RamBackend.MEMFD, ticks=False)
    with tempfile.TemporaryDirectory(prefix="vmbeam-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        argv = build_argv(spec, qmp_path=Path(tmp) / "qmp.sock", serial_path=serial)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            return ProbeRun(accel, False, error=f"cannot run {qemu}: {exc.strerror}")
        try:
            return await _measure(accel, proc, serial, t0, deadline)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def _measure(accel: str, proc: asyncio.subprocess.Process, serial: Path, t0: float,
                   deadline: float) -> ProbeRun:
    loop = asyncio.get_running_loop()
    boot_t = ready_t = None
    pages = fill_ms = 0
    first: tuple[float, int] | None = None
    while True:
        now = loop.time()
        try:
            text = serial.read_bytes()
        except FileNotFoundError:
            text = b""
        if boot_t is None and _BOOT_RE.search(text):
            boot_t = now
        m = _READY_RE.search(text)
        if ready_t is None and m:
            ready_t, pages, fill_ms = now, int(m[1]), int(m[2] or 0)
        hbs = _HB_RE.findall(text) if ready_t is not None else []
        if hbs:
            rnd, cur, ok = hbs[-1]
            if ok != b"1":
                return ProbeRun(accel, False, error="the test guest reported bad memory")
            steps = int(rnd) * pages + int(cur)
            if first is None:
                first = (now, steps)
            elif now - first[0] >= WORK_WINDOW:
                assert boot_t is not None and ready_t is not None
                fill_s = fill_ms / 1000 if fill_ms else max(ready_t - boot_t, 0.01)
                return ProbeRun(accel, True, ready_s=round(ready_t - t0, 3),
                                boot_s=round(boot_t - t0, 3),
                                fill_pages_per_s=round(pages / max(fill_s, 0.001), 1),
                                work_steps_per_s=round((steps - first[1]) / (now - first[0]),
                                                       1))
        if proc.returncode is not None:
            err = b""
            if proc.stderr is not None:
                err = await proc.stderr.read()
            tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-2:])
            return ProbeRun(accel, False, error=f"QEMU exited ({proc.returncode}): "
                                                f"{tail or 'no message'}")
        if now - t0 > deadline:
            stage = ("no boot line" if boot_t is None else "not READY" if ready_t is None
                     else "loop not measured")
            return ProbeRun(accel, False, error=f"{stage} after {deadline:.0f} s")
        await asyncio.sleep(0.01)


# Bumped when the probe itself changes what it can find (2: KVM guests' -cpu is chosen by
# machine.kvm_cpu, so a host where `-cpu host` aborted is measured again).
PROBE_VERSION = 2


def probe_key(qemu: str) -> str:
    """What the verdict depends on: kernel, QEMU binary (path, size, mtime), KVM flavour."""
    real = os.path.realpath(qemu)
    st = os.stat(real)
    return (f"{os.uname().release}|{real}|{st.st_size}|{st.st_mtime_ns}|{kvm_flavour()}"
            f"|v{PROBE_VERSION}")


async def probe(qemu: str, images_dir: Path) -> AccelVerdict:
    """Measure both accelerators (one after the other: they would share the CPUs)."""
    flavour = kvm_flavour()
    key = probe_key(qemu)
    tcg = await probe_run("tcg", qemu, images_dir)
    kvm = await probe_run("kvm", qemu, images_dir) if kvm_usable() else None
    guest, why, cvm, cvm_why = decide(tcg, kvm, flavour)
    return AccelVerdict(guest, cvm, why, cvm_why, flavour, key, round(time.time(), 3), tcg, kvm,
                        kvm_cpu(qemu) if kvm is not None else "")


# One probe at a time in this process too: `lab up` boots its cloud VMs as tasks of one
# event loop, and a second flock by the same process on another fd would block that loop
# while the first task's probe awaits on it (a deadlock: make demo on a fresh state dir).
_PROBING: dict[tuple[int, str], asyncio.Lock] = {}


@contextlib.asynccontextmanager
async def _cache_lock(cache_dir: Path) -> AsyncIterator[None]:
    # Two commands starting at once on a fresh state dir probe once, not twice at a time.
    key = (id(asyncio.get_running_loop()), str(cache_dir))
    async with _PROBING.setdefault(key, asyncio.Lock()):
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_dir / f"{CACHE_NAME}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            # Another command's probe is waited for in a thread: this loop keeps running.
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def cached_verdict(qemu: str, cache_dir: Path) -> AccelVerdict | None:
    """The cached verdict for this kernel, QEMU and flavour, if there is one."""
    try:
        data = json.loads((cache_dir / CACHE_NAME).read_text())
        verdict = AccelVerdict.from_json(data)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return verdict if verdict.key == probe_key(qemu) else None


async def verdict(qemu: str, images_dir: Path, cache_dir: Path, *,
                  reprobe: bool = False) -> AccelVerdict:
    """The cached verdict, or a new probe's (written to the cache)."""
    if not reprobe and (found := cached_verdict(qemu, cache_dir)) is not None:
        return found
    async with _cache_lock(cache_dir):
        if not reprobe and (found := cached_verdict(qemu, cache_dir)) is not None:
            return found  # another command probed while we waited
        result = await probe(qemu, images_dir)
        tmp = cache_dir / f"{CACHE_NAME}.tmp"
        tmp.write_text(json.dumps(result.to_json(), indent=2))
        tmp.replace(cache_dir / CACHE_NAME)
        return result


async def resolve_accel(choice: Accel, qemu: str, images_dir: Path, cache_dir: Path, *,
                        cloud_vm: bool = False) -> str:
    """Turn an :class:`Accel` setting into the ``-accel`` value for a guest (or, with
    ``cloud_vm``, a cloud VM)."""
    if choice is Accel.TCG:
        return "tcg"
    if choice is Accel.KVM:
        if not kvm_usable():
            raise BadInputError("--accel kvm requested but /dev/kvm is not usable")
        if cloud_vm and (flavour := kvm_flavour()) not in HARDWARE_FLAVOURS:
            raise BadInputError(f"--accel kvm: /dev/kvm is {flavour}, under which a cloud "
                                f"VM's Debian kernel cannot boot (use --accel tcg or auto)")
        return "kvm"
    found = await verdict(qemu, images_dir, cache_dir)
    return found.cloud_vm if cloud_vm else found.guest
