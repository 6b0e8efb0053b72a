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
    CloudVMBusyError,
    DuplicateGuestError,
    GuestBusyError,
    UnknownGuestError,
    VmbeamError,
)
from .hosts import HostRecord
from .units import check_name, shown


class GuestState(StrEnum):
    """Lifecycle of a guest as recorded in the store (a stopped guest is forgotten)."""

    STARTING = "starting"
    RUNNING = "running"
    MIGRATING = "migrating"
    # Never set by this release (`guest stop` forgets the guest); stores the first release
    # wrote still hold such rows, and must open.
    STOPPED = "stopped"
    LOST = "lost"                  # its QEMU died outside our control
    NEEDS_ACTION = "needs-action"  # unsafe state an operator must resolve (`guest settle`)
    # A move failed before its source handed over, and the source's cloud VM has not
    # answered since: it runs again (running) as soon as it answers; nothing can run twice.
    UNREACHABLE = "unreachable"


class MigrationPhase(StrEnum):
    """Journaled phases of a migration (in order), plus its two ends."""

    SHARE = "share"        # nested: the region being attached to the destination cloud VM
    PREPARE = "prepare"    # destination QEMU starting on the shared region
    SWITCH = "switch"      # device state streaming; source may be stopped
    CONFIRM = "confirm"    # source completed; waiting for the destination to run
    RELOCATE = "relocate"  # destination runs; source being quit
    DONE = "done"
    FAILED = "failed"      # rolled back: source runs, destination gone
    # Rolled back before the source handed over (the destination, seen never to have run,
    # is gone), but the source has not answered since: the next command resumes it once
    # it answers (migrate.recovery). Not a step of a move: never entered in order.
    SOURCE_PENDING = "source-pending"


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
    cpus: int = 1       # vCPUs (-smp), the same on both ends of every move
    disks: str = ""     # its disks, JSON (vmbeam_kvm.disks.dumps); "" or "[]": none


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
    dst_disks: str = ""  # the destination's disks (vmbeam_kvm.disks.dumps), if any
    started_at: float = 0.0
    ended_at: float = 0.0
    error: str = ""
    result: str = ""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS guests (
    name TEXT PRIMARY KEY, image TEXT, memory INTEGER, touch INTEGER, accel TEXT, qemu TEXT,
    state TEXT, pid INTEGER, pid_start INTEGER, qmp_path TEXT, serial_path TEXT,
    log_path TEXT, region_id TEXT, backend TEXT, instance INTEGER, created_at REAL,
    cloud_vm TEXT DEFAULT '', tenant TEXT DEFAULT '', ip TEXT DEFAULT '',
    cpus INTEGER DEFAULT 1, disks TEXT DEFAULT '');
CREATE TABLE IF NOT EXISTS cloud_vms (
    name TEXT PRIMARY KEY, tenant TEXT, memory INTEGER, cpus INTEGER, state TEXT, lab TEXT,
    ip TEXT, tap TEXT, pid INTEGER, pid_start INTEGER, qmp_path TEXT, agent_path TEXT,
    console_path TEXT, log_path TEXT, created_at REAL, attachments TEXT,
    accel TEXT DEFAULT '');
CREATE TABLE IF NOT EXISTS regions (
    region_id TEXT PRIMARY KEY, guest TEXT, tenant TEXT, ram_size INTEGER, size INTEGER,
    created_at REAL);
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY, url TEXT, fingerprint TEXT, machine_id TEXT, boot_id TEXT,
    store_id TEXT, hostname TEXT, identity_file TEXT, remote_command TEXT, added_at REAL);
CREATE TABLE IF NOT EXISTS events (
    at REAL, kind TEXT, subject TEXT, detail TEXT);
CREATE TABLE IF NOT EXISTS migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, guest TEXT, mode TEXT, phase TEXT,
    src_pid INTEGER, src_start INTEGER, dst_pid INTEGER, dst_start INTEGER, dst_qmp TEXT,
    dst_serial TEXT, dst_log TEXT, dst_instance INTEGER, started_at REAL, ended_at REAL,
    error TEXT, result TEXT, src_cloud_vm TEXT DEFAULT '', dst_cloud_vm TEXT DEFAULT '',
    src_region TEXT DEFAULT '', dst_region TEXT DEFAULT '', dst_disks TEXT DEFAULT '');
