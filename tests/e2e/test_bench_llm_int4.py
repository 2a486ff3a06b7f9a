"""`voice-agent bench llm` on the embedded fine-tuned model with int4 decoding steps: the fidelity
report against float32 (fine-tune included), the single-forward costs, the memory line and bar, and a
missing llama.cpp reference that leaves one note and a complete run."""

from __future__ import annotations

import json

import pytest

from voice_agent import cli
from voice_agent.bench import reference


@pytest.mark.slow
def test_bench_llm_int4_reports_fidelity_costs_and_memory(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reference, "llama_cpp_missing", lambda: "llama-cpp-python is not installed (test)")
    out = tmp_path / "llm.json"
    # The fine-tuned model on int4 steps: its float32 reference must carry the fine-tune too (the
    # base's logits are about 25 away from the fine-tune's, far outside the bound below).
    status = cli.main(["bench", "--set", "llm.model=smollm2-135m-grounded-int4", "llm", "--engines", "ar", "--weights",
                       "int4", "--concurrency", "1", "--max-new-tokens", "6", "--reference", "llama.cpp", "--fidelity",
                       "--json", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    assert report["dtype"] == "torch.bfloat16" and report["reference"] is None and report["reference_bars"] is None
    assert report["weights"] == "int4"  # the format that ran (with "auto" it depends on the CPU)
    assert any("llama.cpp skipped" in note for note in report["notes"])
    fidelity = report["fidelity"]
    replies = report["results"][0]["replies"]
    assert fidelity["replies"] == replies and 0 <= fidelity["differing_replies"] <= replies
    assert len(fidelity["float32_token_ids"]) == replies
    # bf16 activations and int4 steps: close to float32, not equal (the issue asks to report it).
    assert 0 < fidelity["max_abs_logit_diff"] < 5
    costs = report["forward_costs"]
    assert costs["step_ms"] > 0 and costs["prefill_ms"] > 0 and set(costs["bars"]) == {
        "block_step_ratio", "block_bulk_ratio", "prefill_ms"}
    assert costs["floors"] == {"measured": False, "why": "the model does not run block products"}  # int4: torch's
    memory = report["memory"]
    assert 200e6 < memory["weight_bytes"] < 450e6
    # In a test process what the load added is whatever this process's allocator made of it (the
    # magnitudes are checked in a fresh process below); the report's fields agree with each other.
    assert memory["process_rss_bytes"] - memory["process_rss_before_load_bytes"] == memory["llm_rss_bytes"]
    assert set(memory["in_use_bytes"]) == {"ar"}
    bar = memory["bars"]["llm_resident_mb"]
    assert bar["value"] == pytest.approx(memory["llm_rss_bytes"] / 1e6) and bar["pass"] == (bar["value"] <= 400)
    printed = capsys.readouterr().out
    assert "of which the model's load added" in printed and "llm_resident_mb" in printed
    assert "against the same weights in float32" in printed and "single forwards" in printed
    assert "torch.bfloat16 on int4 weights" in printed
    assert "floors at this CPU's peak: not measured (the model does not run block products)" in printed


@pytest.mark.slow
def test_bench_llm_measures_what_the_default_models_load_adds_in_a_fresh_process(tmp_path):
    """The memory line as a user's `voice-agent bench llm` process sees it: the load adds the
    weights and a little more (tokenizer, draft head), nothing like the KV cache it allocates.
    The default's drafts, counted by the head's confidence, are in the report and printed."""
    import subprocess
    import sys

    out = tmp_path / "llm.json"
    run = subprocess.run([sys.executable, "-m", "voice_agent", "bench", "llm", "--concurrency", "1", "--max-new-tokens",
                          "4", "--heldout", "dlm/assets/smollm2-135m-grounded-greedy.jsonl.gz", "--n-prompts", "2",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    memory = report["memory"]
    weights, added = memory["weight_bytes"], memory["llm_rss_bytes"]
    assert 0.5 * weights < added < weights + 400e6
    # Each engine's cache (1.6 GB if it were all resident, float32 at 4096 positions) added little.
    # (about the load: the single forwards' cache is freed before the engines run, and a few MB may be
    # trimmed after the load as well)
    assert all(0.9 * added <= in_use < added + 200e6 for in_use in memory["in_use_bytes"].values())
    assert set(memory["in_use_bytes"]) == {"dllm", "ar"}
    acceptance = {r["engine"]: r["draft_acceptance"] for r in report["results"]}
    assert acceptance["ar"] is None and sum(b["verified"] for b in acceptance["dllm"]["head"]) > 0
    assert "drafts accepted (dllm, concurrency 1; greedy rows)" in run.stdout
    assert report["draft_settings"]["draft_branches"] == 1  # the default: one chain, as printed
    assert any(line.startswith("draft settings:") and "draft_branches 1" in line for line in run.stdout.splitlines())
