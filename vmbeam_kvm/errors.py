"""The vmbeam-kvm exception tree.

Every error the package raises on purpose derives from :class:`VmbeamError`. Each class carries
the CLI exit code that scripts rely on, so the command line maps failures without a table of its
own:

* 2 — bad input: nothing was changed;
* 3 — a migration failed and the source guest is running again, memory intact;
* 4 — an unsafe state that needs an operator (e.g. the destination died after the switch);
* 1 — any other failure (QEMU would not start, a QMP command failed, ...).
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


class DiskError(VmbeamError):
    """A disk operation failed (an overlay could not be made, a disk copy failed)."""


class RegionError(VmbeamError):
    """A beam region is missing, malformed, or not the one expected."""


class RegionMismatchError(RegionError):
    """A destination maps other memory than the guest's beam region (docs/design.md §4.4)."""


class MigrationError(VmbeamError):
    """A migration failed.

    ``source_resumed`` tells whether the source guest is known to be running again with its
    memory intact (exit code 3); otherwise the state is unsafe and needs action (exit code 4).
    """

    def __init__(self, message: str, *, source_resumed: bool) -> None:
        super().__init__(message)
        self.source_resumed = source_resumed

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 3 if self.source_resumed else 4


class GuestLostError(VmbeamError):
    """Every copy of the guest died (e.g. its source QEMU was killed mid-migration): nothing
    runs and nothing could run twice; the guest is recorded ``lost``."""


class Rollback(VmbeamError):
    """Internal to the migration engine: the move failed before the switch could have
    happened; the engine rolls back to the source and raises a :class:`MigrationError`
    (or :class:`GuestLostError`) instead. Never escapes the package."""


class UnsafeStateError(VmbeamError):
    """The guest's state could not be made safe automatically; an operator must act."""

    exit_code = 4
