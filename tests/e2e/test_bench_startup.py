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


def test_bench_startup_times_real_servers_and_reads_their_memory(tmp_path, capsys, monkeypatch):
    """In a cache of its own (the kernel's library shared): the first server converts what it
    reads, and what it wrote is exactly what `gguf_conversions` lists for install.sh to make."""
    from dlm.gguf_file import cache_file, default_cache_dir
    from voice_agent.services import gguf_conversions

    kernels = default_cache_dir() / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("VOICE_AGENT_CACHE_DIR", str(tmp_path / "cache"))  # the servers inherit it
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kernels").symlink_to(kernels, target_is_directory=True)
    config = load_config(None)
    assert not conversions_cached(config)
    out = tmp_path / "startup.json"
    assert cli.main(["bench", "startup", "--repeats", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["runs"]) == 2 and report["conversions_cached_before"] is False
    for run in report["runs"]:
        assert 0 < run["ready_s"] < 300 and 100 < run["rss_mb"] <= run["peak_mb"]
    assert report["median"]["ready_s"] == round(statistics.median(r["ready_s"] for r in report["runs"]), 3)
    assert report["environment"]["cpu_count"] and report["overrides"] == []
    assert "| 1 (converted) |" in capsys.readouterr().out
    listed = {cache_file(path, tmp_path / "cache", dense=dense).name
              for path, kinds in gguf_conversions(config).items() for dense in kinds}
    assert listed and {p.name for p in (tmp_path / "cache" / "gguf").iterdir()} == listed


def test_a_server_that_cannot_start_is_reported_with_its_log(capsys):
    assert cli.main(["bench", "--set", "asr.model=/nonexistent/whisper", "startup", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "exited with status" in err and "/nonexistent/whisper" in err
    assert cli.main(["bench", "startup", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
