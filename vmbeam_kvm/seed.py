"""A guest's cloud-init NoCloud seed: the user's user-data, meta-data naming the guest, and a
network config with its lab address, on a small FAT disk labelled ``CIDATA``.

cloud-init in Debian and Ubuntu cloud images finds a NoCloud datasource on any disk whose
file system is labelled ``cidata``/``CIDATA`` (vfat or iso9660). The seed is made with
Debian's tools (``mkfs.vfat`` from dosfstools, ``mcopy`` from mtools: no mount, no root) in
the guest's state directory and given to the guest as its last disk, behind an overlay like
any disk, so that it moves with the guest however its disks move and goes with it.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import uuid
from pathlib import Path

from .disks import supports_direct
from .errors import BadInputError, LaunchError
from .units import shown

SEED_FILE = "seed.raw"
SEED_KIB = 1024        # FAT16 of 1 MiB: room for any user-data accepted below
MAX_USER_DATA = 512 << 10


def read_user_data(path: str) -> str:
    """The user's user-data, checked (a readable UTF-8 file of at most 512 KiB that
    cloud-init would take: ``#cloud-config``, a script ``#!``, or another ``#`` part type).
    Raises BadInputError."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise BadInputError(f"--cloud-init {shown(path)}: {exc.strerror or exc}") from None
    if len(data) > MAX_USER_DATA:
        raise BadInputError(f"--cloud-init {shown(path)}: {len(data)} bytes, at most "
                            f"{MAX_USER_DATA} (a NoCloud seed is small)")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise BadInputError(f"--cloud-init {shown(path)}: not UTF-8 text") from None
    if not text.startswith("#"):
        raise BadInputError(f"--cloud-init {shown(path)}: user-data starts with "
                            f"'#cloud-config' (or '#!' for a script)")
    return text


def meta_data(name: str, instance: str) -> str:
    return f"instance-id: {instance}\nlocal-hostname: {name}\n"


def network_config(ip: str, gateway: str, mac: str) -> str:
    """Version 2 network config: the NIC with ``mac`` gets ``ip`` (address/prefix) and the
    default route. ``gateway4``, not ``routes``: Debian 12's cloud-init renders routes for
    ifupdown as ``route add`` (net-tools, not in a minimal image), a gateway as ifupdown's own
    ``gateway`` line; netplan (Ubuntu) takes either."""
    cfg = {"version": 2, "ethernets": {"lab0": {
        "match": {"macaddress": mac}, "set-name": "eth0", "addresses": [ip],
        "gateway4": gateway}}}
    return json.dumps(cfg, indent=1) + "\n"  # JSON is YAML


def make_seed(path: Path, *, name: str, instance: str, user_data: str,
              net: tuple[str, str, str] | None = None) -> Path:
    """Write the seed disk at ``path``; ``net``: (address/prefix, gateway, MAC) of the
    guest's NIC. Raises LaunchError (the tools failed)."""
    with tempfile.TemporaryDirectory() as t:
        files = {"user-data": user_data, "meta-data": meta_data(name, instance)}
        if net is not None:
            files["network-config"] = network_config(*net)
        for fname, text in files.items():
            (Path(t) / fname).write_text(text)
        path.unlink(missing_ok=True)
        for argv in (["mkfs.vfat", "-n", "CIDATA", "-C", str(path), str(SEED_KIB)],
                     ["mcopy", "-o", "-i", str(path), *(str(Path(t) / f) for f in files),
                      "::"]):
            try:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                     check=False)
            except FileNotFoundError:
                raise LaunchError(f"{argv[0]} is missing: run `make setup` "
                                  "(dosfstools, mtools)") from None
            if out.returncode != 0:
                raise LaunchError(f"{argv[0]} for {path}: {out.stderr.strip()}")
    return path


def seed_disk(guest_dir: Path, *, name: str, user_data: str,
              net: tuple[str, str, str] | None = None) -> tuple[Path, str, bool]:
    """Make the guest's seed in its state directory; returns it as a checked disk (path,
    format, O_DIRECT) to follow the user's disks."""
    path = make_seed(guest_dir / SEED_FILE, name=name, instance=f"vmbeam-{name}-{uuid.uuid4()}",
                     user_data=user_data, net=net)
    return path, "raw", supports_direct(path)
