"""`voice-agent calibrate`: the config text it writes, a measurement on a tiny model (drafted and
AR), the choice between them, and a clear refusal for a model without a drafter."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import torch

from voice_agent.bench.rounds import in_rounds
from voice_agent.commands.calibrate import (
    choose,
    draft_settings,
    measure,
    measure_batch,
    with_table_keys,
)
from voice_agent.config import default_config_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dlm"))
from dlm_tiny_models import random_loaded

from dlm.drafter import Drafter, DrafterConfig


def test_with_table_keys_replaces_adds_and_keeps_everything_else():
    text = default_config_text()
    out = with_table_keys(text, "llm", {"draft_len": "3", "draft_tree": "false"})
    data, before = tomllib.loads(out), tomllib.loads(text)
    assert data["llm"]["draft_len"] == 3 and data["llm"]["draft_tree"] is False
    data["llm"].pop("draft_len"), data["llm"].pop("draft_tree")
    before["llm"].pop("draft_len"), before["llm"].pop("draft_tree")
    assert data == before  # nothing else changed
    added = tomllib.loads(with_table_keys("[llm]\nmodel = \"x\"\n[agent]\nmax_items = 3\n", "llm", {"draft_len": "2"}))
    assert added == {"llm": {"model": "x", "draft_len": 2}, "agent": {"max_items": 3}}
    assert tomllib.loads(with_table_keys("[agent]\nmax_items = 3\n", "llm", {"draft_len": "5"}))["llm"] == {"draft_len": 5}
    # a header with a comment is the table's (a second [llm] table made a file that would not load)
    commented = with_table_keys("[llm]  # the language model\nmodel = \"x\"\n", "llm", {"draft_len": "2"})
    assert tomllib.loads(commented) == {"llm": {"model": "x", "draft_len": 2}}


def test_the_written_file_keeps_the_overrides_it_ran_with():
    from voice_agent.commands.calibrate import with_overrides

    text = with_overrides("[llm]\nmodel = \"default\"\n\n[server]\nport = 9999\n",
                          ["llm.model=smollm2-135m-drafter", "server.port=7777", "llm.row_cost=0.5",
                           "agent.greeting=Hi, \"you\"", "llm.draft_tree=false"])
    assert tomllib.loads(text) == {"llm": {"model": "smollm2-135m-drafter", "row_cost": 0.5, "draft_tree": False},
                                   "server": {"port": 7777}, "agent": {"greeting": 'Hi, "you"'}}
    # values over several lines are replaced whole; any character, emoji included, reads back
    multi = "[agent]\nsystem_prompt = \"\"\"You are brief.\nAnswer in one sentence.\"\"\"\nx = [\n  1,\n]\ny = 2\n"
    text = with_overrides(multi, ["agent.system_prompt=Be terse\x7f 😀 \\ \"q\"", "agent.x=[\"b😀\"]"])
    assert tomllib.loads(text) == {"agent": {"system_prompt": 'Be terse\x7f 😀 \\ "q"', "x": ["b😀"], "y": 2}}


def test_an_output_that_cannot_be_written_is_refused_before_measuring(tmp_path, capsys):
    from voice_agent.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, why in [(tmp_path, "it is a directory"), (afile / "x.toml", "is not a directory")]:
        assert main(["calibrate", "--out", str(out)]) == 2
        assert why in capsys.readouterr().err


def test_measure_reports_time_and_tokens_per_forward():
    loaded = random_loaded("causal", seed=3, scale=3.0, block_size=1)
    torch.manual_seed(0)
    loaded.drafter = Drafter(loaded.config, DrafterConfig(rank=4, n_slots=3)).eval()
    r = measure(loaded, [[1, 2, 3], [4, 5]], draft_len=2, tree=True, max_new_tokens=12)
    assert r["tokens"] == 2 * 11 and r["ms_per_token"] > 0 and 1.0 <= r["tokens_per_forward"] <= 3.0
    ar = measure(loaded, [[1, 2, 3], [4, 5]], draft_len=2, tree=True, max_new_tokens=12, engine_kind="ar")
    # one forward per token (the first token's, the prefill, is not counted: just over 1)
    assert ar["tokens"] == 2 * 11 and ar["ms_per_token"] > 0 and 1.0 <= ar["tokens_per_forward"] < 1.1


def test_choose_keeps_the_fastest_draft_setting_and_picks_ar_only_where_it_was_faster():
    drafted = [{"draft_len": 1, "tree": True, "ms_per_token": 9.0}, {"draft_len": 3, "tree": False, "ms_per_token": 7.5},
               {"draft_len": 4, "tree": True, "ms_per_token": 8.0}]
    assert choose({"ms_per_token": 10.0}, drafted) == ({"engine": '"auto"', "draft_len": "3", "draft_tree": "false",
                                                        "draft_confidence": "0.0"}, drafted[1])
    keys, best = choose({"ms_per_token": 7.0}, drafted)
    assert keys == {"engine": '"ar"', "draft_len": "3", "draft_tree": "false", "draft_confidence": "0.0"}
    assert best is drafted[1]
    written = tomllib.loads(with_table_keys(default_config_text(), "llm", keys))["llm"]
    assert (written["engine"], written["draft_len"], written["draft_tree"]) == ("ar", 3, False)
    # A draft head's settings carry their confidence bar, and the fastest one's is written.
    head = [{"draft_len": 6, "tree": True, "draft_confidence": 0.0, "prompt_lookup": 4, "ms_per_token": 6.0},
            {"draft_len": 6, "tree": True, "draft_confidence": 0.15, "prompt_lookup": 4, "ms_per_token": 5.0},
            {"draft_len": 6, "tree": True, "draft_confidence": 0.15, "prompt_lookup": 0, "ms_per_token": 5.5}]
    keys, best = choose({"ms_per_token": 7.0}, head)
    written = tomllib.loads(with_table_keys(default_config_text(), "llm", keys))["llm"]
    assert best is head[1] and written["draft_confidence"] == 0.15 and written["prompt_lookup"] == 4
    head[2]["ms_per_token"] = 4.0  # prompt lookup off was faster here
    assert tomllib.loads(with_table_keys(default_config_text(), "llm", choose({"ms_per_token": 7.0}, head)[0]))["llm"][
        "prompt_lookup"] == 0
    head.append({"draft_len": 6, "tree": True, "draft_confidence": 0.05, "prompt_lookup": 4, "draft_branches": 3,
                 "ms_per_token": 3.0})  # a tree was fastest (rows cost little here)
    written = tomllib.loads(with_table_keys(default_config_text(), "llm", choose({"ms_per_token": 7.0}, head)[0]))["llm"]
    assert (written["draft_branches"], written["draft_confidence"]) == (3, 0.05)


def test_a_heads_bars_and_trees_are_tried_at_its_longest_length_and_mask_slots_have_neither():
    assert draft_settings([1, 2, 3], [0.0, 0.1, 0.2], head=True) == [
        (1, True, 0.0, 1), (2, True, 0.0, 1), (3, True, 0.0, 1), (3, True, 0.1, 1), (3, True, 0.2, 1)]
    assert draft_settings([2, 4], [0.2, 0.1], head=True) == [(2, True, 0.1, 1), (4, True, 0.2, 1), (4, True, 0.1, 1)]
    assert draft_settings([2, 4], [0.2, 0.1], head=True, branches=(1, 3)) == [
        (2, True, 0.1, 1), (4, True, 0.2, 1), (4, True, 0.1, 1), (4, True, 0.2, 3), (4, True, 0.1, 3)]
    assert draft_settings([2, 4], [0.1], head=True, branches=(2,)) == [(4, True, 0.1, 2)]  # trees only
    assert draft_settings([4], [0.1], head=True, branches=(1, 2), tree_confidences=[0.02, 0.05]) == [
        (4, True, 0.1, 1), (4, True, 0.02, 2), (4, True, 0.05, 2)]  # trees at bars of their own
    assert draft_settings([1, 2], [0.0], head=False) == [
        (1, True, 0.0, 1), (2, True, 0.0, 1), (1, False, 0.0, 1), (2, False, 0.0, 1)]


def test_settings_are_named_by_their_layout_and_a_heads_by_its_branches():
    from voice_agent.commands.calibrate import _setting

    assert _setting({"draft_len": 3, "tree": False, "draft_confidence": 0.0}) == "draft_len 3 chain confidence 0"
    assert _setting({"draft_len": 3, "tree": True, "draft_confidence": 0.0}) == "draft_len 3 tree  confidence 0"
    head = {"draft_len": 6, "tree": True, "draft_confidence": 0.15, "prompt_lookup": 4}
    assert _setting(head) == "draft_len 6 chain confidence 0.15 prompt lookup 4"
    assert _setting({**head, "draft_branches": 2}) == "draft_len 6 tree of 2 branches confidence 0.15 prompt lookup 4"


def test_measure_passes_a_heads_confidence_bar_prompt_lookup_and_branches_to_the_engine(monkeypatch):
    import dlm.engines
    from dlm.draft_head import DraftHead, DraftHeadConfig

    loaded = random_loaded("causal", seed=3, scale=3.0, block_size=1)
    torch.manual_seed(0)
    head = DraftHead(loaded.config, DraftHeadConfig(window=3, n_slots=4, vocab_size=loaded.config.vocab_size))
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()  # uniform scores: the head is sure of nothing
        head.vocab.copy_(torch.arange(loaded.config.vocab_size))
    head.attach(loaded.model)
    loaded.drafter = head.eval()
    asked = []
    real = dlm.engines.make_engine

    def recording(loaded, kind="auto", **kwargs):
        engine = real(loaded, kind, **kwargs)
        asked.append((engine.draft_confidence, engine.prompt_lookup, engine.draft_branches))
        return engine

    monkeypatch.setattr(dlm.engines, "make_engine", recording)
    unsure = measure(loaded, [[1, 2, 3], [4, 5]], draft_len=4, tree=True, max_new_tokens=12, draft_confidence=0.5)
    assert asked == [(0.5, 0, 1)]  # prompt lookup and trees only where asked for
    measure(loaded, [[1, 2, 3]], draft_len=4, tree=True, max_new_tokens=4, draft_confidence=0.5, prompt_lookup=3,
            draft_branches=2)
    assert asked[-1] == (0.5, 3, 2)
    # No drafts: one token a forward, as the AR engine (the prefill's token is not counted: just over 1).
    assert unsure["tokens"] == 2 * 11 and 1.0 <= unsure["tokens_per_forward"] < 1.1


def test_each_setting_runs_in_every_round_in_another_order_and_keeps_its_fastest():
    """in_rounds: every candidate once a round, round r starting at candidate r * n / rounds (so
    none is always first), each keeping its fastest round; here B is slowed in round 1 (other work
    on the machine) and C in every round but the last."""
    calls = []
    times = {("A", 0): 5.0, ("A", 1): 5.2, ("A", 2): 5.1, ("B", 0): 4.0, ("B", 1): 9.0, ("B", 2): 4.2,
             ("C", 0): 8.0, ("C", 1): 8.0, ("C", 2): 3.0}

    def run(candidate):
        r = sum(1 for c in calls if c == candidate["name"])
        calls.append(candidate["name"])
        return {"ms_per_token": times[(candidate["name"], r)], "tokens_per_forward": 2.0}

    reported = []
    best = in_rounds([{"name": "A"}, {"name": "B"}, {"name": "C"}], 3, run,
                     lambda done, total, r, result: reported.append((done, total, r, result["name"])))
    assert calls == ["A", "B", "C", "B", "C", "A", "C", "A", "B"]
    assert [(b["name"], b["ms_per_token"]) for b in best] == [("A", 5.0), ("B", 4.0), ("C", 3.0)]
    assert reported[0] == (1, 9, 0, "A") and reported[-1] == (9, 9, 2, "B")
    assert [b["name"] for b in in_rounds([{"name": "A"}, {"name": "B"}], 1, lambda c: {"ms_per_token": 1.0})] == ["A", "B"]


def test_a_model_without_a_drafter_is_refused(tmp_path, capsys):
    from voice_agent.cli import main

    rc = main(["calibrate", "--set", "llm.model=smollm2-135m-instruct", "--out", str(tmp_path / "c.toml")])
    assert rc == 2 and "has no drafter" in capsys.readouterr().err
    assert not (tmp_path / "c.toml").exists()
    rc = main(["calibrate", "--rounds", "0", "--out", str(tmp_path / "c.toml")])
    assert rc == 2 and "--rounds must be at least 1" in capsys.readouterr().err
    for bad, why in [(["--batch", "1"], "--batch must be 0 (not measured) or lie in [2, 8]"),
                     (["--batch", "9"], "--batch must be 0"), (["--row-costs", "0.2,x"], "--row-costs: expected"),
                     (["--row-costs", "-1"], "--row-costs: each must lie in [0, 16]")]:
        assert main(["calibrate", *bad, "--out", str(tmp_path / "c.toml")]) == 2  # before the model loads
        assert why in capsys.readouterr().err
    assert not (tmp_path / "c.toml").exists()


def test_a_batch_decodes_at_once_with_the_row_cost_asked_for(monkeypatch):
    """measure_batch: every prompt at once (after the same batch untimed), the row cost passed to
    the engine; the batch's ms per token over all its tokens."""
    import dlm.engines
    from dlm.draft_head import DraftHead, DraftHeadConfig

    loaded = random_loaded("causal", seed=3, scale=3.0, block_size=1)
    torch.manual_seed(0)
    loaded.drafter = DraftHead(loaded.config, DraftHeadConfig(window=3, n_slots=4, vocab_size=loaded.config.vocab_size))
    loaded.drafter.vocab.copy_(torch.arange(loaded.config.vocab_size))
    loaded.drafter.attach(loaded.model)
    loaded.drafter.eval()
    asked = []
    real = dlm.engines.make_engine

    def recording(loaded, kind="auto", **kwargs):
        engine = real(loaded, kind, **kwargs)
        asked.append((kind, engine.max_batch_size, getattr(engine, "row_cost", None)))
        return engine

    monkeypatch.setattr(dlm.engines, "make_engine", recording)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    r = measure_batch(loaded, prompts, 10, draft_len=4, draft_confidence=0.0, row_cost=0.3)
    assert asked[-1][:2] == ("auto", 4) and asked[-1][2].each == 0.3
    assert r["tokens"] == 4 * 10 and r["ms_per_token"] > 0 and r["tokens_per_forward"] >= 1.0
    ar = measure_batch(loaded, prompts, 10, "ar", draft_len=4, row_cost=0.3)  # the AR engine takes no draft keys
    assert asked[-1][0] == "ar" and ar["tokens"] == 4 * 10 and ar["tokens_per_forward"] == 1.0


