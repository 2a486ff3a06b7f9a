"""End of turn from how the last second before a pause sounds: a linear head on whisper's encoder.

A speaker who has finished a sentence ends it differently from one who pauses inside it (the
pitch falls, the last syllable lengthens); a transcript cannot show that, and the text score
cuts off callers whose fragment reads as a finished sentence ("my flight was delayed" before
"and I missed my connection": docs/turn-taking.md). This model listens for it: whisper tiny.en's encoder
over a fixed window at the end of the utterance, pooled, and a logistic regression on top,
trained by `voice-agent train-turn` on synthesized speech (piper and espeak-ng voices:
`voice_agent.bench.turns.build_training_clips`). Nothing says yet how it does on real callers.

Contract:
- `prosody_window(audio_16k)` -> float32 of exactly `WINDOW_S + TAIL_S` seconds: the last
  `WINDOW_S` before the end of the voiced audio (`audio.vad.voiced_bounds`: one past the last
  10 ms frame within `VOICED_DB` of the loudest) and the `TAIL_S` after it. Zero-padded at the front where the
  utterance is shorter (so that the window shows no more of its length than `WINDOW_S`) and at
  the back where the audio stops sooner. Silent audio gives zeros; NaN samples count as 0.
- `pool(encoded)` -> the feature vector (3 x the encoder width) of one window's
  encoder output (positions of 20 ms): the means over the last 500 ms and the last 160 ms before
  the end of the voice, and over the `TAIL_S` after it.
- `ProsodyHead(mean, scale, weights, bias, meta)`: `probability(features)` = the logistic of the
  standardized features' dot product; `.save(path)` / `ProsodyHead.load(path)` (an .npz; a file
  that is not one, or holds non-finite numbers, raises `AudioError`, a missing one
  `AudioModelNotFoundError`);
  `fit_head(features, labels, l2=100.0, meta=None)` fits one (the standardization from the
  features given; Newton's method; the two classes weighted equally).
- `WindowEncoder(whisper_model, threads=1)`: `whisper_model` a CTranslate2 Whisper folder (the
  embedded tiny.en, which the shipped head was trained on; a missing one raises
  `AudioModelNotFoundError`), loaded on its own (not the ASR's instance: no lock between them).
  `.features(audio_16k)` -> `pool` of the encoder over `prosody_window(audio_16k)` (a 2 s encoder
  input: the window's log-mel features, then zeros, as the ASR's short window pads them): about 9 ms
  on one core here.
- `ProsodyTurn(whisper_model, head_path=None, threads=1)`: a `WindowEncoder` and a head
  (`head_path` None or "": `DEFAULT_HEAD`, shipped in `audio/assets/`); a head that takes another
  number of features than the encoder gives raises `AudioError` here, not at the first pause. `.probability(audio_16k)`
  -> P(the turn is over | the utterance so far, trailing silence included): the interface of
  `audio.turn.SmartTurn`, so the session runs either as its audio turn model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from audio.errors import AudioError, AudioModelNotFoundError
from audio.vad import voiced_bounds

__all__ = [
    "DEFAULT_HEAD",
    "SAMPLE_RATE_HZ",
    "TAIL_S",
    "WINDOW_S",
    "ProsodyHead",
    "ProsodyTurn",
    "WindowEncoder",
    "fit_head",
    "pool",
    "prosody_window",
]

SAMPLE_RATE_HZ = 16_000
WINDOW_S = 1.0
TAIL_S = 0.1
VOICED_DB = -35.0
_POSITION_S = 0.02  # one encoder position
_ENCODER_FRAMES = 200  # the encoder's input: 2 s of 10 ms feature frames, the window zero-padded
DEFAULT_HEAD = Path(__file__).resolve().parent / "assets" / "prosody-turn.npz"


def prosody_window(audio_16k: np.ndarray) -> np.ndarray:
    """The fixed window at the end of the voice (see the module docstring)."""
    a = np.nan_to_num(np.asarray(audio_16k, dtype=np.float32).ravel(), nan=0.0, posinf=1.0, neginf=-1.0)
    before, after = int(WINDOW_S * SAMPLE_RATE_HZ), int(TAIL_S * SAMPLE_RATE_HZ)
    out = np.zeros(before + after, dtype=np.float32)
    end = voiced_bounds(a, SAMPLE_RATE_HZ, frame_ms=10, threshold_db=VOICED_DB)[1]
    if end == 0:  # empty or silent
        return out
    piece = a[max(0, end - before) : end + after]
    start = before - min(before, end)
    out[start : start + piece.size] = piece
    return out


def pool(encoded: np.ndarray) -> np.ndarray:
    """Pooled features of one window's encoder output, (positions, width) (see the module docstring)."""
    end = round(WINDOW_S / _POSITION_S)
    tail = round(TAIL_S / _POSITION_S)
    if encoded.ndim != 2 or encoded.shape[0] < end + tail:
        raise AudioError(f"expected at least {end + tail} encoder positions, got shape {encoded.shape}")
    spans = ((end - 25, end), (end - 8, end), (end, end + tail))
    return np.concatenate([encoded[a:b].mean(axis=0) for a, b in spans]).astype(np.float32)


