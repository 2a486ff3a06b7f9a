r"""Scheduling speech recognition: one shared model, many calls, finals first.

Contract:
- `AsrPriority`: what a decode is for, most urgent first: `FINAL` (a caller is waiting for the
  reply), `SPECULATIVE` (the LLM may start early on it), `PARTIAL` (live captions only).
- `PriorityGate`: one holder at a time; waiters are served by priority, then first come first
  served. A decode that has started cannot be interrupted (CTranslate2 has no abort), so a final
  waits at most for the one decode that is running, never for queued partials. Event-loop only
  (not thread-safe), one loop at a time: used from another loop it starts afresh (the old loop
  is over; tests run one `asyncio.run` after another on shared services). Cancelling `acquire`
  is safe (the place in the queue is given up, or the gate passed on if it had just been granted).
- `normalize_transcript(text)`: lower case, words only (`[\w']+` runs joined by one space):
  how transcripts are compared (the speculative start) and read (the text end-of-turn score).
- `TranscriptStream`: the ASR of one call's utterances over the shared model, with the rules of
  `audio.asr.StreamingTranscriber` (a decode is reused when the audio only differs by quiet
  trailing audio, so the endpointer's silence costs no decode), made asynchronous and
  prioritized. At most one decode per call is queued or running. `partial()` skips audio already
  decoded; `hypothesis()` (speculative start, end-of-turn checks) and `final()` cancel a queued
  decode of other speech or at a lower priority, wait for a running decode or a queued one of
  the same speech at their priority or above, reuse it where it covers the speech, and decode
  otherwise at their own priority (two hypotheses of one pause share one decode). Cancelling a
  caller of these methods never cancels a decode that has started: its result still serves the
  next request of the call. `close()` (the call is over) cancels every decode of the call, queued
  or running, and returns their tasks to await: none outlives the call (a running decode's thread
  finishes on its own, unread; the services release the model when it does).
  (StreamingTranscriber itself cannot be used here: it decides inside `partial()` whether to
  decode, and decodes synchronously, so a priority could not be applied before the model runs.)
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["AsrPriority", "PriorityGate", "TranscribeFn", "TranscriptStream", "normalize_transcript"]

log = logging.getLogger(__name__)

# Trailing audio this much quieter than the speech (RMS ratio, -20 dB) cannot change a transcript
# (the value of audio.asr's StreamingTranscriber).
QUIET_TAIL_RATIO = 0.1


_WORDS = re.compile(r"[\w']+")


def normalize_transcript(text: str) -> str:
    """Lower case, words only: 'Hello, there!' and 'hello there' match."""
    return " ".join(_WORDS.findall(text.lower()))


class AsrPriority(enum.IntEnum):
    FINAL = 0
    SPECULATIVE = 1
    PARTIAL = 2


class PriorityGate:
    """A lock whose waiters are served by priority (see the module docstring)."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # heap
        self._order = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def held(self) -> bool:
        return self._held

    def waiting(self) -> int:
        return sum(1 for _, _, f in self._waiters if not f.done())

    async def acquire(self, priority: int) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._held, self._waiters = loop, False, []
        if not self._held and not self.waiting():
            self._held = True
            return
        future: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._waiters, (int(priority), next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted as we were cancelled: hand it on
            raise  # else: the cancelled future is skipped by release()

    def release(self) -> None:
        if self._loop is not None and self._loop.is_closed():
            return  # a decode that outlived its loop: the next acquire starts afresh
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)  # the gate stays held: handed over
                return
        self._held = False


# transcribe(audio_16k, priority=..., on_start=...): the services' prioritized ASR call;
# `on_start` runs on the event loop when the decode leaves the queue and starts.
TranscribeFn = Callable[..., Awaitable[str]]


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64)))) if a.size else 0.0


def same_speech(decoded: np.ndarray, audio: np.ndarray) -> bool:
    """True when one audio is a prefix of the other and the rest is only quiet audio."""
    short, long = (audio, decoded) if audio.size <= decoded.size else (decoded, audio)
    if short.size == 0 or not np.array_equal(short, long[: short.size]):
        return False
    return long.size == short.size or _rms(long[short.size :]) <= QUIET_TAIL_RATIO * _rms(short)


