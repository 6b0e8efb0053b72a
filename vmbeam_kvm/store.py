"""The state store: an embedded SQLite database of guests, regions and migrations.

It is what lets guests outlive the command that started them, and it is the migration
journal: every phase is written before it is entered, so a command that dies mid-migration
is resolved by the next one (see :func:`vmbeam_kvm.migration.recover`). Per-guest file locks
serialise commands that change one guest.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, TypeVar

from .cloudvm import CloudVMRecord, CloudVMState
from .errors import (
    BadInputError,
    DuplicateGuestError,
    GuestBusyError,
    UnknownGuestError,
    VmbeamError,
)


class GuestState(StrEnum):
    """Lifecycle of a guest as recorded in the store."""

    STARTING = "starting"
    RUNNING = "running"
    MIGRATING = "migrating"
    STOPPED = "stopped"
    LOST = "lost"                  # its QEMU died outside our control
    NEEDS_ACTION = "needs-action"  # unsafe state an operator must resolve


class MigrationPhase(StrEnum):
    """Journaled phases of a migration (in order), plus its two ends."""

    SHARE = "share"        # nested: the region being attached to the destination cloud VM
    PREPARE = "prepare"    # destination QEMU starting on the shared region
    SWITCH = "switch"      # device state streaming; source may be stopped
    CONFIRM = "confirm"    # source completed; waiting for the destination to run
    RELOCATE = "relocate"  # destination runs; source being quit
    DONE = "done"
    FAILED = "failed"      # rolled back: source runs, destination gone


@dataclass
class GuestRecord:
    """One guest and the QEMU instance that currently runs it."""

    name: str
    image: str
    memory: int
    touch: int
    accel: str
    qemu: str
    state: GuestState
    pid: int = 0
    pid_start: int = 0
    qmp_path: str = ""
    serial_path: str = ""
    log_path: str = ""
    region_id: str = ""
    backend: str = "region"
    instance: int = 0
    created_at: float = 0.0
    cloud_vm: str = ""  # the cloud VM (L1) running the guest; "" when it runs on this host
    tenant: str = ""
    ip: str = ""        # the guest's address on the lab network (guests in cloud VMs)


@dataclass
class MigrationRecord:
    """One migration attempt and its journaled phase."""

    id: int
    guest: str
    mode: str
    phase: MigrationPhase
    src_pid: int = 0
    src_start: int = 0
    dst_pid: int = 0
    dst_start: int = 0
    dst_qmp: str = ""
    dst_serial: str = ""
    dst_log: str = ""
    dst_instance: int = 0
    # Nested migrations: the two cloud VMs and the region each side maps.
    src_cloud_vm: str = ""
    dst_cloud_vm: str = ""
    src_region: str = ""
    dst_region: str = ""
    started_at: float = 0.0
    ended_at: float = 0.0
    error: str = ""
    result: str = ""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS guests (
    name TEXT PRIMARY KEY, image TEXT, memory INTEGER, touch INTEGER, accel TEXT, qemu TEXT,
    state TEXT, pid INTEGER, pid_start INTEGER, qmp_path TEXT, serial_path TEXT,
    log_path TEXT, region_id TEXT, backend TEXT, instance INTEGER, created_at REAL,
    cloud_vm TEXT DEFAULT '', tenant TEXT DEFAULT '', ip TEXT DEFAULT '');
CREATE TABLE IF NOT EXISTS cloud_vms (
    name TEXT PRIMARY KEY, tenant TEXT, memory INTEGER, cpus INTEGER, state TEXT, lab TEXT,
    ip TEXT, tap TEXT, pid INTEGER, pid_start INTEGER, qmp_path TEXT, agent_path TEXT,
    console_path TEXT, log_path TEXT, created_at REAL, attachments TEXT);
CREATE TABLE IF NOT EXISTS regions (
    region_id TEXT PRIMARY KEY, guest TEXT, tenant TEXT, ram_size INTEGER, size INTEGER,
    created_at REAL);
CREATE TABLE IF NOT EXISTS events (
    at REAL, kind TEXT, subject TEXT, detail TEXT);
CREATE TABLE IF NOT EXISTS migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, guest TEXT, mode TEXT, phase TEXT,
    src_pid INTEGER, src_start INTEGER, dst_pid INTEGER, dst_start INTEGER, dst_qmp TEXT,
    dst_serial TEXT, dst_log TEXT, dst_instance INTEGER, started_at REAL, ended_at REAL,
    error TEXT, result TEXT, src_cloud_vm TEXT DEFAULT '', dst_cloud_vm TEXT DEFAULT '',
    src_region TEXT DEFAULT '', dst_region TEXT DEFAULT '');
"""

