"""Build the audio package's components from the configuration, for the audio commands.

Contract: each function resolves the configured model with `voice_agent.models` and returns the
loaded component. A missing model package or Python library raises `UserError` with one line
that names the install command; heavy libraries are imported only when called.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from voice_agent.config import Config
from voice_agent.errors import UserError
from voice_agent.models import resolve_asr_model, resolve_tts_voice

if TYPE_CHECKING:
    from audio.asr import Transcriber
    from audio.tts import Synthesizer
    from audio.vad import Endpointer

__all__ = ["load_synthesizer", "load_transcriber", "make_endpointer"]


# Import name -> PyPI distribution, for the install hint.
_DISTRIBUTIONS = {
    "faster_whisper": "faster-whisper",
    "ctranslate2": "faster-whisper",
    "piper": "piper-tts",
    "onnxruntime": "onnxruntime",
    "webrtcvad": "webrtcvad-wheels",
    "soxr": "soxr",
}


def _missing_library(e: ImportError) -> UserError:
    module = (e.name or "").split(".")[0]
    dist = _DISTRIBUTIONS.get(module, module or "?")
    return UserError(f"the Python package {dist!r} is not installed; install it with: pip install {dist}")


def load_transcriber(config: Config) -> Transcriber:
    """The configured faster-whisper model, loaded (never downloaded)."""
    model = resolve_asr_model(config.asr.model)
    # faster-whisper logs every call at INFO ("Processing audio with duration ..."): keep it for -v.
    whisper_log = logging.getLogger("faster_whisper")
    if whisper_log.level == logging.NOTSET and not logging.getLogger().isEnabledFor(logging.DEBUG):
        whisper_log.setLevel(logging.WARNING)
    try:
        from audio.asr import Transcriber

        return Transcriber(
            model,
            device=config.asr.device,
            compute_type=config.asr.compute_type,
            language=config.asr.language,
            beam_size=config.asr.beam_size,
            cpu_threads=config.asr.cpu_threads,
            audio_context=config.asr.audio_context,
        )
    except ImportError as e:
        raise _missing_library(e) from None


def load_synthesizer(config: Config) -> Synthesizer:
    """The configured piper voice, loaded."""
    voice = resolve_tts_voice(config.tts.voice)
    try:
        from audio.tts import Synthesizer

        return Synthesizer(
            voice,
            length_scale=config.tts.length_scale,
            max_sentence_chars=config.tts.max_sentence_chars,
        )
    except ImportError as e:
        raise _missing_library(e) from None


def make_endpointer(config: Config, sample_rate_hz: int = 16000, backend: str | None = None, **overrides: float) -> Endpointer:
    """An Endpointer with the [vad] settings (the backend and any Endpointer argument may be overridden)."""
    try:
        from audio.vad import Endpointer

        vad = config.vad
        settings = {
            "aggressiveness": vad.aggressiveness,
            "frame_ms": vad.frame_ms,
            "pre_roll_ms": vad.pre_roll_ms,
            "min_speech_ms": vad.min_speech_ms,
            "end_silence_ms": vad.end_silence_ms,
            "max_utterance_ms": vad.max_utterance_ms,
            "quiet_db": vad.quiet_db,
            "confirm_start": vad.confirm_start,
        }
        return Endpointer(sample_rate_hz=sample_rate_hz, backend=backend or vad.backend, **(settings | overrides))
    except ImportError as e:
        raise _missing_library(e) from None
