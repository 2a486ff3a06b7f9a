"""`voice-agent bench turns`: the endpointing run over a labelled item, the rows, the whole command.

The endpointing tests use espeak-ng speech through the real endpointer with scripted verdicts;
the command test builds a small turn set (two sentences, piper and espeak-ng, cut with whisper's
word times) and runs the real Smart Turn model, the prosody model and the real text score over it
(a minute or so).
"""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest

from voice_agent.bench import turns as turn_set
from voice_agent.bench.prompts import espeak, voiced_bounds
from voice_agent.bench.turns import RATE, TurnItem, first_end_s, outcome
from voice_agent.commands._audio_setup import make_endpointer
from voice_agent.commands.bench_turns import add_arguments, run, summarize
from voice_agent.config import load_config

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def paused_item() -> TurnItem:
    """ "Book a table | for two people" with 800 ms spliced in, then 2 s of silence."""
    first, second = espeak("Book a table"), espeak("for two people")
    first = first[slice(*voiced_bounds(first, RATE))]
    second = second[slice(*voiced_bounds(second, RATE))]
    audio = np.concatenate([first, np.zeros(RATE * 8 // 10, np.float32), second, np.zeros(2 * RATE, np.float32)])
    end = voiced_bounds(audio, RATE)[1] / RATE
    return TurnItem("x-paused", "paused", "Book a table for two people", "en-us", 175.0, audio, end, 800, "Book a table")


def endpointer(**overrides):
    return make_endpointer(load_config(), RATE, **overrides)


def test_silence_alone_cuts_into_a_long_pause_or_waits_its_length(paused_item):
    assert outcome(paused_item, first_end_s(paused_item, endpointer, end_silence_ms=300)) == "cut"
    wait = outcome(paused_item, first_end_s(paused_item, endpointer, end_silence_ms=1000))
    assert isinstance(wait, float) and 1000 <= wait <= 1000 + 250  # the VAD's own hangover on top


def test_a_verdict_ends_the_turn_where_it_says_over(paused_item):
    calls = []

    def over_at_the_end(k, audio):
        calls.append(audio.size / RATE)
        return audio.size / RATE > paused_item.speech_end_s - 0.5, 0.1, 0  # the last pause only; 100 ms late

    end = first_end_s(paused_item, endpointer, end_silence_ms=1500, check_ms=100, verdict=over_at_the_end)
    wait = outcome(paused_item, end)
    assert isinstance(wait, float) and 200 <= wait <= 450, wait
    assert len(calls) >= 2, "the spliced pause and the end were both judged"
    always = first_end_s(paused_item, endpointer, end_silence_ms=1500, check_ms=100, verdict=lambda k, a: (True, 0.05, 0))
    assert outcome(paused_item, always) == "cut"
    never = first_end_s(paused_item, endpointer, end_silence_ms=1500, check_ms=100, verdict=lambda k, a: (False, 0.05, 0))
    assert outcome(paused_item, never) >= 1500
    # Not over, but an unsure transcript: the pause ends the turn after the shorter silence,
    # here inside the 800 ms spliced pause (a cut); one longer than the pause cuts nothing.
    unsure = first_end_s(paused_item, endpointer, end_silence_ms=1500, check_ms=100, verdict=lambda k, a: (False, 0.05, 500))
    assert outcome(paused_item, unsure) == "cut"
    patient = first_end_s(paused_item, endpointer, end_silence_ms=1500, check_ms=100, verdict=lambda k, a: (False, 0.05, 1000))
    assert 1000 <= outcome(paused_item, patient) <= 1000 + 250
    # A verdict slower than the pause comes too late to end anything there.
    slow = first_end_s(paused_item, endpointer, end_silence_ms=1500, check_ms=100, verdict=lambda k, a: (k > 0, 1.0, 0))
    assert outcome(paused_item, slow) != "cut"
    assert outcome(paused_item, None) == "missed"


def test_rows_count_waits_over_complete_items_and_cuts_over_paused_ones():
    kinds = {"a": "complete", "b": "complete", "c": "complete", "p": "paused", "q": "paused"}
    row = summarize("text", {"check_ms": 100}, {"a": 300.0, "b": 500.0, "c": "cut", "p": "cut", "q": 900.0}, kinds)
    assert row["median_wait_ms"] == 400.0 and row["paused_cut_share"] == 0.5 and row["complete_cut_share"] == pytest.approx(1 / 3)
    assert row["meets_bar"] is False
    fine = summarize("text", {}, {"a": 200.0, "p": 800.0, "q": 900.0}, kinds)
    assert fine["meets_bar"] is True


@pytest.mark.slow
def test_the_command_writes_a_table_json_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(turn_set, "SENTENCES", turn_set.SENTENCES[:2])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--tag", "t", "--cache-dir", str(tmp_path / "cache"),
                              "--silence-ms", "600", "--checks-ms", "100", "--thresholds", "0.5", "--text-thresholds", "0.03",
                              "--unsure-silence-ms", str(load_config().turn.unsure_silence_ms), "--no-progress"])
    assert run(args, load_config()) == 0
    document = json.loads((tmp_path / "t.json").read_text())
    assert len(document["items"]) == 2 * 2 * 2  # 2 sentences x 2 voices x (complete, paused)
    assert {i["kind"] for i in document["items"]} == {"complete", "paused"}
    assert all(i["cut_after"] for i in document["items"] if i["kind"] == "paused")
    detectors = [r["detector"] for r in document["rows"]]
    assert detectors == ["silence", "smart-turn", "text", "smart-turn+text", "prosody", "prosody+text"]
    assert document["configured"]["detector"] == load_config().turn.detector
    # Each model scored the checks its detectors reached (which checks those are depends on the
    # verdicts and their times, so not every check has every score).
    for key in ("prosody_p", "smart-turn_p", "text_p"):
        values = [s[key] for s in document["scores"] if key in s]
        assert values and all(0.0 <= v <= 1.0 for v in values), key
    assert all(s["transcript"] is not None for s in document["scores"] if "text_p" in s)
    assert (tmp_path / "t.png").stat().st_size > 10_000 and (tmp_path / "t.txt").exists()
    out = capsys.readouterr().out
    assert "(configured)" in out and "paused cut" in out
    # A second run reads the cached recordings.
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert run(args, load_config()) == 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached
