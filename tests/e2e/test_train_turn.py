"""`voice-agent train-turn`: the training clips, the held-out check, the head it writes.

The command test synthesizes a few sentences (piper and espeak-ng, cut with whisper's word
times) and fits a head on them (under a minute); the helpers are checked on numbers.
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest

from audio.prosody import ProsodyHead
from voice_agent.bench import turns as turn_set
from voice_agent.commands.train_turn import add_arguments, noise_floor, phone_line, roc_auc, run
from voice_agent.config import load_config
from voice_agent.errors import UserError


def test_roc_auc_counts_pairs_and_halves_ties():
    assert roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == 1.0
    assert roc_auc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([1, 1, 0, 0])) == 0.0
    assert roc_auc(np.array([0.5, 0.9, 0.5, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.array([0.1, 0.2]), np.array([1, 1]))


def test_training_sentences_are_not_the_ones_the_benchmarks_test_on():
    from voice_agent.bench.prompts import PROMPTS

    def norm(text: str) -> str:
        return " ".join("".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace()).split())

    train = [norm(s) for s in turn_set.TRAIN_SENTENCES]
    assert len(set(train)) == len(train), "a training sentence twice"
    tested = {norm(s) for s in turn_set.SENTENCES}
    tested |= {norm(" ".join(p.phrases)) for p in PROMPTS} | {norm(phrase) for p in PROMPTS for phrase in p.phrases}
    assert not tested & set(train)


def test_noise_floor_is_repeatable_and_between_its_levels():
    silence = np.zeros(16_000, np.float32)
    levels = [20 * np.log10(np.sqrt(np.mean(np.square(noise_floor(silence, seed))))) for seed in range(20)]
    assert all(-66 < level < -44 for level in levels) and max(levels) - min(levels) > 5
    np.testing.assert_array_equal(noise_floor(silence, 3), noise_floor(silence, 3))


def test_phone_line_keeps_the_length_and_the_band_of_a_phone_call():
    t = np.arange(16_000) / 16_000
    low, high = np.sin(2 * np.pi * 1000 * t), np.sin(2 * np.pi * 6000 * t)
    heard = phone_line((0.3 * (low + high)).astype(np.float32))
    assert heard.shape == (16_000,) and heard.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(heard[2000:-2000]))
    freqs = np.fft.rfftfreq(12_000, 1 / 16_000)
    assert spectrum[np.argmin(np.abs(freqs - 1000))] > 100 * spectrum[np.argmin(np.abs(freqs - 6000))]


def _args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--out", str(tmp_path / "head.npz"), "--cache-dir", str(tmp_path / "cache"),
                              "--voices-per-sentence", "2", "--no-progress", *extra])


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_the_command_fits_a_head_checks_it_on_left_out_sentences_and_writes_it(tmp_path, monkeypatch, capsys):
    sentences = ("Yes, please.", "I would like to order two large pizzas and a salad.",
                 "When does the library close on Saturdays?", "My neighbor's car is blocking our driveway.")
    monkeypatch.setattr(turn_set, "TRAIN_SENTENCES", sentences)
    assert run(_args(tmp_path, "--folds", "2"), load_config()) == 0
    out = capsys.readouterr().out
    assert "held out by sentence (2 folds): AUC" in out and "each clip also over a phone line" in out
    assert "each clip also over a noise floor" in out
    head = ProsodyHead.load(tmp_path / "head.npz")
    meta = head.meta
    assert meta["sentences"] == 4 and meta["voices_per_sentence"] == 2
    assert meta["phone_line_copies"] is True and meta["noise_floor_copies"] is True
    assert meta["over"] == 4 * 2 * 3  # every recording whole, also over the phone line and over noise
    assert meta["clips"] > meta["over"] * 3  # and cut at each of its word boundaries
    assert 0.0 <= meta["held_out"]["auc"] <= 1.0 and meta["held_out"]["folds"] == 2
    assert meta["features"] == head.weights.size == 3 * 384
    # A second run reads the cached recordings; without the copies there are a third of the clips.
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert run(_args(tmp_path, "--folds", "0", "--no-phone", "--no-noise"), load_config()) == 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached
    again = ProsodyHead.load(tmp_path / "head.npz").meta
    assert again["clips"] * 3 == meta["clips"] and again["held_out"] is None


@pytest.mark.parametrize("extra, message", [
    (("--folds", "1"), "--folds"),
    (("--folds", "-2"), "--folds"),
    (("--l2", "0"), "--l2"),
])
def test_bad_options_are_clear_errors(tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        run(_args(tmp_path, *extra), load_config())
