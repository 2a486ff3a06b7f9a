"""`voice-agent bench llm --url`: the bench's own prompts, levels and records against an
OpenAI-compatible server (here our LLM tier on a tiny model), through the real command line."""

from __future__ import annotations

import json

from tier_helpers import TOKEN, RunningTier, tier_config, tiny_model

from voice_agent.cli import main


def test_bench_llm_measures_a_server_by_url(tmp_path, monkeypatch, capsys):
    config = tier_config(tiny_model(tmp_path / "model"))
    monkeypatch.setenv("OPENAI_API_KEY", TOKEN)  # llm.api_key_env: the server's token
    with RunningTier(config) as tier:
        out = tmp_path / "remote.json"
        status = main(["bench", "llm", "--url", tier.url, "--concurrency", "1,4", "--max-new-tokens", "6",
                       "--json", str(out)])
        assert status == 0, capsys.readouterr().err
        report = json.loads(out.read_text())
        assert report["model"] == tier.service.model_id and report["environment"]["url"] == tier.url
        levels = {r["concurrency"]: r for r in report["results"]}
        assert sorted(levels) == [1, 4]
        assert levels[1]["replies"] == 8 and levels[4]["replies"] == 8  # 8 prompts: 8 rounds of 1, 2 of 4
        for level in levels.values():
            assert level["errors"] == 0 and level["median_tokens"] == 6
            assert level["median_first_output_s"] > 0
            assert level["tokens_per_forward"] is not None  # our tier reports its forwards
            assert level["decode_tokens_per_forward"] == 1.0  # and what its prefill made: an AR engine's first token
        printed = capsys.readouterr().out
        assert "remote" in printed and tier.url in printed
        # A wrong key: every request fails, and the command says so.
        monkeypatch.setenv("OPENAI_API_KEY", "wrong")
        assert main(["bench", "llm", "--url", tier.url, "--model", tier.service.model_id, "--concurrency", "1",
                     "--max-new-tokens", "2"]) == 1
        assert "HTTP 401" in capsys.readouterr().out
        assert main(["bench", "llm", "--url", tier.url, "--fidelity"]) == 2
        assert main(["bench", "llm", "--url", tier.url, "--repeats", "2"]) == 2
        assert main(["bench", "llm", "--against-local"]) == 2


def test_against_local_pairs_the_server_with_the_same_model_in_process(tmp_path, monkeypatch, capsys):
    model = tiny_model(tmp_path / "model")
    monkeypatch.setenv("OPENAI_API_KEY", TOKEN)
    with RunningTier(tier_config(model)) as tier:
        out = tmp_path / "hop.json"
        status = main(["bench", "--set", f"llm.model={model}", "--set", "llm.dtype=float32", "llm", "--url", tier.url,
                       "--concurrency", "1", "--max-new-tokens", "4", "--against-local", "--json", str(out)])
        assert status == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    hop = report["hop"]
    assert hop["pairs"] == 8 and hop["bar"]["value"] is not None
    assert hop["local_first_output_ms"] > 0 and hop["remote_first_output_ms"] > 0
    local = next(r for r in report["results"] if r["engine"] == "local")
    remote = hop["remote_results"]
    # The same model, greedy, on the same prompts: the same replies in and out of the process.
    assert [r["text"] for r in local["replies_detail"]] == [r["text"] for r in remote["replies_detail"]]
    assert "the hop" in capsys.readouterr().out
