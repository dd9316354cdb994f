"""Per-session device tokens: who may open (or resume) which session on the cloud.

Why it exists: the cloud listens on a network and each session holds one device's model
halves and its replay cache (gradients of that device's private batches). A session is
reachable only with its own token: the hello names a session id and carries a token, and
the server checks the pair here before it creates, restores or touches any session, and
before it reads any tensor frame of that connection.

Tokens come from a file (``sft-cloud --tokens FILE``) or from the environment
(``SFT_CLOUD_TOKENS``, the same lines), never from the command line, where ``ps`` would
show them. One entry a line: ``session_id token`` or ``session_id sha256:<64 hex digits>``
(the SHA-256 of the token, so the file need not hold the secret itself), optionally followed
by the fleets that session may join, comma-separated (``session_id token fleet-a,fleet-b``;
without them it trains only alone); blank lines and ``#`` comments are ignored. Every check hashes the presented token and compares digests
with ``hmac.compare_digest``; an unknown session id is compared against a dummy digest, so
the time taken does not tell which session ids exist.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

from splitwire.errors import AuthError, UsageError

TOKENS_ENV = "SFT_CLOUD_TOKENS"
HASHED = re.compile(r"sha256:([0-9a-f]{64})")
MIN_TOKEN_CHARS = 16
_DUMMY = hashlib.sha256(b"no such session").digest()


class TokenFileError(UsageError):
    """The token file (or ``SFT_CLOUD_TOKENS``) cannot be used as it is."""

    code = "token_file"


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class TokenStore:
    """SHA-256 digests of each session's token, and the fleets each session may join."""

    digests: dict[str, bytes]
    fleets: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, *, source: str) -> "TokenStore":
        """Entries from the file format above; ``source`` names the file in errors."""
        digests: dict[str, bytes] = {}
        fleets: dict[str, frozenset[str]] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) not in (2, 3):
                raise TokenFileError(f"{source}:{number}: expected 'session_id token [fleet,...]' (two or three "
                                     f"fields), got {len(fields)} field(s)")
            session_id, secret = fields[:2]
            fleets[session_id] = frozenset(fields[2].split(",")) - {""} if len(fields) == 3 else frozenset()
            if session_id in digests:
                raise TokenFileError(f"{source}:{number}: session {session_id!r} is listed twice")
            digests[session_id] = cls._digest(secret, where=f"{source}:{number}")
        if not digests:
            raise TokenFileError(f"{source}: no tokens in it")
        return cls(digests, fleets)

    @staticmethod
    def _digest(secret: str, *, where: str) -> bytes:
        hashed = HASHED.fullmatch(secret)
        if hashed:
            return bytes.fromhex(hashed.group(1))
        if secret.startswith("sha256:"):
            raise TokenFileError(f"{where}: a hashed token is 'sha256:' and 64 lowercase hex digits")
        if len(secret) < MIN_TOKEN_CHARS:
            raise TokenFileError(f"{where}: the token is shorter than {MIN_TOKEN_CHARS} characters; use a random one "
                                 "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        return token_digest(secret)

    @classmethod
    def load(cls, path: Path | None) -> "TokenStore | None":
        """From ``path``, else from ``$SFT_CLOUD_TOKENS``; ``None`` when neither is given."""
        if path is not None:
            try:
                return cls.parse(path.read_text(encoding="utf-8"), source=str(path))
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenFileError(f"cannot read the token file {path}: {exc}") from None
        text = os.environ.get(TOKENS_ENV)
        return None if not text else cls.parse(text, source=f"${TOKENS_ENV}")

    def check(self, session_id: str, token: str | None) -> None:
        """Raise ``AuthError`` unless ``token`` is ``session_id``'s own token."""
        want = self.digests.get(session_id, _DUMMY)
        got = token_digest(token or "")
        if not hmac.compare_digest(got, want) or session_id not in self.digests or token is None:
            raise AuthError(f"session {session_id!r}: missing or wrong token (each device needs its own session's "
                            "token, from --token-file or $SFT_TOKEN)")

    def check_fleet(self, session_id: str, fleet: str) -> None:
        """Raise ``AuthError`` unless ``session_id`` (whose token was checked) may join ``fleet``."""
        if fleet not in self.fleets.get(session_id, frozenset()):
            raise AuthError(f"session {session_id!r} may not join fleet {fleet!r}: the cloud's token file lists "
                            "the fleets each session may join")