# Columns added after the first release, for stores made before them.
_ADDED_COLUMNS = {"guests": ("cloud_vm", "tenant", "ip"),
                  "migrations": ("src_cloud_vm", "dst_cloud_vm", "src_region", "dst_region")}


class Store:
    """SQLite-backed state of one vmbeam-kvm host (one state directory)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "locks").mkdir(exist_ok=True)
        self._db = sqlite3.connect(state_dir / "state.db", timeout=30,
                                   isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        for table, added in _ADDED_COLUMNS.items():
            cols = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            for col in added:
                if col not in cols:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {col} TEXT DEFAULT ''")

    def close(self) -> None:
        self._db.close()

    def guest_dir(self, name: str) -> Path:
        path = self.state_dir / "guests" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _insert(self, table: str, row: dict[str, Any], duplicate: VmbeamError) -> None:
        try:
            self._db.execute(f"INSERT INTO {table} ({','.join(row)}) VALUES "
                             f"({','.join('?' * len(row))})", list(row.values()))
        except sqlite3.IntegrityError as exc:
            raise duplicate from exc

    def _update(self, table: str, row: dict[str, Any]) -> None:
        self._db.execute(f"UPDATE {table} SET {','.join(f'{k}=?' for k in row)} WHERE name=?",
                         [*row.values(), row["name"]])

    # -- guests ---------------------------------------------------------------------------
    def add_guest(self, rec: GuestRecord) -> None:
        rec.created_at = rec.created_at or time.time()
        self._insert("guests", _row(rec),
                     DuplicateGuestError(f"a guest named {rec.name!r} already exists"))

    def update_guest(self, rec: GuestRecord) -> None:
        self._update("guests", _row(rec))

    def get_guest(self, name: str) -> GuestRecord:
        row = self._db.execute("SELECT * FROM guests WHERE name=?", (name,)).fetchone()
        if row is None:
            raise UnknownGuestError(f"no guest named {name!r}")
        return _from_row(GuestRecord, row)

    def guests(self) -> list[GuestRecord]:
        rows = self._db.execute("SELECT * FROM guests ORDER BY created_at").fetchall()
        return [_from_row(GuestRecord, r) for r in rows]

    def remove_guest(self, name: str) -> None:
        self._db.execute("DELETE FROM guests WHERE name=?", (name,))

    # -- cloud VMs -------------------------------------------------------------------------
    def add_cloud_vm(self, rec: CloudVMRecord) -> None:
        rec.created_at = rec.created_at or time.time()
        self._insert("cloud_vms", _cvm_row(rec),
                     BadInputError(f"a cloud VM named {rec.name!r} already exists"))

    def update_cloud_vm(self, rec: CloudVMRecord) -> None:
        self._update("cloud_vms", _cvm_row(rec))

    def get_cloud_vm(self, name: str) -> CloudVMRecord:
        row = self._db.execute("SELECT * FROM cloud_vms WHERE name=?", (name,)).fetchone()
        if row is None:
            raise BadInputError(f"no cloud VM named {name!r}")
        return _cvm_from_row(row)

    def cloud_vms(self) -> list[CloudVMRecord]:
        rows = self._db.execute("SELECT * FROM cloud_vms ORDER BY created_at").fetchall()
        return [_cvm_from_row(r) for r in rows]

    def remove_cloud_vm(self, name: str) -> None:
        self._db.execute("DELETE FROM cloud_vms WHERE name=?", (name,))

    # -- regions and the audit log ------------------------------------------------------------
    def add_region(self, region_id: str, guest: str, tenant: str, ram_size: int,
                   size: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO regions VALUES (?,?,?,?,?,?)",
                         (region_id, guest, tenant, ram_size, size, time.time()))

    def remove_region(self, region_id: str) -> None:
        self._db.execute("DELETE FROM regions WHERE region_id=?", (region_id,))

    def regions(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM regions ORDER BY created_at").fetchall()
        return [dict(r) for r in rows]

    def log_event(self, kind: str, subject: str, detail: str) -> None:
        """Append to the audit log (e.g. refused cross-tenant requests)."""
        self._db.execute("INSERT INTO events VALUES (?,?,?,?)",
                         (time.time(), kind, subject, detail))

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM events", []
        if kind is not None:
            sql += " WHERE kind=?"
            args.append(kind)
        return [dict(r) for r in self._db.execute(sql + " ORDER BY at", args)]

    # -- migrations -----------------------------------------------------------------------
    def begin_migration(self, guest: str, mode: str, src_pid: int, src_start: int) -> int:
        cur = self._db.execute(
            "INSERT INTO migrations (guest, mode, phase, src_pid, src_start, started_at) "
            "VALUES (?,?,?,?,?,?)",
            (guest, mode, MigrationPhase.PREPARE.value, src_pid, src_start, time.time()))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def journal(self, mig_id: int, phase: MigrationPhase, **values: Any) -> None:
        """Record entering ``phase`` (and any other columns) durably, before acting on it."""
        values["phase"] = phase.value
        if phase in (MigrationPhase.DONE, MigrationPhase.FAILED):
            values["ended_at"] = time.time()
        if isinstance(values.get("result"), dict):
            values["result"] = json.dumps(values["result"])
        self._db.execute(f"UPDATE migrations SET {','.join(f'{k}=?' for k in values)} "
                         f"WHERE id=?", [*values.values(), mig_id])

    def get_migration(self, mig_id: int) -> MigrationRecord:
        row = self._db.execute("SELECT * FROM migrations WHERE id=?", (mig_id,)).fetchone()
        return _from_row(MigrationRecord, row)

    def unfinished_migrations(self, guest: str | None = None) -> list[MigrationRecord]:
        sql = "SELECT * FROM migrations WHERE phase NOT IN (?, ?)"
        args: list[Any] = [MigrationPhase.DONE.value, MigrationPhase.FAILED.value]
        if guest is not None:
            sql += " AND guest=?"
            args.append(guest)
        return [_from_row(MigrationRecord, r) for r in self._db.execute(sql, args)]

    def migrations(self, guest: str) -> list[MigrationRecord]:
        rows = self._db.execute("SELECT * FROM migrations WHERE guest=? ORDER BY id", (guest,))
        return [_from_row(MigrationRecord, r) for r in rows]

    # -- locking --------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock_guest(self, name: str, what: str = "changed") -> Iterator[None]:
        """Hold the guest's lock; another command holding it means the guest is busy."""
        fd = os.open(self.state_dir / "locks" / f"{name}.lock",
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise GuestBusyError(f"guest {name!r} is busy: another vmbeam-kvm command "
                                         f"is migrating or changing it") from exc
                raise
            yield
        finally:
            os.close(fd)

    def guest_locked(self, name: str) -> bool:
        """True if another command currently holds the guest's lock."""
        try:
            with self.lock_guest(name):
                return False
        except GuestBusyError:
            return True


_R = TypeVar("_R", GuestRecord, MigrationRecord)


def _cvm_row(rec: CloudVMRecord) -> dict[str, Any]:
    row = _row(rec)
    row["attachments"] = json.dumps(rec.attachments)
    return row


def _cvm_from_row(row: sqlite3.Row) -> CloudVMRecord:
    kw = {k: row[k] for k in row.keys()}  # noqa: SIM118 - sqlite3.Row is not a mapping
    kw["state"] = CloudVMState(kw["state"])
    kw["attachments"] = json.loads(kw["attachments"] or "{}")
    return CloudVMRecord(**kw)


def _row(rec: Any) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(rec).items()}


def _from_row(cls: type[_R], row: sqlite3.Row) -> _R:
    kw: dict[str, Any] = {}
    for f in fields(cls):
        value = row[f.name]
        if f.name == "state":
            value = GuestState(value)
        elif f.name == "phase":
            value = MigrationPhase(value)
        elif value is None:
            value = f.default
        kw[f.name] = value
    return cls(**kw)
