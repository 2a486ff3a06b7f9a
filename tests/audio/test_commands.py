"""The audio commands through the real CLI: say, transcribe, and the bench's VAD scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from audio.io import read_wav
from voice_agent.cli import main
from voice_agent.commands import _audio_setup


@pytest.fixture
def loaded_models(monkeypatch, synthesizer, transcriber):
    """The commands use the session's models instead of loading their own."""
    monkeypatch.setattr(_audio_setup, "load_synthesizer", lambda config: synthesizer)
    monkeypatch.setattr(_audio_setup, "load_transcriber", lambda config: transcriber)


def test_say_then_transcribe(tmp_path, capsys, loaded_models):
    out = tmp_path / "out.wav"
    assert main(["say", "Good evening. The kitchen is closed.", "-o", str(out), "--rate", "16000"]) == 0
    audio, rate = read_wav(out)
    assert rate == 16000 and audio.size > 16000
    capsys.readouterr()
    assert main(["transcribe", str(out), "--turns", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # Piper's synthesis is not deterministic (its duration and noise sampling are random), and
    # tiny.en sometimes mishears "kitchen"; the command pipeline is what this test checks.
    assert len(result["turns"]) == 1
    text = result["turns"][0]["text"].lower()
    assert "evening" in text and "closed" in text, text


def test_unreadable_file_and_bad_options_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"nope")
    assert main(["transcribe", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a WAV" in err
    assert main(["say", "hi", "-o", str(tmp_path / "x.wav"), "--rate", "5"]) == 2
    assert "--rate" in capsys.readouterr().err


def test_missing_model_package_names_the_install_command(capsys):
    assert main(["transcribe", "/dev/null", "--set", "asr.model=/nonexistent/whisper"]) == 2
    assert main(["say", "hi", "-o", "/tmp/x.wav", "--set", "tts.voice=/nonexistent/voice.onnx"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err


def test_bench_vad_scoring_on_a_generated_scene(espeak):
    from audio.vad import Endpointer
    from voice_agent.commands.bench_audio import build_scene, score_vad

    clips = [espeak("Hello, how are you?"), espeak("I am fine, thanks.")]
    scene, truth = build_scene(clips, snr_db=20.0)
    score = score_vad(Endpointer(16000), scene, truth)
    assert score["turns_expected"] == 2 and score["matched"] == 2
    assert score["false_turns"] == 0 and score["clipped_starts"] == 0
    assert isinstance(score["cpu_ms_per_audio_s"], float) and np.isfinite(score["cpu_ms_per_audio_s"])