class ProsodyHead:
    """A standardized logistic regression over pooled encoder features."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, weights: np.ndarray, bias: float, meta: dict | None = None) -> None:
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.weights = np.asarray(weights, dtype=np.float64)
        if not self.mean.shape == self.scale.shape == self.weights.shape or self.mean.ndim != 1:
            raise AudioError(f"a prosody head's mean, scale and weights must be vectors of one length, got "
                             f"{self.mean.shape}, {self.scale.shape}, {self.weights.shape}")
        if not np.all(self.scale > 0):
            raise AudioError("a prosody head's scale must be positive")
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.scale)) and np.all(np.isfinite(self.weights))
                and np.isfinite(bias)):
            raise AudioError("a prosody head's numbers must be finite")
        self.bias = float(bias)
        self.meta = dict(meta or {})

    def logit(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.shape[-1] != self.weights.size:
            raise AudioError(f"the prosody head takes {self.weights.size} features, got {x.shape[-1]}")
        return ((x - self.mean) / self.scale) @ self.weights + self.bias

    def probability(self, features: np.ndarray) -> np.ndarray | float:
        p = 1.0 / (1.0 + np.exp(-np.clip(self.logit(features), -60, 60)))
        return float(p) if np.ndim(p) == 0 else p

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # np.savez would add ".npz" to a name without it
            np.savez(f, mean=self.mean.astype(np.float32), scale=self.scale.astype(np.float32),
                     weights=self.weights.astype(np.float32), bias=np.float32(self.bias),
                     meta=np.array(json.dumps(self.meta, sort_keys=True)))

    @classmethod
    def load(cls, path: str | Path) -> ProsodyHead:
        path = Path(path).expanduser()
        if not path.is_file():
            raise AudioModelNotFoundError(f"no prosody turn head at {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if not isinstance(meta, dict):
                    raise ValueError("its meta is not a JSON object")
                return cls(z["mean"], z["scale"], z["weights"], float(z["bias"]), meta)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # AttributeError: a .npy, not an .npz
            raise AudioError(f"{path} is not a prosody turn head: {e}") from e


def fit_head(features: np.ndarray, labels: np.ndarray, l2: float = 100.0, meta: dict | None = None) -> ProsodyHead:
    """A logistic regression on standardized features, L2 penalty `l2` on the weights (not the
    bias), the two classes weighted to equal total weight; Newton's method to convergence."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64).ravel()
    if x.ndim != 2 or x.shape[0] != y.size or y.size == 0:
        raise AudioError(f"need a (samples, features) matrix and one label per sample, got {x.shape} and {y.shape}")
    if not set(np.unique(y)) == {0.0, 1.0}:
        raise AudioError("labels must be 0 (the turn goes on) and 1 (the turn is over), both present")
    if not np.all(np.isfinite(x)):
        raise AudioError("features must be finite")
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    z = np.hstack([(x - mean) / scale, np.ones((y.size, 1))])
    sample_w = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))  # each class sums to n / 2
    penalty = np.full(z.shape[1], float(l2))
    penalty[-1] = 0.0
    w = np.zeros(z.shape[1])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -60, 60)))
        grad = z.T @ (sample_w * (p - y)) + penalty * w
        hessian = (z * (sample_w * p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, grad)
        w -= step
        if float(np.max(np.abs(step))) < 1e-8:
            break
    return ProsodyHead(mean, scale, w[:-1], w[-1], meta)


class WindowEncoder:
    """Whisper's encoder over the window at the end of the voice, pooled (see the module docstring)."""

    def __init__(self, whisper_model: str | Path, threads: int = 1) -> None:
        import ctranslate2
        from faster_whisper.feature_extractor import FeatureExtractor

        if threads < 1:
            raise AudioError(f"the turn model needs at least one thread, got threads={threads}")
        folder = Path(whisper_model).expanduser()
        if not (folder / "model.bin").is_file():
            raise AudioModelNotFoundError(f"the prosody turn model needs a CTranslate2 whisper folder; none at {folder}")
        self._model = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="int8", intra_threads=int(threads))
        self._mel = FeatureExtractor(feature_size=self._model.n_mels)

    def encoded(self, audio_16k: np.ndarray) -> np.ndarray:
        """Whisper's encoder output over the window, (positions, width)."""
        import ctranslate2

        features = self._mel(prosody_window(audio_16k))[:, :_ENCODER_FRAMES]
        features = np.pad(features, ((0, 0), (0, _ENCODER_FRAMES - features.shape[1])))
        out = self._model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None], dtype=np.float32)),
                                 to_cpu=True)
        return np.asarray(out, dtype=np.float32)[0]

    def features(self, audio_16k: np.ndarray) -> np.ndarray:
        return pool(self.encoded(audio_16k))


class ProsodyTurn:
    """A `WindowEncoder` and a `ProsodyHead` (see the module docstring)."""

    def __init__(self, whisper_model: str | Path, head_path: str | Path | None = None, threads: int = 1) -> None:
        self.path = Path(head_path).expanduser() if head_path not in (None, "") else DEFAULT_HEAD
        self.head = ProsodyHead.load(self.path)
        self.encoder = WindowEncoder(whisper_model, threads)
        features = self.encoder.features(np.zeros(0, np.float32))  # also the encoder's first, slow run
        if features.size != self.head.weights.size:
            raise AudioError(f"the prosody head {self.path} takes {self.head.weights.size} features; this whisper "
                             f"encoder gives {features.size} (the head was trained on another model)")

    def probability(self, audio_16k: np.ndarray) -> float:
        """P(the turn is over | the utterance so far, trailing silence included)."""
        return float(self.head.probability(self.encoder.features(audio_16k)))