def test_the_written_config_is_the_one_it_ran_with_and_loads(tmp_path, monkeypatch, capsys):
    """The run's own config file (a commented [llm] header, comments elsewhere) with its --set
    overrides and the keys it measured, written whole; never a configs/default.toml that lies in
    the working directory."""
    import voice_agent.commands.calibrate as calibrate
    import voice_agent.llm
    from voice_agent.cli import main
    from voice_agent.config import load_config
    from voice_agent.models import ResolvedLlm

    loaded = random_loaded("causal", seed=3, scale=3.0, block_size=1)
    loaded.drafter = Drafter(loaded.config, DrafterConfig(rank=4, n_slots=3)).eval()
    monkeypatch.setattr(voice_agent.llm, "load_local_llm",
                        lambda name, **kw: (loaded, ResolvedLlm(Path("<memory>"), name)))
    monkeypatch.setattr(calibrate, "measure", lambda loaded, prompts, draft_len=1, engine_kind="auto", **kw: {
        "ms_per_token": 10.0 if engine_kind == "ar" else 10.0 - draft_len, "tokens_per_forward": 1.0 + draft_len / 2})
    config = tmp_path / "mine.toml"
    config.write_text("# my settings\n[llm]  # the language model\nmodel = \"default\"\n\n[server]\nport = 9999\n")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.toml").write_text("[server]\nport = 1\n")  # not the run's
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "calibrated.toml"
    assert main(["calibrate", "--config", str(config), "--set", "server.port=7777", "--out", str(out), "--rounds",
                 "1", "--prompts", "1", "--draft-lens", "1,2", "--batch", "0"]) == 0, capsys.readouterr().err
    written = out.read_text()
    assert "# my settings" in written and "[llm]  # the language model" in written
    assert load_config(out).server.port == 7777 and load_config(out).llm.draft_len == 2
    assert main(["calibrate", "--set", "server.port=7777", "--out", str(out), "--rounds", "1", "--prompts", "1",
                 "--draft-lens", "1", "--batch", "0"]) == 0
    assert load_config(out).llm.model == "default" and load_config(out).server.port == 7777  # the embedded defaults
    assert not list(out.parent.glob(".*.tmp"))
    # written in place of a file that may hold a token: its mode kept; through a link, to its target
    out.chmod(0o600)
    link = tmp_path / "link.toml"
    link.symlink_to(out)
    assert main(["calibrate", "--out", str(link), "--rounds", "1", "--prompts", "1", "--draft-lens", "1",
                 "--batch", "0"]) == 0
    assert link.is_symlink() and (out.stat().st_mode & 0o777) == 0o600 and "Written by" in out.read_text()


