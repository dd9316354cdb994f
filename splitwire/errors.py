"""The errors edge and cloud tell each other, as one small hierarchy with wire codes.

Why it exists: a failure on one side must become the *same* typed exception on the other
(the cloud sends an error frame carrying ``code`` and a message; the edge raises the class
registered for that code), and a caller must know without parsing text whether retrying
can help: ``retryable`` errors (a dropped connection, a busy server) are worth a reconnect,
the others (a malformed frame, another bundle, a bad token) will fail again.

Every error splitft raises on purpose, on either side and in every command (a bad bundle,
data file, checkpoint or option), derives from ``SplitftError``, so the commands can turn
exactly these into one line and an exit code (``splitwire.exit_codes``) and let anything
else, a bug, keep its traceback.
"""

from __future__ import annotations

from typing import ClassVar


class SplitftError(Exception):
    """Base of every error splitft raises on purpose; ``code`` names it on the wire."""

    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False


class ProtocolError(SplitftError):
    """A frame is malformed or breaks the protocol (bad header, dtype, shape, NaN, order)."""

    code = "protocol"


class VersionMismatch(ProtocolError):
    """The peer speaks another version of the wire protocol."""

    code = "version_mismatch"


class StepOrderError(ProtocolError):
    """A training step arrived out of order (neither the next step nor a resend of the last)."""

    code = "step_order"


class TooManyInFlight(ProtocolError):
    """A request arrived before the answer to the previous one was sent (one request in flight)."""

    code = "in_flight"


class BundleMismatch(SplitftError):
    """Edge and cloud loaded different bundles (their manifest hashes differ)."""

    code = "bundle_mismatch"


class ConfigMismatch(SplitftError):
    """The session's training config (schedule, seed, codec) differs from what the cloud holds."""

    code = "config_mismatch"


class AuthError(SplitftError):
    """The session's token is missing or wrong, or the token is not this session's."""

    code = "auth"


class SessionRewound(SplitftError):
    """After a reconnect the cloud's session is at ``step``, behind the edge (the cloud restarted
    from an older checkpoint): the edge must go back to its own checkpoint of that step.
    Raised on the edge only; never sent."""

    code = "session_rewound"

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step


class NonFinite(SplitftError):
    """A step's loss, gradients or outputs would not be finite (the request's values overflow the
    model): the cloud refuses it before anything changes, and the session stays usable."""

    code = "non_finite"


class CheckpointCorrupt(SplitftError):
    """A checkpoint file is unreadable, torn, or fails its checksum. Raised where it is read;
    never sent: the reader falls back to an older checkpoint, or says which file to remove."""

    code = "checkpoint_corrupt"

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class UsageError(SplitftError, ValueError):
    """A value the user chose (an option, a file, a file's content) cannot be used; the message says what
    to change. Raised where it is found; never sent. Also a ``ValueError``, which it is."""

    code = "usage"


class BundleError(SplitftError):
    """The bundle is missing, incomplete, tampered with, or of another format."""

    code = "bundle"


class RetryableError(SplitftError):
    """Worth retrying after a reconnect."""

    code = "retryable"
    retryable = True


class ConnectionLost(RetryableError):
    """The connection closed or could not be opened."""

    code = "connection_lost"


class ServerBusy(RetryableError):
    """The cloud cannot take this session now (session or connection limit reached)."""

    code = "busy"


class IdleTimeout(RetryableError):
    """The connection sent nothing for longer than the cloud's idle timeout; reconnect to go on."""

    code = "idle_timeout"


ERRORS: dict[str, type[SplitftError]] = {
    cls.code: cls
    for cls in (SplitftError, ProtocolError, VersionMismatch, StepOrderError, TooManyInFlight, BundleMismatch,
                ConfigMismatch, AuthError, NonFinite, RetryableError, ConnectionLost, ServerBusy, IdleTimeout)
}


def error_from_code(code: str, message: str) -> SplitftError:
    """The exception for an error frame's ``code``; an unknown code is a non-retryable ``SplitftError``."""
    return ERRORS.get(code, SplitftError)(message)
