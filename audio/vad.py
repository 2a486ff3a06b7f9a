"""Voice activity detection and endpointing: audio chunks in, turn events out.

Contract:
- `voiced_bounds(audio, rate_hz, frame_ms=10, threshold_db=-35.0)` -> (first voiced sample, one
  past the last): frames within `threshold_db` of the loudest frame's RMS (no model; for trimming
  recordings and finding where a voice ended). Silent audio gives (0, 0).
- `Endpointer(sample_rate_hz=16000, aggressiveness=2, frame_ms=20, pre_roll_ms=300,
  min_speech_ms=200, end_silence_ms=600, backend="webrtc", max_utterance_ms=30000,
  check_silence_ms=0, quiet_db=0.0, confirm_start="")`.
  `.feed(chunk)` takes float32 mono chunks of any size (int16 arrays are accepted too) and returns
  the events decided by that chunk, in order: `SpeechStarted`, `PauseCheck` and `SpeechEnded`.
  Stream times (`t_s`, `audio_start_s`) count seconds of audio fed since creation or `reset()`.
- A turn starts once `min_speech_ms` of voiced frames have been seen with no pause longer than
  `_START_GAP_MS` between them, so a cough or a click is not a turn. `SpeechStarted.t_s` is the
  start of the first voiced frame (the event itself is emitted `min_speech_ms` later).
- Confirmed starts (`confirm_start="silero"`, with the webrtc backend): a start candidate opens a
  turn only once the silero model has also called some of its audio speech (P >= 0.5 in one of its
  32 ms frames, run from `_CONFIRM_CONTEXT_MS` before the candidate's first voiced frame). webrtcvad
  takes knocks and coughs for speech (its hangover makes three knocks 300 ms of "speech"); silero
  calls them 0.0-0.1 and real speech 0.9-1.0 within 30-130 ms of its start, well before webrtc's
  `min_speech_ms`, so speech starts as soon as without it. A candidate still unconfirmed after
  `_CONFIRM_MAX_MS` (a long noise) is dropped and the next voiced frame starts a new one. "" turns
  it off. 8 or 16 kHz only (silero's rates).
- A turn ends after `end_silence_ms` of unvoiced frames, or when it reaches `max_utterance_ms`
  (then the next voiced audio starts a new turn at once). `SpeechEnded.t_s` is the endpoint: the
  stream time at which the end was decided. `SpeechEnded.audio` holds the utterance: `pre_roll_ms`
  of audio before the first voiced frame (so the start of the first word is never cut), the
  speech, and up to `pre_roll_ms` of trailing audio after the last voiced frame.
- Quiet frames (`quiet_db` > 0): inside a turn, a frame whose RMS is more than `quiet_db` below
  the turn's mean voiced level (in dB, over its voiced frames so far, at least
  `_QUIET_MIN_FRAMES` of them) counts as unvoiced whatever the classifier says. webrtcvad calls
  about 100 ms of silence after speech voiced (its hangover); on a line whose background is that
  far below the voice, a pause is then counted from the end of the speech itself. Over a louder
  background no frame is that quiet and the classifier alone decides. 0: off.
- Semantic end of turn: with `check_silence_ms` > 0, every pause inside a turn that reaches
  `check_silence_ms` of unvoiced frames emits one `PauseCheck` carrying the utterance so far
  (trailing silence included) and a `pause_id`. Whoever judges it (an end-of-turn model) may call
  `.end_turn(pause_id)`, which closes the turn at once (a `SpeechEnded` with `early=True`) if the
  same pause still goes on, and returns [] if the caller spoke again or the turn already ended.
  `.shorten_pause(pause_id, silence_ms)` lets that same pause end the turn after `silence_ms`
  of silence instead of `end_silence_ms` (a judge that cannot tell, as when the transcript is
  unsure): the turn ends at once (returned) if the pause is already that long, else when it gets
  there (from `feed`), with `early=True` either way; speech resets it.
  Otherwise the turn ends at `end_silence_ms` as usual: that is then the fallback.
- `.utterance_audio()` is the audio of the turn in progress (the same layout, growing), or an empty
  array between turns: the input for partial transcripts. `.in_speech` says whether a turn is open.
- `.reset()` forgets everything, stream time included.
- Backends: "webrtc" (webrtcvad; 8/16/32/48 kHz; frame_ms 10, 20 or 30; aggressiveness 0..3 is
  webrtcvad's mode) and "silero" (the ONNX model bundled in the `silero-vad` package, run with
  onnxruntime, no torch; 8 or 16 kHz; fixed 32 ms frames; aggressiveness 0..3 maps to a speech
  probability threshold of 0.3, 0.4, 0.5, 0.6). A missing optional backend raises
  `AudioModelNotFoundError` with the install command; bad settings raise `AudioError`.
"""

from __future__ import annotations

import collections
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from audio.errors import AudioError, AudioModelNotFoundError

__all__ = [
    "BACKENDS",
    "CONFIRM_MODELS",
    "Endpointer",
    "FrameClassifier",
    "PauseCheck",
    "SileroVad",
    "SpeechEnded",
    "SpeechStarted",
    "WebRtcVad",
    "make_classifier",
    "voiced_bounds",
]

BACKENDS = ("webrtc", "silero")

# A start candidate survives pauses up to this long (stop closures and short gaps between
# syllables) and is dropped after a longer one, so two coughs half a second apart are not a turn.
_START_GAP_MS = 200
# Confirmed starts: silero runs from this long before the candidate's first voiced frame (its
# recurrent state warms up on the background), and gives up on a candidate after this long.
_CONFIRM_CONTEXT_MS = 64
_CONFIRM_MAX_MS = 3000
CONFIRM_MODELS = ("", "silero")
# The quiet-frame rule needs this many voiced frames of the turn to know its level.
_QUIET_MIN_FRAMES = 5


@dataclass(frozen=True)
class SpeechStarted:
    """A turn has started (emitted `min_speech_ms` after the first voiced frame)."""

    t_s: float  # stream time of the first voiced frame


@dataclass(frozen=True)
class SpeechEnded:
    """A turn has ended; carries the whole utterance."""

    t_s: float  # stream time of the endpoint (when the end was decided)
    audio: np.ndarray = field(repr=False)  # float32 mono: pre-roll + speech + trailing pad
    audio_start_s: float = 0.0  # stream time of audio[0]
    speech_start_s: float = 0.0  # stream time of the first voiced frame
    speech_end_s: float = 0.0  # stream time of the end of the last voiced frame
    early: bool = False  # ended before the full end silence: by `end_turn`, or a pause `shorten_pause` shortened


@dataclass(frozen=True)
class PauseCheck:
    """A pause of `check_silence_ms` inside a turn: is the turn over? (see `Endpointer.end_turn`)"""

    t_s: float  # stream time at which the pause reached check_silence_ms
    audio: np.ndarray = field(repr=False)  # the utterance so far, as `utterance_audio()`
    pause_id: int  # names this pause for `end_turn`
    speech_end_s: float = 0.0  # stream time of the end of the last voiced frame


class FrameClassifier(Protocol):
    """Says whether one fixed-size frame is speech. Frames are finite float32 in [-1, 1] (the
    Endpointer cleans its input once per chunk, see `_as_mono_float32`)."""

    frame_samples: int

    def is_speech(self, frame: np.ndarray) -> bool: ...

    def reset(self) -> None: ...


class WebRtcVad:
    """webrtcvad (the WebRTC GMM voice detector): cheap, 10/20/30 ms frames."""

    SAMPLE_RATES_HZ = (8000, 16000, 32000, 48000)
    FRAME_MS = (10, 20, 30)

    def __init__(self, sample_rate_hz: int, aggressiveness: int = 2, frame_ms: int = 20) -> None:
        import webrtcvad

        if sample_rate_hz not in self.SAMPLE_RATES_HZ:
            raise AudioError(
                f"the webrtc VAD needs {self.SAMPLE_RATES_HZ} Hz audio, got {sample_rate_hz} Hz: resample first"
            )
        if frame_ms not in self.FRAME_MS:
            raise AudioError(f"the webrtc VAD takes frames of {self.FRAME_MS} ms, got frame_ms={frame_ms}")
        self._vad = webrtcvad.Vad(int(aggressiveness))
        self._sample_rate_hz = sample_rate_hz
        self.frame_samples = sample_rate_hz * frame_ms // 1000

    def is_speech(self, frame: np.ndarray) -> bool:
        # A clean frame (see FrameClassifier) needs no checks: this runs 50 times per second of
        # every call's audio, on the event loop. Truncation instead of rounding moves a sample by
        # at most one step of 16 bits, nothing a voice detector can tell.
        return self._vad.is_speech((frame * np.float32(32767.0)).astype(np.int16).tobytes(), self._sample_rate_hz)

    def reset(self) -> None:
        """webrtcvad keeps only slowly adapting noise statistics; nothing to clear."""


_SILERO_THRESHOLDS = (0.3, 0.4, 0.5, 0.6)


def silero_model_path() -> Path:
    """The ONNX model bundled in the installed `silero-vad` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec("silero_vad")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AudioModelNotFoundError(
            "the silero VAD (vad.backend = \"silero\", vad.confirm_start = \"silero\") needs the silero-vad package: pip install silero-vad"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.exists():
        raise AudioModelNotFoundError(
            f"the silero-vad package has no bundled model at {path}; reinstall it: pip install --force-reinstall silero-vad"
        )
    return path


_silero: Any = None


def _silero_session() -> Any:
    """One onnxruntime session for every SileroVad of the process (each keeps its own recurrent
    state; a session's `run` may be called from several threads)."""
    global _silero
    if _silero is None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # One frame is ~0.1 ms of work: threads only add scheduling overhead.
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        _silero = onnxruntime.InferenceSession(str(silero_model_path()), sess_options=options, providers=["CPUExecutionProvider"])
    return _silero


class SileroVad:
    """Silero VAD v5+ (a small LSTM) through onnxruntime: 32 ms frames, a recurrent state."""

    SAMPLE_RATES_HZ = (8000, 16000)

    def __init__(self, sample_rate_hz: int, aggressiveness: int = 2) -> None:
        if sample_rate_hz not in self.SAMPLE_RATES_HZ:
            raise AudioError(
                f"the silero VAD needs {self.SAMPLE_RATES_HZ} Hz audio, got {sample_rate_hz} Hz: resample first"
            )
        self._session = _silero_session()
        self._sample_rate_hz = sample_rate_hz
        self.frame_samples = 512 if sample_rate_hz == 16000 else 256
        self._context_samples = 64 if sample_rate_hz == 16000 else 32
        self.threshold = _SILERO_THRESHOLDS[int(aggressiveness)]
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, self._context_samples), dtype=np.float32)

    def probability(self, frame: np.ndarray) -> float:
        """Speech probability of one frame (advances the recurrent state)."""
        x = np.concatenate([self._context, frame.reshape(1, -1).astype(np.float32)], axis=1)
        out, self._state = self._session.run(
            None, {"input": x, "state": self._state, "sr": np.array(self._sample_rate_hz, dtype=np.int64)}
        )
        self._context = x[:, -self._context_samples :]
        return float(out.reshape(-1)[0])

    def is_speech(self, frame: np.ndarray) -> bool:
        return self.probability(frame) >= self.threshold


def make_classifier(backend: str, sample_rate_hz: int, aggressiveness: int, frame_ms: int) -> FrameClassifier:
    """The frame classifier for a backend name (see the module docstring)."""
    if not 0 <= int(aggressiveness) <= 3:
        raise AudioError(f"VAD aggressiveness must be 0..3, got {aggressiveness}")
    if backend == "webrtc":
        return WebRtcVad(sample_rate_hz, aggressiveness, frame_ms)
    if backend == "silero":
        return SileroVad(sample_rate_hz, aggressiveness)
    raise AudioError(f"unknown VAD backend {backend!r} (known: {', '.join(BACKENDS)})")


def _as_mono_float32(chunk: np.ndarray) -> np.ndarray:
    a = np.asarray(chunk)
    if a.ndim == 2 and 1 in a.shape:
        a = a.ravel()
    if a.ndim != 1:
        raise AudioError(f"expected mono audio (a 1-D array), got shape {a.shape}")
    if a.dtype == np.int16:
        return a.astype(np.float32) / np.float32(32768.0)
    if a.dtype.kind != "f":
        raise AudioError(f"expected float32 or int16 audio, got dtype {a.dtype}")
    # Non-finite samples are treated as silence rather than poisoning the detector state.
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():  # nan_to_num costs several passes: only where it changes something
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(a, -1.0, 1.0)