"""

# Columns added after the first release, for stores made before them.
_ADDED_COLUMNS = {"guests": ("cloud_vm", "tenant", "ip", "cpus", "disks"),
                  "cloud_vms": ("accel",),
                  "migrations": ("src_cloud_vm", "dst_cloud_vm", "src_region", "dst_region",
                                 "dst_disks")}
# How an added column is declared where it is not text (a store made before it gets this).
_ADDED_DECL = {"cpus": "INTEGER DEFAULT 1"}
_NAME_MAX_BYTES = 255  # one path component (Linux NAME_MAX)


def _schema_columns() -> dict[str, set[str]]:
    """Table -> columns of the current schema, read from SQLite itself."""
    mem = sqlite3.connect(":memory:")
    try:
        mem.executescript(_SCHEMA)
        return _columns(mem, None)
    finally:
        mem.close()


def _columns(db: sqlite3.Connection, only: set[str] | None) -> dict[str, set[str]]:
    """Every table of ``db`` (SQLite's own excluded) and, for those in ``only`` (all when
    None), its columns; only reads."""
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                      "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'")]
    return {n: ({r[1] for r in db.execute(f"PRAGMA table_info(\"{n}\")")}
                if only is None or n in only else set()) for n in names}


_EXPECTED = _schema_columns()


def _check_schema(have: dict[str, set[str]], db_path: Path) -> list[tuple[str, str]]:
    """The columns to add to make ``have`` the current schema; BadInputError if it is not a
    vmbeam-kvm store, or one from a version this one cannot migrate."""
    aside = "move it aside or use another --state-dir"
    if have and not set(have) & set(_EXPECTED):
        raise BadInputError(f"{db_path} is not a vmbeam-kvm state database (tables: "
                            f"{shown(', '.join(sorted(have)))}): {aside}")
    to_add = []
    for table, cols in _EXPECTED.items():
        if table not in have:
            continue  # created below, empty
        missing = sorted(cols - have[table])
        unknown = [c for c in missing if c not in _ADDED_COLUMNS.get(table, ())]
        if unknown:
            raise BadInputError(f"state database {db_path} has an unsupported schema (table "
                                f"{table} lacks {', '.join(unknown)}): {aside}")
        to_add += [(table, c) for c in missing]
    return to_add


def _prepare_state_dir(state_dir: Path) -> None:
    """Create a missing state directory; refuse one that cannot be (a parent is a file,
    a name is too long) before creating any part of it."""
    if any(len(os.fsencode(part)) > _NAME_MAX_BYTES for part in state_dir.parts):
        raise BadInputError(f"state directory {shown(str(state_dir))}: a path component is "
                            f"longer than {_NAME_MAX_BYTES} bytes")
    try:
        for parent in (state_dir, *state_dir.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise BadInputError(f"state directory {state_dir}: {parent} is not a "
                                        f"directory")
                break
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create state directory {state_dir}: "
                            f"{exc.strerror or exc}") from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise BadInputError(f"state directory {state_dir} is not writable")


def _lookup_key(name: object) -> str | None:
    """``name`` if it could be a key in the store; None for what no insert could have
    stored (not text, or text SQLite cannot encode, such as undecodable argv bytes)."""
    if not isinstance(name, str):
        return None
    try:
        name.encode()
    except UnicodeEncodeError:
        return None
    return name


class Store:
    """SQLite-backed state of one vmbeam-kvm host (one state directory).

    Opening it creates a missing state directory and store, and migrates a store made by an
    earlier version; a state directory it cannot use, or a database it cannot read or
    migrate, is refused with :class:`BadInputError` before anything in it is changed.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        _prepare_state_dir(state_dir)
        db_path = state_dir / "state.db"
        if db_path.is_dir():
            raise BadInputError(f"state database {db_path} is a directory: move it aside or "
                                f"use another --state-dir")
        try:
            self._db = sqlite3.connect(db_path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise BadInputError(f"cannot open state database {db_path}: {exc}") from None
        try:
            self._db.row_factory = sqlite3.Row
            self._open_schema(db_path)
            (state_dir / "locks").mkdir(exist_ok=True)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise BadInputError(f"state database {db_path} is unusable ({exc}): move it aside "
                                f"or use another --state-dir") from None
        except OSError as exc:
            self._db.close()
            raise BadInputError(f"state directory {state_dir}: {exc.strerror or exc}") from None
        except BaseException:
            self._db.close()
            raise

    def _open_schema(self, db_path: Path) -> None:
        # Checked read-only first: a store we refuse is left exactly as it was.
        to_add = _check_schema(_columns(self._db, set(_EXPECTED)), db_path)
        self._db.execute("PRAGMA journal_mode=WAL")
        if not to_add and set(_EXPECTED) <= set(_columns(self._db, set())):
            return  # current schema: no write lock needed
        self._db.execute("BEGIN IMMEDIATE")  # another command may be migrating it too
        try:
            to_add = _check_schema(_columns(self._db, set(_EXPECTED)), db_path)
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            for table, col in to_add:
                decl = _ADDED_DECL.get(col, "TEXT DEFAULT ''")
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # keep the first error, not this one
                self._db.execute("ROLLBACK")
            raise

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
        key = _lookup_key(name)
        row = None if key is None else self._db.execute(
            "SELECT * FROM guests WHERE name=?", (key,)).fetchone()
        if row is None:
            raise UnknownGuestError(f"no guest named {shown(name)}")
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

    def record_attachment(self, vm: str, region_id: str, att: dict[str, Any] | None) -> None:
        """Record one region's attachment to a cloud VM (None: its removal) and leave the
        other entries as they are now, so that moves through one cloud VM never undo
        each other's records."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT attachments FROM cloud_vms WHERE name=?",
                                   (vm,)).fetchone()
            if row is not None:
                atts = json.loads(row[0] or "{}")
                if att is None:
                    atts.pop(region_id, None)
                else:
                    atts[region_id] = att
                self._db.execute("UPDATE cloud_vms SET attachments=? WHERE name=?",
                                 (json.dumps(atts), vm))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def get_cloud_vm(self, name: str) -> CloudVMRecord:
        key = _lookup_key(name)
        row = None if key is None else self._db.execute(
            "SELECT * FROM cloud_vms WHERE name=?", (key,)).fetchone()
        if row is None:
            raise BadInputError(f"no cloud VM named {shown(name)}")
        return _cvm_from_row(row)

    def cloud_vms(self) -> list[CloudVMRecord]:
        rows = self._db.execute("SELECT * FROM cloud_vms ORDER BY created_at").fetchall()
        return [_cvm_from_row(r) for r in rows]

    def remove_cloud_vm(self, name: str) -> None:
        self._db.execute("DELETE FROM cloud_vms WHERE name=?", (name,))

    # -- other hosts ----------------------------------------------------------------------
    def add_host(self, rec: HostRecord) -> None:
        self._insert("hosts", asdict(rec),
                     BadInputError(f"a host named {rec.name!r} already exists"))

    def find_host(self, name: str) -> HostRecord | None:
        """The record of host ``name``, None if there is none."""
        key = _lookup_key(name)
        row = None if key is None else self._db.execute(
            "SELECT * FROM hosts WHERE name=?", (key,)).fetchone()
        return None if row is None else HostRecord(**{k: row[k] for k in row.keys()})  # noqa: SIM118

    def hosts(self) -> list[HostRecord]:
        return [HostRecord(**{k: r[k] for k in r.keys()})  # noqa: SIM118
                for r in self._db.execute("SELECT * FROM hosts ORDER BY added_at")]

    def remove_host(self, name: str) -> None:
        self._db.execute("DELETE FROM hosts WHERE name=?", (name,))

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
        key = _lookup_key(name)
        if (key is None or key in ("", ".", "..") or "/" in key or "\0" in key
                or len(os.fsencode(f"{key}.lock")) > _NAME_MAX_BYTES):
            # Not a file name, so never a guest's (names are checked when guests are made):
            # refused before it could name a path outside locks/.
            raise UnknownGuestError(f"no guest named {shown(name)}")
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

    @contextlib.contextmanager
    def lock_cloud_vm(self, name: str, *, shared: bool) -> Iterator[None]:
        """Hold cloud VM ``name``'s lock: shared by every move into or out of it and every
        guest start in it (they may overlap), exclusive while it is started or stopped.
        Never waits: held the other way by another command (or another task of this one)
        means busy, :class:`CloudVMBusyError` naming the moves that hold it."""
        check_name(name, "cloud VM name")  # a file name under locks/cloud-vms/
        # A directory of its own: a guest may have the name of a cloud VM.
        path = self.state_dir / "locks" / "cloud-vms" / f"{name}.lock"
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                moving = tuple(sorted({m.guest for m in self.unfinished_migrations()
                                       if name in (m.src_cloud_vm, m.dst_cloud_vm)}))
                if shared:
                    why = "another vmbeam-kvm command is starting or stopping it"
                elif moving:
                    why = (f"a move of {', '.join(moving)} into or out of it is running; "
                           f"try again when it has ended")
                else:
                    why = ("another vmbeam-kvm command is moving a guest into or out of "
                           "it, starting one in it, or starting or stopping it")
                raise CloudVMBusyError(f"cloud VM {name!r} is busy: {why}", cloud_vm=name,
                                       guests=moving) from exc
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
