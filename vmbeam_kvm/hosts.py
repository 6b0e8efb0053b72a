"""Other L0 hosts: a control connection over OpenSSH, each host known by its identity.

A secondary provider's cloud VMs may sit on more than one IaaS host. Like libvirt's
``qemu+ssh://``, vmbeam-kvm reaches another host only through OpenSSH — key authentication,
the host key pinned when the host is added, ``BatchMode`` so nothing ever prompts — and runs
that host's own ``vmbeam-kvm`` there, which answers in JSON. No daemon or protocol of our own
listens on any network.

Every L0 has an identity: ``/etc/machine-id``, the kernel's boot id and the id of its state
store (a UUID made once per state directory), so that two state directories on one machine
are two L0s (the tests and the demo run two "hosts" on one machine). Co-location — whether a
guest's memory can be shared rather than copied — is decided from identities, never from a
name or an address.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import BadInputError, HostError
from .units import shown

SSH_CONNECT_TIMEOUT = 10
REMOTE_TIMEOUT = 120.0
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


@dataclass(frozen=True)
class HostIdentity:
    """Who an L0 is (``co_located`` compares these, nothing else)."""

    machine_id: str
    boot_id: str
    store_id: str
    hostname: str = ""

    def same_l0(self, other: HostIdentity) -> bool:
        return (self.machine_id, self.boot_id, self.store_id) == (
            other.machine_id, other.boot_id, other.store_id)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def local_identity(state_dir: Path) -> HostIdentity:
    """This L0's identity (the store id is made on first use and kept in the state dir)."""
    id_file = state_dir / "host-id"
    try:
        store_id = id_file.read_text().strip()
    except FileNotFoundError:
        store_id = ""
    if not store_id:
        store_id = str(uuid.uuid4())
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(store_id + "\n")
        os.replace(tmp, id_file)  # atomic: two first commands agree on one id
        store_id = id_file.read_text().strip()
    return HostIdentity(_read("/etc/machine-id"), _read("/proc/sys/kernel/random/boot_id"),
                        store_id, socket.gethostname())


@dataclass(frozen=True)
class SshTarget:
    """Where a host's control connection goes: ``ssh://[USER@]ADDR[:PORT]``."""

    user: str
    address: str
    port: int

    @classmethod
    def parse(cls, url: str) -> SshTarget:
        if not isinstance(url, str):
            raise BadInputError(f"invalid host URL {shown(url)}")
        parts = urlsplit(url)
        try:
            port = parts.port or 22
        except ValueError:
            raise BadInputError(f"invalid port in {shown(url)}") from None
        if (parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/")
                or parts.query or parts.fragment or parts.password is not None):
            raise BadInputError(f"invalid host URL {shown(url)}: use ssh://[USER@]ADDR[:PORT]")
        user = parts.username or "root"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", user):
            raise BadInputError(f"invalid user name in {shown(url)}")
        return cls(user, parts.hostname, port)

    @property
    def url(self) -> str:
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return f"ssh://{self.user}@{addr}:{self.port}"


@dataclass
class HostRecord:
    """A host added with ``host add`` (the store's ``hosts`` table)."""

    name: str
    url: str
    fingerprint: str      # SHA256 fingerprint(s) of the pinned host key(s)
    machine_id: str
    boot_id: str
    store_id: str
    hostname: str = ""
    identity_file: str = ""   # the private key ssh offers ("" = ssh's defaults)
    remote_command: str = "vmbeam-kvm"
    added_at: float = 0.0

    @property
    def identity(self) -> HostIdentity:
        return HostIdentity(self.machine_id, self.boot_id, self.store_id, self.hostname)


def check_host_name(name: object) -> str:
    if not isinstance(name, str) or not _HOST_RE.fullmatch(name):
        raise BadInputError(f"invalid host name {shown(name)}: use 1-32 letters, digits, "
                            f"'.', '_' or '-', starting with a letter or digit")
    return name


