"""The grounded-answer fine-tune's data (voice_agent/bench/grounded.py) and `voice-agent adapt
grounded`: answers the eval would judge right, no held-out business, no eval wording, and the
command end to end on a tiny model."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from voice_agent import cli
from voice_agent.bench import grounded
from voice_agent.bench import phone_bot as pb

sys.path.insert(0, str(Path(__file__).parents[1] / "dlm"))
import tiny_checkpoints


def test_training_answers_pass_the_eval_checks_of_their_facts():
    """Every answer about a checked fact is one the eval's own checks call right."""
    for seed in range(60):
        b = pb.business(seed)
        checks = pb.questions(b)
        t = grounded.turns(b, random.Random(seed))
        assert checks[0][1].right(t[0][1]), t[0]  # the closed day: no
        assert pb.Check("yes").right(t[1][1]), t[1]  # an open day: yes
        assert checks[2][1].right(t[2][1]), t[2]  # closing time
        assert checks[3][1].right(t[3][1]), t[3]  # opening time
        _, price = max(((i, p) for i, p in b.items if i in t[5][0]), key=lambda ip: len(ip[0]))
        assert pb.Check("contains", (f"${price}",)).right(t[5][1]), t[5]
        assert checks[5][1].right(t[6][1]), t[6]  # the street
        if b.kind == "restaurant":
            assert pb.Check("yes").right(t[-2][1]) and pb.Check("no").right(t[-1][1]), t[-2:]
        for q, a in t:
            assert pb.english(a) and not pb.loops(a) and len(pb.words(a)) <= 25, (q, a)


def test_conversations_never_hold_a_held_out_business_or_an_eval_wording():
    convs = grounded.conversations(300)
    names = {pb.business(i).name for i in range(300)}
    heldout_facts = {pb.operator_instructions(b) for b in pb.heldout(20)}
    for messages in convs:
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "assistant"
        assert messages[0]["content"].split("\n")[0] not in heldout_facts
        assert any(n in messages[0]["content"] for n in names)
        for m in messages[1::2]:
            assert m["role"] == "user" and m["content"] not in grounded.EVAL_QUESTIONS
            assert not m["content"].startswith(("Are you open on ", "How much is the ", "Can I book a table for "))
    assert convs == grounded.conversations(300)  # deterministic
    with pytest.raises(ValueError, match="held out"):
        grounded.conversations(pb.HELDOUT_SEED + 1)


def test_adapt_grounded_trains_an_adapter_on_a_tiny_model(tmp_path, capsys, monkeypatch):
    from dlm.adapt.data import Example, write_dataset
    from dlm.adapter import read_adapter_meta
    from dlm.checkpoints import load_model

    monkeypatch.setenv("VOICE_AGENT_CACHE_DIR", str(tmp_path / "cache"))  # the base's conversion: not the user's cache
    gguf, _ = tiny_checkpoints.llama_gguf(tmp_path / "tiny.gguf", context=1024)  # byte-level: long prompts
    teacher = tmp_path / "teacher.jsonl"
    msgs = [{"role": "user", "content": "hi"}]
    write_dataset(teacher, [Example([5, 6, 7], [8, 9, 2], msgs, "smalltalk", "greedy", i, split)
                            for i, split in enumerate(["train"] * 6 + ["heldout"] * 2)], {"base": "tiny"})
    args = ["adapt", "grounded", "--out", str(tmp_path / "run"), "--base", str(gguf), "--teacher-data", str(teacher),
            "--conversations", "12", "--max-steps", "3", "--batch-size", "4", "--rank", "2",
            "--eval-conversations", "3"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "12 business conversations + 4 teacher replies; 3 steps of 4" in out
    assert "base " in out and "adapted " in out
    meta = read_adapter_meta(tmp_path / "run" / "adapter.safetensors")
    assert meta["info"]["step"] == 3 and meta["config"]["rank"] == 2
    assert (tmp_path / "run" / "grounded-eval.json").exists()
    load_model(gguf, adapter=tmp_path / "run" / "adapter.safetensors")
    assert list((tmp_path / "cache" / "gguf").glob("tiny-*.safetensors"))
    assert cli.main([*args, "--teacher-share", "1.5"]) == 2
    assert "--teacher-share must lie in [0, 1)" in capsys.readouterr().err
