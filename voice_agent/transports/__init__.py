"""Transport framings: client messages in -> typed input events; typed output events -> messages out.

No I/O here (sans-I/O, like the `websockets` protocol classes): `feed(message)` returns input
events and queues any direct answer (errors, acknowledgements) for `take_outgoing()`; `encode(event)`
returns the messages for one output event. The server moves the bytes and paces the audio.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OutMessage"]


@dataclass(frozen=True)
class OutMessage:
    """One WebSocket text message to send."""

    data: str
    audio_s: float = 0.0  # seconds of reply audio it carries (the writer paces these in real time)
    turn_id: int = 0  # the turn it belongs to; audio of a flushed turn is not sent
    # Set on the last audio message of a reply chunk where the client does not acknowledge
    # playback itself: the writer reports the chunk as played once its audio has had time to play.
    played_chunk: int | None = None
