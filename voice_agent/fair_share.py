"""Fair share of the shared models between calls: a call that has kept the models busy far more
than a conversation does runs in the background, behind every other call's work.

On two cores, every model job of one call (a whisper decode, a piper sentence, an end-of-turn
check, an engine step) slows down every other call's. Queues that are fair per model (docs/
reliability.md) still let one call keep all of them busy at once, and take half the machine from
an honest caller. The ledger counts, per call, the seconds of model work done for it, decayed
with a half-life; a call whose recent rate reaches `busy_cpus` (model-seconds per second: a
conversation, whose stages mostly take turns and which listens half of the time, takes about
0.3 here, a flooding call about 0.9) and `RELATIVE` times the lightest other call's is in the
background until its rate falls below half of `busy_cpus` or below the lightest other call's.
(Job times are wall times: on a crowded CPU every call's rate rises; the relative rule keeps
equals equal.) A call whose input the per-call rate limits refused (`over_limit`: more replies,
items or audio than `agent.max_*` allow) is in the background at once, for a half-life after
the last refusal, whatever its rate: a flooding client's cost grows with the history it builds,
so its rate lags behind the harm it does (measured: 0.1-0.25 model-s/s for its first 25 s, then
0.8-0.95), while a conversation never meets those limits. Such a call is no one's yardstick
either: the relative rule compares a call with the lightest other call that is not over a
limit. A background call's new jobs wait while any other call has work in flight, and
its engine rows yield to the others' (`dlm.engine.Engine.set_background`), also while another
call's speech is being transcribed or synthesized (`Engine.pause_background`: an engine step
runs on both cores and would slow that job down as much as another engine row would). Nothing is
refused, and it is work-conserving: a background call alone, or beside calls with nothing to do,
runs at full speed.

Contract:
- `CallShare(busy_cpus=BUSY_CPUS, half_life_s=HALF_LIFE_S, clock=time.monotonic)`;
  `busy_cpus <= 0` turns it off (no call is ever in the background).
- `join(owner)` / `leave(owner)`: a call's life; `leave` forgets its usage and its jobs.
- `charge(owner, seconds)` / `charge_many({owner: seconds})`: model work done for that owner
  (thread-safe; the engine's `on_usage` is `charge_many`). Owners that never joined (chat API
  requests) are not counted.
- `over_limit(owner)`: the per-call limits just refused some of `owner`'s input (thread-safe).
- `rate(owner)`: its decayed model-seconds per second. `background()`: the calls in the
  background now (recomputed at every charge and on demand; `on_background(owners)` is called
  with the new set whenever it changes, under the ledger's lock, from whichever thread charged:
  it must be quick and must not call the ledger).
- `begin(owner)` / `end(owner)`: one job in flight (a job waiting for its model counts too; the
  session counts its caller's speech as one).
  `on_foreground_jobs(busy)`, where set, is called whenever "a call not in the background has a
  job in flight" changes (under the lock, from the thread that changed it; quick, no ledger calls).
  `foreground_busy(llm_owners)`: whether a call not in the background has a job in flight or
  (per `llm_owners`, the engine's `load().owners`) requests in the LLM.
- `must_wait(owner, llm_owners)`: `owner` is in the background and another call has work in
  flight. `async wait_turn(owner, llm_owners)`: returns once that is not so, polling every
  `POLL_S` (`llm_owners` is then a function). Cancelling it is safe.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping

__all__ = ["BUSY_CPUS", "HALF_LIFE_S", "POLL_S", "RELATIVE", "CallShare"]

POLL_S = 0.05
BUSY_CPUS = 0.5  # the defaults of agent.busy_call_cpus and agent.busy_call_half_life_s
HALF_LIFE_S = 10.0
RELATIVE = 2.0  # a call enters the background only at this many times the lightest other call's rate

log = logging.getLogger(__name__)


class _Usage:
    __slots__ = ("at", "jobs", "refused_at", "seconds")

    def __init__(self, at: float) -> None:
        self.seconds = 0.0  # decayed model-seconds as of `at`
        self.at = at
        self.jobs = 0  # jobs in flight
        self.refused_at: float | None = None  # when a per-call limit last refused its input


class CallShare:
    def __init__(self, busy_cpus: float = BUSY_CPUS, half_life_s: float = HALF_LIFE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if half_life_s <= 0:
            raise ValueError("half_life_s must be above 0")
        self.busy_cpus = busy_cpus
        self.half_life_s = half_life_s
        self._decay = math.log(2) / half_life_s  # rate = decayed seconds x this
        self._clock = clock
        self._lock = threading.Lock()
        self._calls: dict[str, _Usage] = {}
        self._background: frozenset[str] = frozenset()
        self.on_background: Callable[[frozenset[str]], None] | None = None
        self._foreground_jobs = False
        self.on_foreground_jobs: Callable[[bool], None] | None = None

    def join(self, owner: str) -> None:
        with self._lock:
            self._calls.setdefault(owner, _Usage(self._clock()))

    def leave(self, owner: str) -> None:
        with self._lock:
            self._calls.pop(owner, None)
            self._tell_foreground_jobs()
        self.background()

    def charge(self, owner: str, seconds: float) -> None:
        self.charge_many({owner: seconds})

    def charge_many(self, usage: Mapping[str, float]) -> None:
        now = self._clock()
        with self._lock:
            for owner, seconds in usage.items():
                call = self._calls.get(owner)
                if call is not None:
                    call.seconds = self._decayed(call, now) + max(0.0, seconds)
                    call.at = now
        self.background()

    def _decayed(self, call: _Usage, now: float) -> float:
        return call.seconds * math.exp(-self._decay * max(0.0, now - call.at))

    def over_limit(self, owner: str) -> None:
        """A per-call limit refused some of `owner`'s input now: it is in the background (unless
        alone, or the share is off) for a half-life, and longer while the rate rule holds."""
        with self._lock:
            call = self._calls.get(owner)
            if call is not None:
                call.refused_at = self._clock()
        self.background()

    def _refused(self, call: _Usage, now: float) -> bool:
        return call.refused_at is not None and now - call.refused_at < self.half_life_s

    def rate(self, owner: str) -> float:
        with self._lock:
            call = self._calls.get(owner)
            return 0.0 if call is None else self._decayed(call, self._clock()) * self._decay

    def background(self) -> frozenset[str]:
        """The calls in the background now (see the module docstring); tells `on_background` of a
        change."""
        with self._lock:
            now = self._clock()
            rates = {owner: self._decayed(call, now) * self._decay for owner, call in self._calls.items()}
            refused = {owner for owner, call in self._calls.items() if self._refused(call, now)}
            current = frozenset(owner for owner, rate in rates.items() if self._busy(owner, rate, rates, refused))
            if current != self._background:
                log.info("calls in the background (fair share): %s; others: %s", ", ".join(
                    f"{owner} at {rates[owner]:.2f} model-s/s{' (over a limit)' if owner in refused else ''}"
                    for owner in sorted(current)) or "none", ", ".join(
                    f"{owner} at {rate:.2f}" for owner, rate in sorted(rates.items()) if owner not in current) or "none")
                self._background = current
                if self.on_background is not None:  # under the lock: listeners see the sets in order
                    self.on_background(current)
                self._tell_foreground_jobs()
        return current

    def _busy(self, owner: str, rate: float, rates: dict[str, float], refused: set[str]) -> bool:
        """Alone, never. Over a limit lately (`refused`), always. Else enter the background at
        `busy_cpus` and RELATIVE x the lightest other call's rate (of those not over a limit);
        leave below half of `busy_cpus` or that call's rate (hysteresis: held back, a call's rate
        falls, and it must not come back at once)."""
        if self.busy_cpus <= 0 or len(rates) < 2:
            return False
        if owner in refused:
            return True
        others = [r for o, r in rates.items() if o != owner and o not in refused]
        if not others:
            return False
        if owner in self._background:
            return rate >= self.busy_cpus / 2 and rate >= min(others)
        return rate >= self.busy_cpus and rate >= RELATIVE * min(others)

    def begin(self, owner: str | None) -> None:
        """One more job of `owner` in flight (None: nobody's)."""
        self._count_job(owner, 1)

    def end(self, owner: str | None) -> None:
        """That job is done (or was dropped before it ran)."""
        self._count_job(owner, -1)

    def _count_job(self, owner: str | None, step: int) -> None:
        with self._lock:
            call = self._calls.get(owner) if owner is not None else None
            if call is not None:
                call.jobs = max(0, call.jobs + step)
                self._tell_foreground_jobs()

    def _tell_foreground_jobs(self) -> None:
        """Under the lock: call `on_foreground_jobs` if whether a call outside the background has
        a job in flight has changed."""
        busy = any(call.jobs > 0 for owner, call in self._calls.items() if owner not in self._background)
        if busy != self._foreground_jobs:
            self._foreground_jobs = busy
            if self.on_foreground_jobs is not None:
                self.on_foreground_jobs(busy)

    def foreground_busy(self, llm_owners: Mapping[str, int]) -> bool:
        background = self.background()  # brings _foreground_jobs up to date with the set
        with self._lock:
            return self._foreground_jobs or any(owner not in background and llm_owners.get(owner, 0) > 0
                                                for owner in self._calls)

    def must_wait(self, owner: str | None, llm_owners: Mapping[str, int]) -> bool:
        """Whether `owner` is in the background while another call has work in flight."""
        return owner is not None and owner in self.background() and self.foreground_busy(llm_owners)

    async def wait_turn(self, owner: str | None, llm_owners: Callable[[], Mapping[str, int]]) -> None:
        """Wait while `must_wait(owner, llm_owners())`."""
        # Polled, not an event: usage decays with time and the engine's rows change in its thread.
        while owner is not None and self.must_wait(owner, llm_owners()):  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)
