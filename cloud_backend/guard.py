"""Bounded send buffers, and bounded time to drain them, for every connection.

Why it exists: websockets answers every ping the moment it arrives and writes the pong
without flow control, and its own sends and closing handshake wait for the send buffer
to drain with no time limit. A client that floods pings and never reads its socket
therefore grows the server's memory without bound and holds its connection forever,
authenticated or not, over ws:// and wss:// alike. ``GuardedConnection`` aborts the
transport (no closing handshake: the peer is not reading it) when

- the peer stops reading: the send buffer is above its high-water mark (websockets has
  paused writing) and has not shrunk for ``send_timeout`` seconds; or
- automatic replies (pongs, close echoes) pile up while writing is paused: more than
  ``max_unread_replies`` bytes of them.

A slow but reading peer makes progress and is never aborted, however large the frame.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any, Callable

from websockets.asyncio.server import ServerConnection

DEFAULT_SEND_TIMEOUT_S = 30.0
MAX_UNREAD_REPLIES = 1 << 16  # bytes of pongs a peer may leave unread: about 500 pings


@dataclass(frozen=True)
class SendGuard:
    """The limits, and who hears of an abort (``on_abort(connection, reason)``)."""

    send_timeout: float = DEFAULT_SEND_TIMEOUT_S
    max_unread_replies: int = MAX_UNREAD_REPLIES
    on_abort: Callable[[ServerConnection, str], None] | None = None

    def connection_factory(self) -> Callable[..., "GuardedConnection"]:
        """What ``websockets.asyncio.server.serve(create_connection=...)`` takes."""
        return functools.partial(GuardedConnection, guard=self)


class GuardedConnection(ServerConnection):
    """A ``ServerConnection`` whose peer must read what it is sent."""

    def __init__(self, *args: Any, guard: SendGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.unread_replies = 0
        self.stall_check: asyncio.TimerHandle | None = None
        self.aborted: str | None = None

    def data_received(self, data: bytes) -> None:
        before = self.transport.get_write_buffer_size()
        super().data_received(data)
        if self.paused and self.aborted is None:
            self.unread_replies += max(0, self.transport.get_write_buffer_size() - before)
            if self.unread_replies > self.guard.max_unread_replies:
                self.abort(f"{self.unread_replies} bytes of automatic replies left unread")

    def pause_writing(self) -> None:
        super().pause_writing()
        self._check_progress_later(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        super().resume_writing()
        self.unread_replies = 0
        if self.stall_check is not None:
            self.stall_check.cancel()
            self.stall_check = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stall_check is not None:
            self.stall_check.cancel()
        super().connection_lost(exc)

    def _check_progress_later(self, buffered: int) -> None:
        self.stall_check = self.loop.call_later(self.guard.send_timeout, self._check_progress, buffered)

    def _check_progress(self, buffered_then: int) -> None:
        buffered = self.transport.get_write_buffer_size()
        if buffered >= buffered_then:
            self.abort(f"read nothing of {buffered} buffered bytes in {self.guard.send_timeout:g} s")
        else:
            self._check_progress_later(buffered)

    def abort(self, reason: str) -> None:
        """Drop the TCP connection now; pending sends and receives raise ``ConnectionClosed``."""
        if self.aborted is not None:
            return
        self.aborted = reason
        if self.guard.on_abort is not None:
            self.guard.on_abort(self, reason)
        self.transport.abort()