class Remote:
    """The control connection to one host: its own vmbeam-kvm over ssh, JSON answers."""

    def __init__(self, name: str, target: SshTarget, known_hosts: Path, *,
                 identity_file: str = "", remote_command: str = "vmbeam-kvm") -> None:
        self.name, self.target, self.known_hosts = name, target, known_hosts
        self.identity_file, self.remote_command = identity_file, remote_command

    def ssh_argv(self, *remote: str) -> list[str]:
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", f"HostKeyAlias={alias(self.name)}",
                "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT}", "-o", "ServerAliveInterval=5",
                "-o", "ServerAliveCountMax=3", "-p", str(self.target.port),
                "-l", self.target.user]
        if self.identity_file:
            argv += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        # ssh joins the remote words into one shell line: quote each.
        return [*argv, self.target.address, "--",
                " ".join([self.remote_command, *(shlex.quote(w) for w in remote)])]

    async def call(self, *args: str, timeout: float = REMOTE_TIMEOUT) -> Any:
        """Run ``vmbeam-kvm ARGS --json`` on the host; its JSON answer, or HostError."""
        proc = await asyncio.create_subprocess_exec(
            *self.ssh_argv(*args, "--json"), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise HostError(f"host {self.name}: no answer within {timeout:.0f} s",
                            host=self.name) from None
        text = err.decode(errors="replace").strip()
        try:
            answer = json.loads(out) if out.strip() else None
        except ValueError:
            answer = None
        if proc.returncode == 255:  # ssh's own failure: connection, host key, authentication
            raise HostError(f"host {self.name}: ssh to {self.target.url} failed: "
                            f"{text.splitlines()[-1] if text else 'no message'}",
                            host=self.name, ssh_failed=True)
        if proc.returncode != 0:
            msg = answer.get("error") if isinstance(answer, dict) else None
            raise HostError(f"host {self.name}: `{' '.join(args)}` failed (exit "
                            f"{proc.returncode}): {msg or text or 'no message'}",
                            host=self.name, remote_exit_code=proc.returncode or 0,
                            remote_type=(answer or {}).get("error_type", "")
                            if isinstance(answer, dict) else "")
        return answer

    async def identity(self) -> HostIdentity:
        data = await self.call("host", "identity")
        try:
            return HostIdentity(str(data["machine_id"]), str(data["boot_id"]),
                                str(data["store_id"]), str(data.get("hostname", "")))
        except (TypeError, KeyError):
            raise HostError(f"host {self.name}: `host identity` gave no identity: "
                            f"{shown(data)}", host=self.name) from None


def alias(name: str) -> str:
    """The name ssh pins a host's key under (never its address, which may change)."""
    return f"vmbeam-{name}"


async def scan_host_key(target: SshTarget, name: str) -> tuple[list[str], str]:
    """The host's public keys as known_hosts lines under :func:`alias`, and their SHA256
    fingerprints (trust on first use, like ``ssh`` asking once; ``--host-key`` avoids it)."""
    proc = await asyncio.create_subprocess_exec(
        "ssh-keyscan", "-T", str(SSH_CONNECT_TIMEOUT), "-p", str(target.port), target.address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    keys = [line.split(None, 1)[1] for line in out.decode().splitlines()
            if line and not line.startswith("#") and len(line.split()) >= 3]
    if not keys:
        raise HostError(f"host {name}: no SSH host key from {target.url} "
                        f"({err.decode(errors='replace').strip() or 'no answer'})", host=name,
                        ssh_failed=True)
    lines = [f"{alias(name)} {k}" for k in keys]
    return lines, await fingerprints(lines)


async def fingerprints(known_hosts_lines: list[str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        "ssh-keygen", "-l", "-E", "sha256", "-f", "-", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate("\n".join(known_hosts_lines).encode() + b"\n")
    return ",".join(sorted({f.split()[1] for f in out.decode().splitlines() if f.strip()}))


class Hosts:
    """The hosts this L0 knows (``host add/list/remove``), pinned keys in the state dir."""

    def __init__(self, store: Any, state_dir: Path) -> None:
        self.store, self.state_dir = store, state_dir
        self.known_hosts = state_dir / "hosts" / "known_hosts"

    def remote(self, rec: HostRecord) -> Remote:
        return Remote(rec.name, SshTarget.parse(rec.url), self.known_hosts,
                      identity_file=rec.identity_file, remote_command=rec.remote_command)

    def _write_pins(self, name: str, lines: list[str] | None) -> None:
        """Replace ``name``'s pinned keys (None: remove them), atomically."""
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        try:
            old = self.known_hosts.read_text().splitlines()
        except FileNotFoundError:
            old = []
        keep = [ln for ln in old if ln.split(None, 1)[0] != alias(name)]
        tmp = self.known_hosts.with_suffix(".tmp")
        tmp.write_text("".join(f"{ln}\n" for ln in keep + (lines or [])))
        os.replace(tmp, self.known_hosts)

    async def add(self, name: str, url: str, *, identity_file: str = "",
                  remote_command: str = "vmbeam-kvm",
                  host_key: str | None = None) -> HostRecord:
        """Pin the host's key, ask it who it is, record it; nothing is kept on failure."""
        check_host_name(name)
        target = SshTarget.parse(url)
        if identity_file and not os.path.isfile(identity_file):
            raise BadInputError(f"identity file {shown(identity_file)} does not exist")
        if not isinstance(remote_command, str) or not remote_command.strip():
            raise BadInputError("the remote command is empty")
        if self.store.find_host(name) is not None:
            raise BadInputError(f"a host named {name!r} already exists")
        if host_key is not None:
            lines = [f"{alias(name)} {k.strip()}" for k in host_key.splitlines() if k.strip()]
            fp = await fingerprints(lines)
            if not fp:
                raise BadInputError(f"--host-key: not an SSH public key: {shown(host_key)}")
        else:
            lines, fp = await scan_host_key(target, name)
        self._write_pins(name, lines)
        try:
            ident = await Remote(name, target, self.known_hosts, identity_file=identity_file,
                                 remote_command=remote_command).identity()
            rec = HostRecord(name, target.url, fp, ident.machine_id, ident.boot_id,
                             ident.store_id, ident.hostname, identity_file, remote_command,
                             time.time())
            self.store.add_host(rec)
        except BaseException:
            self._write_pins(name, None)
            raise
        return rec

    def remove(self, name: str) -> None:
        if self.store.find_host(name) is None:
            raise BadInputError(f"no host named {shown(name)}")
        self.store.remove_host(name)
        self._write_pins(name, None)

    async def status(self, rec: HostRecord, here: HostIdentity) -> dict[str, Any]:
        """What ``host list`` shows of one host: asked now, against what was recorded."""
        out: dict[str, Any] = {"name": rec.name, "url": rec.url,
                               "fingerprint": rec.fingerprint, "identity": rec.identity.to_json(),
                               "co_located": rec.identity.same_l0(here)}
        try:
            now = await self.remote(rec).identity()
        except HostError as exc:
            out.update(reachable=False, error=str(exc), same_as_added=None)
            return out
        # A host is the same host after a reboot (machine and store); a new boot is not
        # co-located with anything it was co-located with before (its memory is new).
        same = (now.machine_id, now.store_id) == (rec.machine_id, rec.store_id)
        out.update(reachable=True, error=None, same_as_added=same,
                   rebooted=now.boot_id != rec.boot_id, current_identity=now.to_json(),
                   co_located=now.same_l0(here))
        return out
