"""`voice-agent bench startup` on the real embedded models: real `serve` subprocesses, each started,
timed to its first /healthz answer, its memory read, and stopped."""

from __future__ import annotations

import json
import statistics

import pytest

from voice_agent import cli
from voice_agent.commands.bench_startup import conversions_cached
from voice_agent.config import load_config
from voice_agent.errors import UserError

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _embedded_models():
    from voice_agent.models import resolve_asr_model, resolve_llm_model, resolve_tts_voice

    try:  # skip (not fail) where a model package is not installed
        resolve_asr_model("tiny.en"), resolve_tts_voice("en_US-joe-medium"), resolve_llm_model("default")
    except UserError as e:
        pytest.skip(f"embedded models missing: {e}")


def test_bench_startup_times_real_servers_and_reads_their_memory(tmp_path, capsys):
    before = conversions_cached(load_config(None))
    out = tmp_path / "startup.json"
    assert cli.main(["bench", "startup", "--repeats", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["runs"]) == 2 and report["conversions_cached_before"] == before
    for run in report["runs"]:
        assert 0 < run["ready_s"] < 300 and 100 < run["rss_mb"] <= run["peak_mb"]
    assert report["median"]["ready_s"] == round(statistics.median(r["ready_s"] for r in report["runs"]), 3)
    assert report["environment"]["cpu_count"] and report["overrides"] == []
    assert "| median |" in capsys.readouterr().out
    assert conversions_cached(load_config(None))  # what serve read is what install.sh is told to make


def test_a_server_that_cannot_start_is_reported_with_its_log(capsys):
    assert cli.main(["bench", "--set", "asr.model=/nonexistent/whisper", "startup", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "exited with status" in err and "/nonexistent/whisper" in err
    assert cli.main(["bench", "startup", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
