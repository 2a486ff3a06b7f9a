"""`voice-agent bench llm` with lossy acceptance (`llm.accept` < 1) on the embedded default model:
more drafts accepted, replies that differ from the AR engine's, and the teacher-NLL ratio that
says what that cost (issue 14's frontier)."""

from __future__ import annotations

import json

import pytest

from voice_agent import cli


@pytest.mark.slow
def test_bench_llm_reports_the_teacher_nll_ratio_of_lossy_replies(tmp_path, capsys):
    out = tmp_path / "llm.json"
    status = cli.main(["bench", "--set", "llm.model=smollm2-135m-drafter", "--set", "llm.accept=0.001", "llm",
                       "--concurrency", "1", "--max-new-tokens", "16", "--heldout",
                       "dlm/assets/smollm2-135m-grounded-greedy.jsonl.gz", "--n-prompts", "6", "--json", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    quality = report["lossy_quality"]
    assert quality["accept"] == 0.001 and quality["replies"] == 6
    assert quality["teacher_nll_per_token"] > 0 and quality["teacher_own_nll_per_token"] > 0
    assert quality["nll_ratio"] == pytest.approx(quality["teacher_nll_per_token"] / quality["teacher_own_nll_per_token"])
    # Accepting any draft the model gives a thousandth of its top probability: other replies.
    assert report["bars"]["differing_replies"]["value"] > 0
    assert quality["teacher_nll_per_token"] > quality["teacher_own_nll_per_token"]  # worse by the teacher's measure
    assert "lossy acceptance (llm.accept 0.001" in capsys.readouterr().out


@pytest.mark.slow
def test_exact_decoding_reports_no_lossy_quality_and_the_forwards_floors(tmp_path, capsys):
    out = tmp_path / "llm.json"
    assert cli.main(["bench", "--set", "llm.model=smollm2-135m-drafter", "llm", "--concurrency", "1",
                     "--max-new-tokens", "6", "--heldout", "dlm/assets/smollm2-135m-grounded-greedy.jsonl.gz",
                     "--n-prompts", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["lossy_quality"] is None and report["bars"]["differing_replies"]["value"] == 0
    # The block kernel's products at this CPU's peak: what the forward bars' work costs at the least.
    floors, costs = report["forward_costs"]["floors"], report["forward_costs"]
    printed = capsys.readouterr().out
    if floors["measured"]:
        assert (floors["layer_macs"], floors["output_macs"]) == (106_168_320, 28_311_552)  # SmolLM2-135M's projections
        assert 0 < floors["block_ms"] < costs["block_step_ms"] and 0 < floors["prefill_ms"] < costs["prefill_ms"]
        assert f"floors at this CPU's peak ({floors['products']}, {floors['threads']} threads" in printed
    else:
        assert floors["why"] and f"floors at this CPU's peak: not measured ({floors['why']})" in printed
