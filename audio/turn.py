"""End of turn from the sound of speech: Smart Turn v3.2, numpy audio in, a probability out.

Contract:
- `SmartTurn(model_path=None, threads=1)` loads the Smart Turn v3.2 ONNX model (Pipecat's open
  turn model: a Whisper-tiny encoder with a classifier head, BSD-2 licence) with onnxruntime.
  `model_path=None` is the copy bundled in the `pipecat-ai` wheel, installed with
  `pip install --no-deps pipecat-ai` (only the file is used; pipecat is never imported). A missing
  model raises `AudioModelNotFoundError` with that command; a file onnxruntime cannot load raises
  `AudioError`.
- `.probability(audio_16k)` -> the probability in [0, 1] that the speaker has finished their turn,
  given the utterance so far: float32 mono at 16 kHz, trailing silence included (the model is
  meant to run after a short pause). Only the last `WINDOW_S` (8 s) count; shorter audio is
  zero-padded at the front. About 50-75 ms on one core of the 2-core Xeon here; it holds the GIL
  only briefly, so it may run in a worker thread beside the event loop.
- `whisper_log_mel(audio_16k)` -> (80, 800) float32: the model's input, the log-mel features of
  `transformers.WhisperFeatureExtractor(chunk_length=8)` with `do_normalize=True` (zero mean,
  unit variance waveform first). The mel filter bank is faster-whisper's (the same Slaney bank).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from audio.errors import AudioError, AudioModelNotFoundError

__all__ = ["SAMPLE_RATE_HZ", "WINDOW_S", "SmartTurn", "smart_turn_model_path", "whisper_log_mel"]

SAMPLE_RATE_HZ = 16_000
WINDOW_S = 8
_N_FFT = 400
_HOP = 160
_N_MELS = 80
_INSTALL = "pip install --no-deps pipecat-ai"
_BUNDLED = ("audio", "turn", "smart_turn", "data", "smart-turn-v3.2-cpu.onnx")

_mel_filters: np.ndarray | None = None


def smart_turn_model_path() -> Path:
    """The Smart Turn v3.2 ONNX file inside the installed `pipecat-ai` package (found without
    importing pipecat, whose own dependencies are not installed)."""
    try:
        spec = importlib.util.find_spec("pipecat")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AudioModelNotFoundError(f"the smart-turn end-of-turn model comes from the pipecat-ai wheel: {_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_BUNDLED)
    if not path.exists():
        raise AudioModelNotFoundError(
            f"the installed pipecat-ai has no Smart Turn v3.2 model at {path}; install a version that has it: {_INSTALL}"
        )
    return path


def whisper_log_mel(audio_16k: np.ndarray) -> np.ndarray:
    """(80, 800) log-mel features of exactly `WINDOW_S` seconds (see the module docstring)."""
    global _mel_filters
    if _mel_filters is None:
        from faster_whisper.feature_extractor import FeatureExtractor

        _mel_filters = FeatureExtractor.get_mel_filters(SAMPLE_RATE_HZ, _N_FFT, n_mels=_N_MELS).T  # (201, 80)
    n = SAMPLE_RATE_HZ * WINDOW_S
    x = np.asarray(audio_16k, dtype=np.float32)
    if x.ndim != 1 or x.size != n:
        raise AudioError(f"whisper_log_mel takes {n} samples of mono audio, got shape {x.shape}")
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)  # in float32, as the reference does
    padded = np.pad(x.astype(np.float64), (_N_FFT // 2, _N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, _N_FFT)[::_HOP]  # (801, 400)
    power = np.abs(np.fft.rfft(frames * np.hanning(_N_FFT + 1)[:-1], axis=-1)) ** 2  # periodic Hann
    log_spec = np.log10(np.maximum(power @ _mel_filters, 1e-10)).T[:, :-1]  # (80, 800)
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def _last_window(audio_16k: np.ndarray) -> np.ndarray:
    a = np.asarray(audio_16k, dtype=np.float32).ravel()
    n = SAMPLE_RATE_HZ * WINDOW_S
    if a.size >= n:
        return a[-n:]
    return np.concatenate([np.zeros(n - a.size, dtype=np.float32), a])


class SmartTurn:
    """Smart Turn v3.2 through onnxruntime (see the module docstring)."""

    def __init__(self, model_path: str | Path | None = None, threads: int = 1) -> None:
        import onnxruntime

        path = smart_turn_model_path() if model_path in (None, "") else Path(model_path).expanduser()
        if not path.is_file():
            raise AudioModelNotFoundError(f"no Smart Turn model file at {path}")
        if threads < 1:
            raise AudioError(f"the turn model needs at least one thread, got threads={threads}")
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = int(threads)
        try:
            self._session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            raise AudioError(f"cannot load the turn model {path}: {type(e).__name__}: {e}") from e
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [_N_MELS, SAMPLE_RATE_HZ * WINDOW_S // _HOP]:
            raise AudioError(f"{path} is not a Smart Turn v3 model (inputs {[(i.name, i.shape) for i in inputs]})")
        self._input = inputs[0].name
        self.path = path

    def probability(self, audio_16k: np.ndarray) -> float:
        """P(the turn is over | the utterance so far, trailing silence included)."""
        features = whisper_log_mel(_last_window(audio_16k))[None]
        out = self._session.run(None, {self._input: features})[0]
        return float(np.clip(np.asarray(out, dtype=np.float64).reshape(-1)[0], 0.0, 1.0))