class Endpointer:
    """webrtcvad or silero frames -> SpeechStarted / SpeechEnded (see the module docstring)."""

    def __init__(
        self,
        sample_rate_hz: int = 16000,
        aggressiveness: int = 2,
        frame_ms: int = 20,
        pre_roll_ms: int = 300,
        min_speech_ms: int = 200,
        end_silence_ms: int = 600,
        backend: str = "webrtc",
        max_utterance_ms: int = 30_000,
        check_silence_ms: int = 0,
        quiet_db: float = 0.0,
        confirm_start: str = "",
    ) -> None:
        for name, value in (
            ("pre_roll_ms", pre_roll_ms),
            ("min_speech_ms", min_speech_ms),
            ("end_silence_ms", end_silence_ms),
            ("check_silence_ms", check_silence_ms),
        ):
            if value < 0:
                raise AudioError(f"{name} must be >= 0, got {value}")
        if max_utterance_ms <= 0:
            raise AudioError(f"max_utterance_ms must be > 0, got {max_utterance_ms}")
        if not 0.0 <= quiet_db < 200.0:
            raise AudioError(f"quiet_db must be in [0, 200), got {quiet_db}")
        if confirm_start not in CONFIRM_MODELS:
            raise AudioError(f"confirm_start must be one of {CONFIRM_MODELS}, got {confirm_start!r}")
        self._quiet_db = float(quiet_db)
        self.sample_rate_hz = int(sample_rate_hz)
        self.backend = backend
        self._classifier = make_classifier(backend, self.sample_rate_hz, aggressiveness, frame_ms)
        # The confirming model, at P >= 0.5 (silero confirming silero would add nothing).
        self._confirm = SileroVad(self.sample_rate_hz, aggressiveness=2) if confirm_start and backend != "silero" else None
        self.frame_samples = self._classifier.frame_samples
        self.frame_ms = self.frame_samples * 1000 / self.sample_rate_hz
        self._pre_roll_samples = self.sample_rate_hz * pre_roll_ms // 1000
        self._min_speech_frames = max(1, int(np.ceil(min_speech_ms / self.frame_ms)))
        self._start_gap_frames = max(1, int(np.ceil(_START_GAP_MS / self.frame_ms)))
        self._end_silence_frames = max(1, int(np.ceil(end_silence_ms / self.frame_ms)))
        # 0: no checks. A check due no sooner than the end itself is never emitted.
        self._check_frames = int(np.ceil(check_silence_ms / self.frame_ms)) if check_silence_ms > 0 else 0
        self._max_utterance_frames = max(1, int(max_utterance_ms / self.frame_ms))
        self._tail_frames = int(np.ceil(pre_roll_ms / self.frame_ms))
        self._pause_serial = 0  # PauseCheck ids, never reused (not even after reset)
        self._pre_roll_frames = int(np.ceil(self._pre_roll_samples / self.frame_samples))
        self._confirm_context_frames = int(np.ceil(_CONFIRM_CONTEXT_MS / self.frame_ms))
        self._confirm_max_frames = int(np.ceil(_CONFIRM_MAX_MS / self.frame_ms))
        self.reset()

    # --- state ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget all audio and state; stream time restarts at 0."""
        self._classifier.reset()
        self._pending = np.zeros(0, dtype=np.float32)  # samples not yet making a whole frame
        self._frames_seen = 0  # frames classified since reset
        # Recent frames before any turn (pre-roll + start candidate): (frame index, samples).
        self._history: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        # The start candidate: first voiced frame index, voiced frame count, last voiced index.
        self._cand_first = -1
        self._cand_voiced = 0
        self._cand_last = -1
        self._cand_db = 0.0  # sum of the candidate's voiced frame levels (dB)
        self._confirmed = False  # the confirming model called some of the candidate's audio speech
        self._confirm_pending = np.zeros(0, dtype=np.float32)  # its input not yet making a frame
        # The open turn.
        self.in_speech = False
        self._utt: list[np.ndarray] = []
        self._utt_start_frame = 0  # frame index of _utt[0] (pre-roll start, frame aligned)
        self._utt_lead_samples = 0  # pre-roll samples that precede the first whole frame
        self._speech_first = 0  # frame index of the first voiced frame
        self._speech_last = 0  # frame index of the last voiced frame
        self._silence_run = 0  # unvoiced frames since the last voiced frame
        self._open_pause = -1  # pause_id of the PauseCheck of the pause going on, or -1
        self._pause_end_frames = 0  # this pause's own end silence (shorten_pause), 0: end_silence_ms
        self._level_db = 0.0  # sum of the turn's voiced frame levels (dB) ...
        self._level_frames = 0  # ... over this many frames

    @staticmethod
    def _db(frame: np.ndarray) -> float:
        """The frame's RMS level in dB, floored at -100 (digital silence would weigh on a mean)."""
        return 10.0 * float(np.log10(max(float(np.dot(frame, frame)) / frame.size, 1e-10)))

    def _t(self, frame_index: int) -> float:
        return frame_index * self.frame_samples / self.sample_rate_hz

    # --- feeding -------------------------------------------------------------------------------

    def feed(self, chunk: np.ndarray) -> list[SpeechStarted | PauseCheck | SpeechEnded]:
        """Classify the whole frames now available; return the events they decide."""
        audio = _as_mono_float32(chunk)
        if self._pending.size:
            audio = np.concatenate([self._pending, audio])
        n_frames = audio.size // self.frame_samples
        events: list[SpeechStarted | PauseCheck | SpeechEnded] = []
        for i in range(n_frames):
            frame = audio[i * self.frame_samples : (i + 1) * self.frame_samples]
            voiced = self._classifier.is_speech(frame)
            index = self._frames_seen
            self._frames_seen += 1
            if self.in_speech:
                self._in_turn(index, frame, voiced, events)
            else:
                self._between_turns(index, frame, voiced, events)
        self._pending = audio[n_frames * self.frame_samples :].copy()
        return events

    def _between_turns(self, index: int, frame: np.ndarray, voiced: bool, events: list) -> None:
        if self._cand_first >= 0 and self._confirm is not None and index - self._cand_first >= self._confirm_max_frames:
            self._cand_first = -1  # a long noise the confirming model never called speech
        if voiced and self._cand_first < 0:
            self._cand_first = index
            self._cand_voiced = 0
            self._cand_db = 0.0
            if self._confirm is not None:
                self._confirm.reset()
                self._confirmed = False
                context = [f for i, f in self._history if i >= index - self._confirm_context_frames]
                self._confirm_pending = np.concatenate(context) if context else np.zeros(0, dtype=np.float32)
        self._history.append((index, frame.copy()))
        if self._cand_first >= 0 and self._confirm is not None and not self._confirmed:
            self._run_confirm(frame)
        if voiced:
            self._cand_voiced += 1
            self._cand_last = index
            if self._quiet_db:
                self._cand_db += self._db(frame)
        elif self._cand_first >= 0 and index - self._cand_last > self._start_gap_frames:
            self._cand_first = -1  # too short: a cough, a click
        if self._cand_first >= 0 and self._cand_voiced >= self._min_speech_frames and (self._confirm is None or self._confirmed):
            self._open_turn(events)
            return
        # Keep the candidate and the pre-roll before it (or before now when there is none).
        keep_from = (self._cand_first if self._cand_first >= 0 else index + 1) - self._pre_roll_frames
        while self._history and self._history[0][0] < keep_from:
            self._history.popleft()

    def _run_confirm(self, frame: np.ndarray) -> None:
        """Feed the confirming model the candidate's audio, one of its frames at a time."""
        confirm = self._confirm
        pending = np.concatenate([self._confirm_pending, frame])
        n = confirm.frame_samples
        done = 0
        while pending.size - done >= n and not self._confirmed:
            self._confirmed = confirm.is_speech(pending[done : done + n])
            done += n
        self._confirm_pending = pending[done:]

    def _open_turn(self, events: list) -> None:
        first = self._cand_first
        pre_roll_start = first - self._pre_roll_frames
        frames = [(i, f) for i, f in self._history if i >= pre_roll_start]
        self._utt = [f for _, f in frames]
        self._utt_start_frame = frames[0][0]
        # Trim the pre-roll to exactly pre_roll_ms where a whole frame would overshoot it.
        have = (first - self._utt_start_frame) * self.frame_samples
        self._utt_lead_samples = max(0, have - self._pre_roll_samples)
        self._history.clear()
        self._speech_first = first
        self._speech_last = self._cand_last
        self._silence_run = 0  # a turn opens on a voiced frame
        self._level_db, self._level_frames = self._cand_db, self._cand_voiced
        self._cand_first = -1
        self.in_speech = True
        events.append(SpeechStarted(t_s=self._t(first)))

    def _in_turn(self, index: int, frame: np.ndarray, voiced: bool, events: list) -> None:
        self._utt.append(frame.copy())
        if voiced and self._quiet_db:
            level = self._db(frame)
            if self._level_frames >= _QUIET_MIN_FRAMES and level < self._level_db / self._level_frames - self._quiet_db:
                voiced = False  # the classifier's hangover, or a pause over a quiet background
            else:
                self._level_db += level
                self._level_frames += 1
        if voiced:
            self._speech_last = index
            self._silence_run = 0
            self._open_pause = -1
            self._pause_end_frames = 0
        else:
            self._silence_run += 1
        too_long = index + 1 - self._utt_start_frame >= self._max_utterance_frames
        shortened = 0 < self._pause_end_frames <= self._silence_run < self._end_silence_frames
        if self._silence_run >= self._end_silence_frames or too_long or shortened:
            self._close_turn(index, events, early=shortened and not too_long)
        elif self._check_frames and self._silence_run == self._check_frames:
            self._pause_serial += 1
            self._open_pause = self._pause_serial
            events.append(
                PauseCheck(
                    t_s=self._t(index + 1),
                    audio=self.utterance_audio(),
                    pause_id=self._open_pause,
                    speech_end_s=self._t(self._speech_last + 1),
                )
            )

    def end_turn(self, pause_id: int) -> list[SpeechEnded]:
        """End the turn now if the pause `pause_id` (from a `PauseCheck`) still goes on."""
        if pause_id != self._open_pause:  # -1 unless a turn is open and that pause goes on
            return []
        events: list[SpeechEnded] = []
        self._close_turn(self._frames_seen - 1, events, early=True)
        return events

    def shorten_pause(self, pause_id: int, silence_ms: int) -> list[SpeechEnded]:
        """Let the pause `pause_id` end the turn after `silence_ms` of silence (see the module
        docstring); the turn's end if that is already past, else []."""
        if silence_ms < 0:
            raise AudioError(f"silence_ms must be >= 0, got {silence_ms}")
        if pause_id != self._open_pause:
            return []
        self._pause_end_frames = max(1, int(np.ceil(silence_ms / self.frame_ms)))
        if self._silence_run < self._pause_end_frames:
            return []
        return self.end_turn(pause_id)

    def _close_turn(self, index: int, events: list, early: bool = False) -> None:
        # Keep up to the pre-roll length of audio after the last voiced frame.
        end_frame = min(index, self._speech_last + self._tail_frames)  # inclusive
        n_frames = end_frame - self._utt_start_frame + 1
        audio = np.concatenate(self._utt[:n_frames])[self._utt_lead_samples :]
        events.append(
            SpeechEnded(
                t_s=self._t(index + 1),
                audio=audio,
                audio_start_s=self._t(self._utt_start_frame) + self._utt_lead_samples / self.sample_rate_hz,
                speech_start_s=self._t(self._speech_first),
                speech_end_s=self._t(self._speech_last + 1),
                early=early,
            )
        )
        # The last frames seen are the pre-roll of a turn that starts right away.
        n_kept = min(self._pre_roll_frames, len(self._utt))
        kept = self._utt[len(self._utt) - n_kept :]
        self._history = collections.deque((index + 1 - n_kept + k, f) for k, f in enumerate(kept))
        self.in_speech = False
        self._open_pause = -1
        self._pause_end_frames = 0
        self._utt = []

    # --- reading -------------------------------------------------------------------------------

    def utterance_audio(self) -> np.ndarray:
        """The audio of the turn in progress (pre-roll included), or an empty array."""
        if not self.in_speech or not self._utt:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._utt)[self._utt_lead_samples :]

    @property
    def time_s(self) -> float:
        """Stream time of the audio fed so far (whole frames and pending samples)."""
        return (self._frames_seen * self.frame_samples + self._pending.size) / self.sample_rate_hz


def voiced_bounds(audio: np.ndarray, rate_hz: int, *, frame_ms: int = 10, threshold_db: float = -35.0) -> tuple[int, int]:
    """(first voiced sample, one past the last voiced sample) by frame RMS energy.

    A frame is voiced when its RMS is within `threshold_db` of the loudest frame's. Silent
    audio gives (0, 0).
    """
    frame = max(1, rate_hz * frame_ms // 1000)
    n_frames = audio.size // frame
    if n_frames == 0:
        return 0, 0
    frames = audio[: n_frames * frame].astype(np.float64).reshape(n_frames, frame)
    rms = np.sqrt(np.mean(frames * frames, axis=1))  # (n_frames,)
    peak = float(rms.max())
    if peak <= 1e-6:
        return 0, 0
    voiced = np.flatnonzero(rms >= peak * 10 ** (threshold_db / 20))
    return int(voiced[0]) * frame, (int(voiced[-1]) + 1) * frame