@dataclass
class _Job:
    audio: np.ndarray
    priority: AsrPriority
    task: asyncio.Task[str]
    started: bool = False


class TranscriptStream:
    """Partial, speculative and final transcripts of one call (see the module docstring)."""

    def __init__(self, transcribe: TranscribeFn) -> None:
        self._transcribe = transcribe
        self._job: _Job | None = None
        self._decodes: set[asyncio.Task[str]] = set()  # every decode task of the call not yet done
        self._last: tuple[np.ndarray, str] | None = None  # the newest decode of this utterance
        self._epoch = 0  # bumped per utterance: a late decode of the previous one is not reused
        self.decodes = 0  # decodes started (for tests and benchmarks)
        self.reused = 0  # hypotheses and finals answered by an earlier decode

    @property
    def busy(self) -> bool:
        """A decode of this call is queued or running."""
        return self._job is not None and not self._job.task.done()

    @property
    def running(self) -> AsrPriority | None:
        """The priority of this call's decode on the model now, or None."""
        job = self._job
        return job.priority if job is not None and job.started and not job.task.done() else None

    def covered(self, audio: np.ndarray) -> str | None:
        """The text of the newest decode if it covers `audio` (only quiet audio differs)."""
        if self._last is not None and same_speech(self._last[0], audio):
            return self._last[1]
        return None

    async def partial(self, audio: np.ndarray) -> str | None:
        """A hypothesis at partial priority; None if a decode is in flight or `audio` adds nothing."""
        if self.busy or self.covered(audio) is not None or not audio.size:
            return None
        return await asyncio.shield(self._start(audio, AsrPriority.PARTIAL).task)

    async def hypothesis(self, audio: np.ndarray, priority: AsrPriority = AsrPriority.SPECULATIVE) -> str:
        """The transcript of `audio` as it stands, reusing what this call already decoded."""
        job = self._job
        if job is not None and not job.task.done():
            if not job.started and not (job.priority <= priority and same_speech(job.audio, audio)):
                job.task.cancel()  # a queued decode of older audio (or less urgent): this one replaces it
            else:
                await asyncio.wait({job.task})  # running, or queued for this same speech: shared
        if (text := self.covered(audio)) is not None:
            self.reused += 1
            return text
        return await asyncio.shield(self._start(audio, priority).task)

    async def final(self, audio: np.ndarray) -> str:
        """The transcript of the finished utterance; the next call starts a new utterance."""
        try:
            return await self.hypothesis(audio, AsrPriority.FINAL)
        finally:
            self.reset()

    def drop_queued(self) -> None:
        """Cancel this call's decode if it has not started (nobody needs it any more)."""
        if self._job is not None and not self._job.started:
            self._job.task.cancel()

    def close(self) -> list[asyncio.Task[str]]:
        """The call is over: cancel its decodes, queued or running (see the module docstring);
        their tasks, to await."""
        tasks = list(self._decodes)
        for task in tasks:
            task.cancel()
        self.reset()
        return tasks

    def reset(self) -> None:
        """Start a new utterance (a queued decode is dropped; a running one is not reused)."""
        self.drop_queued()
        self._job = None
        self._last = None
        self._epoch += 1

    def _start(self, audio: np.ndarray, priority: AsrPriority) -> _Job:
        epoch = self._epoch
        job: _Job

        def started() -> None:
            job.started = True
            self.decodes += 1

        async def decode() -> str:
            text = await self._transcribe(audio, priority=priority, on_start=started)
            if self._epoch == epoch:
                self._last = (audio, text)
            return text

        job = _Job(audio, priority, asyncio.create_task(decode(), name=f"asr-{priority.name.lower()}"))
        # A failure is the requester's to report; a job nobody awaits any more must not log
        # "exception was never retrieved".
        job.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._decodes.add(job.task)
        job.task.add_done_callback(self._decodes.discard)
        self._job = job
        return job
