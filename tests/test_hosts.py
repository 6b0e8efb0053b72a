"""Other hosts over real OpenSSH: `host add/list/remove`, the pinned host key, identities.

A second "host" is a state directory of its own behind a real sshd (Debian's
openssh-server) in a network namespace of the test's, reached over a veth link with a key
made for this run — as two L0s on one machine are in the cross-host tests and the demo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import STATE_PREFIX, run_cli

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class SshHost:
    """sshd for one state dir in netns ``ns``, at ``addr``:``port``."""

    def __init__(self, work: Path, ns: str, addr: str, port: int) -> None:
        self.work, self.ns, self.addr, self.port = work, ns, addr, port
        self.state = Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir="/tmp"))
        self.client_key = work / "id_ed25519"
        self.proc: subprocess.Popen[bytes] | None = None

    def keys(self, name: str) -> Path:
        key = self.work / name
        if not key.exists():
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        return key

    def start(self, host_key: str = "host_key") -> None:
        self.stop()
        key = self.keys(host_key)
        auth = self.work / "authorized_keys"
        auth.write_text((self.work / "id_ed25519.pub").read_text())
        conf = self.work / "sshd_config"
        conf.write_text(f"Port {self.port}\nListenAddress {self.addr}\nHostKey {key}\n"
                        f"AuthorizedKeysFile {auth}\nPermitRootLogin prohibit-password\n"
                        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                        f"UsePAM no\nStrictModes no\nPidFile {self.work}/sshd.pid\n")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        with open(self.work / "sshd.log", "ab") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, SSHD, "-D", "-e",
                                          "-f", str(conf)], stderr=log)
        deadline = time.monotonic() + 20
        while subprocess.run(["ssh-keyscan", "-T", "2", "-p", str(self.port), self.addr],
                             capture_output=True).stdout.strip() == b"":
            assert self.proc.poll() is None, (self.work / "sshd.log").read_text()
            assert time.monotonic() < deadline, "sshd did not come up"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def remote_command(self, state: Path | None = None) -> str:
        return f"{sys.executable} -m vmbeam_kvm.cli --state-dir {state or self.state}"

    def fingerprint(self, host_key: str = "host_key") -> str:
        out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f",
                              str(self.work / f"{host_key}.pub")], capture_output=True,
                             text=True, check=True).stdout
        return out.split()[1]


@pytest.fixture(scope="module")
def ssh_host() -> Iterator[SshHost]:
    tag = os.getpid() % 10000
    ns, veth, peer = f"vbt-ssh-{tag}", f"vbts{tag}", f"vbtp{tag}"
    net = f"10.242.{tag % 250}"
    work = Path(tempfile.mkdtemp(prefix="vbh-", dir="/tmp"))
    host = SshHost(work, ns, f"{net}.2", 2222)
    try:
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        _sh("ip", "link", "set", peer, "netns", ns)
        _sh("ip", "addr", "add", f"{net}.1/30", "dev", veth)
        _sh("ip", "link", "set", veth, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{net}.2/30", "dev", peer)
        _sh("ip", "-n", ns, "link", "set", peer, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        host.keys("id_ed25519")
        host.start()
        yield host
    finally:
        host.stop()
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(host.state, ignore_errors=True)


def cli(state: Path, *args: str, rc: int = 0) -> Any:
    proc = run_cli(state, *args, "--json", timeout=120)
    assert proc.returncode == rc, proc.stderr
    return json.loads(proc.stdout) if rc == 0 else proc


def pins(state: Path) -> str:
    path = state / "hosts" / "known_hosts"
    return path.read_text() if path.exists() else ""


def add_args(h: SshHost, name: str = "hostb", state: Path | None = None) -> list[str]:
    return ["host", "add", name, f"ssh://root@{h.addr}:{h.port}", "--identity",
            str(h.client_key), "--remote-command", h.remote_command(state)]


def test_add_list_remove_over_real_ssh(ssh_host: SshHost, state_dir: Path) -> None:
    out = cli(state_dir, *add_args(ssh_host))
    remote_store = (ssh_host.state / "host-id").read_text().strip()
    assert out["fingerprint"] == ssh_host.fingerprint()  # the key sshd really holds
    assert out["identity"]["store_id"] == remote_store
    assert out["identity"]["machine_id"] == Path("/etc/machine-id").read_text().strip()
    assert out["co_located"] is False  # another L0 (its own store), though on this machine
    assert "vmbeam-hostb " in pins(state_dir)
    listing = cli(state_dir, "host", "list")
    assert listing["this"]["store_id"] == (state_dir / "host-id").read_text().strip()
    [hb] = listing["hosts"]
    assert hb["reachable"] is True and hb["same_as_added"] is True and not hb["rebooted"]
    # The same L0 reached over ssh is co-located: decided by identity, not by name.
    same = cli(state_dir, *add_args(ssh_host, "self", state_dir))
    assert same["co_located"] is True
    cli(state_dir, "host", "remove", "self")
    # Bad input: exit 2, one line, nothing changed.
    before = (pins(state_dir), cli(state_dir, "host", "list")["hosts"])
    for args, why in ((add_args(ssh_host), "already exists"),
                      (["host", "add", "h2", "http://x"], "use ssh://"),
                      (["host", "add", "bad/name", "ssh://x"], "invalid host name"),
                      (["host", "add", "h3", "ssh://x:99999"], "invalid port"),
                      (["host", "remove", "nosuch"], "no host named")):
        proc = run_cli(state_dir, *args)
        assert proc.returncode == 2, proc.stderr
        assert why in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (pins(state_dir), cli(state_dir, "host", "list")["hosts"]) == before
    cli(state_dir, "host", "remove", "hostb")
    assert cli(state_dir, "host", "list")["hosts"] == [] and "vmbeam-hostb" not in pins(state_dir)


def test_pinned_key_refuses_a_changed_host(ssh_host: SshHost, state_dir: Path) -> None:
    """The key pinned at `host add` is the only one accepted: an sshd with another host key
    at the same address is not that host."""
    cli(state_dir, *add_args(ssh_host))
    try:
        ssh_host.start(host_key="impostor_key")
        [hb] = cli(state_dir, "host", "list")["hosts"]
        assert hb["reachable"] is False and "ssh" in hb["error"], hb
    finally:
        ssh_host.start()
    [hb] = cli(state_dir, "host", "list")["hosts"]
    assert hb["reachable"] is True


def test_failed_add_keeps_nothing(ssh_host: SshHost, state_dir: Path, tmp_path: Path) -> None:
    """A key the host does not accept: exit 1 with ssh's reason; no record, no pin."""
    stranger = tmp_path / "stranger"
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger))
    args = add_args(ssh_host)
    args[args.index("--identity") + 1] = str(stranger)
    proc = run_cli(state_dir, *args, "--json")
    assert proc.returncode == 1, proc.stderr
    err = json.loads(proc.stdout)
    assert err["error_type"] == "HostError" and "Permission denied" in err["error"]
    assert cli(state_dir, "host", "list")["hosts"] == [] and "vmbeam-hostb" not in pins(state_dir)
