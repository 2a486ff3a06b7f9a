"""The phone-bot eval's generator and checks (voice_agent/bench/phone_bot.py): deterministic
businesses, held-out ones apart, and checks that judge replies by the facts."""

from __future__ import annotations

from voice_agent.bench.phone_bot import (
    HELDOUT_SEED,
    Check,
    business,
    english,
    heldout,
    loops,
    operator_instructions,
    questions,
)


def test_businesses_are_deterministic_and_held_out_ones_apart():
    assert business(3) == business(3) and business(3) != business(4)
    assert all(b.seed >= HELDOUT_SEED for b in heldout(5))
    b = business(7)
    assert b.closed_day not in b.open_days and len(b.open_days) == 6 and b.open_hour < b.close_hour
    text = operator_instructions(b)
    assert b.name in text and f"closed {b.closed_day}s" in text and all(f"${price}" in text for _, price in b.items)


def test_every_question_has_a_reply_that_passes_and_one_that_fails():
    b = next(business(i) for i in range(50) if business(i).kind == "restaurant")
    for question, check in questions(b):
        if check.kind == "yes":
            assert check.right("Yes, we are open then.") and not check.right("No, sorry, we are closed.")
        elif check.kind == "no":
            assert check.right("No, sorry, we are closed then.") and not check.right("Yes, of course!")
        else:
            assert check.right(f"That is {check.expected[0]}.") and not check.right("I am not sure about that."), question


def test_numbers_are_matched_whole():
    price = Check("contains", ("$12", "12"))
    assert price.right("It costs $12.") and price.right("It is 12 dollars.")
    assert not price.right("It costs $120.") and not price.right("It is 112 dollars.")


def test_loops_and_language():
    assert loops("I'm not. I'm not. I'm not.")
    assert loops("We are open on Monday and we are open on Monday too")  # a 4-gram again
    assert not loops("Yes, we are open on Monday from 5 pm to 11 pm.")
    assert english("Yes, we are open until 11 pm.")
    assert not english("Il cielo è uno dei cinghiali, il cielo è uno dei cinghiali.")
    assert not english("El Salvador, el Salvador.")


def test_bench_quality_refuses_unknown_assemblies_before_loading_a_model(capsys):
    from voice_agent import cli

    assert cli.main(["bench", "quality", "--styles", "operator,poetry"]) == 2
    assert "--styles takes operator, rules-after, rules-before" in capsys.readouterr().err


def test_bench_quality_scores():
    from voice_agent.commands.bench_quality import _score

    rows = [
        {"right": True, "loops": False, "english": True, "words": 8, "finish": "eos", "error": None},
        {"right": False, "loops": True, "english": True, "words": 30, "finish": "repetition", "error": None},
        {"right": None, "loops": False, "english": False, "words": 4, "finish": "eos", "error": None},
    ]
    assert _score(rows) == {"replies": 3, "factual": 2, "right": 1, "right_pct": 50.0, "loops": 1, "not_english": 1,
                            "stopped_by_loop_guard": 1, "median_words": 8, "errors": 0}
