"""The vmbeam-kvm exception tree.

Every error the package raises on purpose derives from :class:`VmbeamError`. Each class carries
the CLI exit code that scripts rely on, so the command line maps failures without a table of its
own:

* 2 — bad input: nothing was changed;
* 3 — a migration failed and the source guest is running again, memory intact (or, where its
  cloud VM stopped answering before the switch, runs again as soon as it answers);
* 4 — an unsafe state that needs an operator (e.g. the destination died after the switch);
* 1 — any other failure (QEMU would not start, a QMP command failed, ...);
* 130 / 143 — the command was interrupted by SIGINT / SIGTERM (128 + the signal) and undid
  what it had made (:class:`CommandInterrupted`).
"""

from __future__ import annotations


class VmbeamError(Exception):
    """Base of every vmbeam-kvm error."""

    exit_code = 1


class BadInputError(VmbeamError):
    """The request is invalid; nothing was changed."""

    exit_code = 2


class UnknownGuestError(BadInputError):
    """No guest of that name is known to the state store."""


class DuplicateGuestError(BadInputError):
    """A guest of that name already exists."""


class GuestBusyError(BadInputError):
    """The guest is already being migrated (or otherwise locked) by another command."""


class CloudVMBusyError(BadInputError):
    """The cloud VM is being started or stopped, or a move into or out of it runs, in
    another command. ``cloud_vm`` names it; ``guests`` the guests whose moves hold it (when
    known)."""

    def __init__(self, message: str, *, cloud_vm: str, guests: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.cloud_vm = cloud_vm
        self.guests = guests


class LaunchError(VmbeamError):
    """A QEMU process could not be started or did not come up."""


class QMPCommandError(VmbeamError):
    """A QMP command failed or the QMP connection broke.

    ``command`` is the QMP command; ``error_class`` is QEMU's own class of the failure
    (``GenericError``, ``CommandNotFound``, ``DeviceNotFound``...) when QEMU answered with an
    error, and "" when the command never got an answer (``disconnected`` then tells whether
    the QMP connection broke). Callers decide on these fields, never on the message text.
    """

    def __init__(self, message: str, *, command: str = "", error_class: str = "",
                 disconnected: bool = False) -> None:
        super().__init__(message)
        self.command = command
        self.error_class = error_class
        self.disconnected = disconnected


class AgentError(VmbeamError):
    """A cloud VM's agent refused a request, failed it, or could not be reached.

    ``remote_type`` is the class name of the error the agent raised (e.g.
    ``BadInputError`` for "no such guest"), "" when the agent did not answer.
    """

    def __init__(self, message: str, remote_type: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type


class HostError(VmbeamError):
    """Another host could not be reached over SSH, or its vmbeam-kvm failed a request.

    ``host`` is its name; ``ssh_failed`` says ssh itself failed (connection, pinned host key,
    authentication); otherwise ``remote_exit_code`` and ``remote_type`` are the remote
    command's exit code and error class.
    """

    def __init__(self, message: str, *, host: str = "", ssh_failed: bool = False,
                 remote_exit_code: int = 0, remote_type: str = "") -> None:
        super().__init__(message)
        self.host = host
        self.ssh_failed = ssh_failed
        self.remote_exit_code = remote_exit_code
        self.remote_type = remote_type


class NetworkError(VmbeamError):
    """A lab network (namespace, bridge, tap) could not be built or changed."""


class LabInUseError(BadInputError):
    """The lab namespace ``ns`` belongs to another state directory's lab (``owner``, its
    path): nothing in it was touched."""

    def __init__(self, message: str, *, ns: str, owner: str) -> None:
        super().__init__(message)
        self.ns = ns
        self.owner = owner


class LabDamagedError(BadInputError):
    """``lab up`` found that what its running cloud VMs rely on is gone (their namespace,
    bridge or taps, or the cloud VMs themselves); ``problems`` says what, one item each.
    Nothing was changed."""

    def __init__(self, message: str, *, problems: tuple[str, ...]) -> None:
        super().__init__(message)
        self.problems = problems


class DiskError(VmbeamError):
    """A disk operation failed (an overlay could not be made, a disk copy failed)."""


class RegionError(VmbeamError):
    """A beam region is missing, malformed, or not the one expected."""


class RegionMismatchError(RegionError):
    """A destination maps other memory than the guest's beam region (docs/design.md §4.4)."""


class MigrationError(VmbeamError):
    """A migration failed.

    ``source_resumed`` tells whether the source guest is known to be running again with its
    memory intact (exit code 3). ``source_pending``: the source was never handed over and
    the destination is gone, but the source's cloud VM has not answered since (exit code 3
    too: nothing can run twice); the guest is recorded ``unreachable`` and becomes
    ``running`` again as soon as that cloud VM answers. Otherwise the state is unsafe and
    needs action (exit code 4).
    """

    def __init__(self, message: str, *, source_resumed: bool,
                 source_pending: bool = False) -> None:
        super().__init__(message)
        self.source_resumed = source_resumed
        self.source_pending = source_pending

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 3 if self.source_resumed or self.source_pending else 4


class GuestLostError(VmbeamError):
    """Every copy of the guest died (e.g. its source QEMU was killed mid-migration): nothing
    runs and nothing could run twice; the guest is recorded ``lost``."""


class Rollback(VmbeamError):
    """Internal to the migration engine: the move failed before the switch could have
    happened; the engine rolls back to the source and raises a :class:`MigrationError`
    (or :class:`GuestLostError`) instead. Never escapes the package."""


class CommandInterrupted(VmbeamError):
    """A command was interrupted by a signal (``signum``: SIGINT or SIGTERM); what it had
    made was undone, or recorded for the next command to settle. Exit code 128 + signum."""

    def __init__(self, message: str, *, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 128 + self.signum


class UnsafeStateError(VmbeamError):
    """The guest's state could not be made safe automatically; an operator must act."""

    exit_code = 4


class SettleRefusedError(UnsafeStateError):
    """``guest settle`` cannot tell which copy of the guest to keep; nothing was changed.

    ``source`` and ``destination`` say how each end of the guest's last move was seen
    (values of :class:`vmbeam_kvm.migrate.recovery.EndSeen`)."""

    def __init__(self, message: str, *, source: str, destination: str) -> None:
        super().__init__(message)
        self.source = source
        self.destination = destination
