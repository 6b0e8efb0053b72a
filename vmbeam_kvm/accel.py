"""Choosing the accelerator: KVM only where a real probe boots a guest with it quickly.

``/dev/kvm`` existing is not enough: on hosts with a software KVM flavour (``kvm_pvm``) an
ordinary guest does not boot at useful speed, so ``auto`` boots the tiny test guest under KVM
and takes KVM only if it prints its boot line within a few seconds. The verdict is cached per
kernel and QEMU binary.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

from .config import Accel
from .errors import BadInputError
from .heartbeat import read_status

PROBE_SECONDS = 5.0


def _probe_key(qemu: str) -> str:
    st = os.stat(qemu)
    return f"{os.uname().release}|{qemu}|{st.st_mtime_ns}"


async def probe_kvm(qemu: str, images_dir: Path, seconds: float = PROBE_SECONDS) -> bool:
    """Boot the test guest with ``-accel kvm``; True if it reports in within ``seconds``."""
    kernel = images_dir / "testguest.bin"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or not kernel.is_file():
        return False
    with tempfile.TemporaryDirectory(prefix="vmbeam-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        proc = await asyncio.create_subprocess_exec(
            qemu, "-nodefaults", "-no-user-config", "-display", "none", "-accel", "kvm",
            "-cpu", "host", "-machine", "q35", "-m", "64M", "-kernel", str(kernel),
            "-append", "touch=10", "-chardev", f"file,id=s0,path={serial}",
            "-serial", "chardev:s0", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + seconds
            while loop.time() < deadline and proc.returncode is None:
                if read_status(serial).heartbeat is not None:
                    return True
                await asyncio.sleep(0.1)
            return False
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def resolve_accel(choice: Accel, qemu: str, images_dir: Path, cache_dir: Path) -> str:
    """Turn an :class:`Accel` setting into the ``-accel`` value to use."""
    if choice is Accel.TCG:
        return "tcg"
    if choice is Accel.KVM:
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise BadInputError("--accel kvm requested but /dev/kvm is not usable")
        return "kvm"
    cache = cache_dir / "accel-probe.json"
    key = _probe_key(qemu)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return str(cached["accel"])
    except (OSError, ValueError):
        pass
    accel = "kvm" if await probe_kvm(qemu, images_dir) else "tcg"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "accel": accel}))
    return accel
