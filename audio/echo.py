"""How the agent's own voice comes back in the caller's audio: an echo path learnt from levels.

A speakerphone without echo cancelling plays the reply and its microphone picks it up again,
some tens to hundreds of milliseconds later and some decibels down. `EchoPath` learns that delay
and gain from 20 ms RMS levels alone (no waveforms: the reply and the caller's audio may be at
other rates, through other codecs), so that the session can tell the echo from a caller talking
over the reply: a caller's frame is echo when it is no louder than the echo the path predicts
for it (plus a margin: the session's `ECHO_MARGIN_DB`), whatever the caller's own level.

Contract:
- `EchoPath(max_delay_frames=40, floor_db=-60.0, history_frames=500)`.
- `.observe(near_db, far_db)`: one caller frame: its level in dBFS and the levels of the reply
  frames played 0, 1, ... `max_delay_frames` frames before it (an array of that length + 1;
  `floor_db` where nothing played). Kept in a rolling history of `history_frames` frames (10 s),
  across replies: the echo path of a call does not change from one reply to the next.
- `.estimate()` -> `Estimate(kind, delay_frames, gain_db)`: from the history, for each candidate
  delay (`delay_frames` 0..max: whole frames; max + 1 + d: half a frame past d, the mean power of
  frames d and d + 1, as an echo that straddles two frames hears them), the frames whose reply
  level there is loud enough to be heard back (above `floor_db` + 20 dB); r = caller level -
  reply level. Where an echo comes back at that delay with gain g, r is g in every frame the
  caller is silent (and above it where the caller talks over it); at other delays r follows the
  reply's own envelope. So the delay is the candidate whose lower half of r is tightest, and the
  gain that lower half's middle (30th percentile):
  "echo" where that spread is at most `SPREAD_DB`, half the median spread or less (an echo
  comes back at one delay, not at all of them), over at least `ECHO_FRAMES` frames (fewer
  match a caller's speech by chance), and the gain is above `NONE_DB`; "none" where
  the gain would be at most `NONE_DB` (-30 dB) at every delay heard over `MIN_FRAMES` loud reply
  frames, and those reach `NONE_SEEN_FRAMES` (0.4 s: nothing comes back: an echo canceller, a
  handset, a headset; an echo found later at a longer delay still becomes "echo"); "unknown"
  otherwise (too little heard yet, or the caller talking over most of it).
  Once "echo" or "none" has been found, an "unknown" history (the caller talking over the
  reply) keeps it: the last clear answer stands until the next one.
- `.echo_db(far_db, estimate)` -> the level the echo of a frame may have (dBFS): the loudest of
  its reply levels within `SMEAR_FRAMES` of the estimated delay, plus the gain; None unless the
  estimate is "echo".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ECHO_FRAMES", "MIN_FRAMES", "NONE_DB", "NONE_SEEN_FRAMES", "SPREAD_DB", "EchoPath", "Estimate", "level_db"]

MIN_FRAMES = 12  # loud reply frames at every delay before "none" is said
ECHO_FRAMES = 25  # loud reply frames at a delay before an echo there is believed (fewer: a chance match)
SPREAD_DB = 4.0  # the lower half of r (10th to 50th percentile) this tight: an echo at that delay
SMEAR_FRAMES = 2  # the predicted echo is the loudest within this many frames of its delay
NONE_DB = -30.0  # an echo this far below the reply, if any, is taken for none
NONE_SEEN_FRAMES = 20  # "none" once the delays up to this (0.4 s) have been heard without an echo
_LOUD_DB = 20.0  # a reply frame this far above the floor would be heard back


def level_db(rms: float | np.ndarray, floor_db: float = -60.0) -> float | np.ndarray:
    """RMS (full scale 1.0) in dBFS, never below `floor_db`."""
    return np.maximum(20.0 * np.log10(np.maximum(rms, 1e-12)), floor_db)


@dataclass(frozen=True)
class Estimate:
    kind: str  # "echo" | "none" | "unknown"
    delay_frames: int = 0
    gain_db: float = 0.0


class EchoPath:
    def __init__(self, max_delay_frames: int = 40, floor_db: float = -60.0, history_frames: int = 500) -> None:
        if max_delay_frames < 1 or history_frames < MIN_FRAMES:
            raise ValueError("max_delay_frames must be >= 1 and history_frames >= MIN_FRAMES")
        self.max_delay_frames = max_delay_frames
        self.floor_db = floor_db
        self._near = np.full(history_frames, floor_db)
        self._far = np.full((history_frames, max_delay_frames + 1), floor_db)
        self._n = 0  # frames observed (the history holds the last history_frames of them)
        self._known = Estimate("unknown")  # the last "echo" or "none": kept while the history is unclear

    def observe(self, near_db: float, far_db: np.ndarray) -> None:
        i = self._n % self._near.size
        self._near[i] = max(float(near_db), self.floor_db)
        self._far[i] = np.maximum(far_db, self.floor_db)
        self._n += 1

    def _envelopes(self, far_db: np.ndarray) -> np.ndarray:
        """The reply's level as heard back at each candidate delay: (..., 2 * max_delay + 1): whole
        frames 0..max (an echo aligned with the frames), then the mean power of frames d and d + 1
        (an echo half a frame off: half of each)."""
        power = 10.0 ** (far_db / 10.0)
        halves = 10.0 * np.log10((power[..., :-1] + power[..., 1:]) / 2.0)
        return np.concatenate([far_db, halves], axis=-1)

    def estimate(self) -> Estimate:
        estimate = self._estimate()
        if estimate.kind != "unknown":
            self._known = estimate
        return self._known

    def _estimate(self) -> Estimate:
        n = min(self._n, self._near.size)
        near, far = self._near[:n, None], self._envelopes(self._far[:n])  # (frames, 1), (frames, candidates)
        loud = far > self.floor_db + _LOUD_DB
        counts = loud.sum(axis=0)
        if counts.max(initial=0) < MIN_FRAMES:
            return Estimate("unknown")
        r = np.sort(np.where(loud, near - far, np.inf), axis=0)  # each candidate's values first, then inf
        ok = np.flatnonzero(counts >= MIN_FRAMES)
        at = np.rint(np.array([[0.1], [0.3], [0.5]]) * (counts[ok] - 1)).astype(np.intp)  # nearest-rank percentiles
        p10, p30, p50 = np.take_along_axis(r[:, ok], at, axis=0)
        spread = np.where((p30 > NONE_DB) & (counts[ok] >= ECHO_FRAMES), p50 - p10, np.inf)
        best = int(np.argmin(spread))
        # An echo at one delay (and its neighbours) and not at the others: the best spread stands out.
        if spread[best] <= SPREAD_DB and spread[best] <= 0.5 * np.median(p50 - p10):
            return Estimate("echo", int(ok[best]), float(p30[best]))
        seen = counts[: min(NONE_SEEN_FRAMES, self.max_delay_frames) + 1]  # whole-frame delays 0..0.4 s
        if (seen >= MIN_FRAMES).all() and p30.max() <= NONE_DB:
            return Estimate("none")
        return Estimate("unknown")

    def echo_db(self, far_db: np.ndarray, estimate: Estimate) -> float | None:
        if estimate.kind != "echo":
            return None
        far = np.maximum(np.asarray(far_db, dtype=np.float64), self.floor_db)
        envelopes = self._envelopes(far)
        # The loudest within SMEAR_FRAMES of the delay, of the same kind (whole or half frames): an
        # echo's onsets and ends are not sharp to the frame (the room, the codec, the frames' phase).
        whole = estimate.delay_frames <= self.max_delay_frames
        lo, hi = (0, self.max_delay_frames + 1) if whole else (self.max_delay_frames + 1, envelopes.size)
        near = envelopes[max(lo, estimate.delay_frames - SMEAR_FRAMES) : min(hi, estimate.delay_frames + SMEAR_FRAMES + 1)]
        return float(near.max() + estimate.gain_db)