def test_trees_are_refused_for_drafters_that_draft_chains(tmp_path, monkeypatch, capsys):
    """--draft-branches above 1 asks for trees of a parallel head's places; a causal head (each
    place scored after the drafts before it) and mask slots draft chains: refused before measuring,
    naming why. A parallel head's trees pass the check."""
    import voice_agent.commands.calibrate as calibrate
    import voice_agent.llm
    from dlm.draft_head import DraftHead, DraftHeadConfig
    from voice_agent.cli import main
    from voice_agent.models import ResolvedLlm

    loaded = random_loaded("causal", seed=3, scale=3.0, block_size=1)
    monkeypatch.setattr(voice_agent.llm, "load_local_llm",
                        lambda name, **kw: (loaded, ResolvedLlm(Path("<memory>"), name)))
    measured = []
    monkeypatch.setattr(calibrate, "measure", lambda loaded, prompts, **kw: measured.append(kw) or {
        "ms_per_token": 5.0, "tokens_per_forward": 1.5})
    out = tmp_path / "c.toml"
    args = ["calibrate", "--out", str(out), "--rounds", "1", "--prompts", "1", "--draft-lens", "3",
            "--batch", "0", "--draft-branches", "1,2"]
    for drafter, why in [(DraftHead(loaded.config, DraftHeadConfig(window=3, n_slots=3, vocab_size=8, causal=True)),
                          "drafts with a causal draft head: one branch"),
                         (Drafter(loaded.config, DrafterConfig(rank=4, n_slots=3)), "drafts with mask slots: one branch")]:
        loaded.drafter = drafter.eval()
        assert main(args) == 2
        assert why in capsys.readouterr().err and not measured and not out.exists()
    loaded.drafter = DraftHead(loaded.config, DraftHeadConfig(window=3, n_slots=3, vocab_size=8)).eval()
    assert main(args) == 0, capsys.readouterr().err
    assert {kw.get("draft_branches") for kw in measured} == {None, 1, 2}  # the AR engine's, a chain's, a tree's
