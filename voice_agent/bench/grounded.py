"""Training conversations for the grounded-answer fine-tune (issue 19): generated businesses
(voice_agent.bench.phone_bot, seeds below HELDOUT_SEED only), the instructions their operators
would write, callers' questions and the answers the facts give, in short spoken English.

Contract:
- `conversations(n, seed)`: n conversations, each `[system, user, assistant, ...]` with one to
  three caller turns about one business (seed i -> business i for i < HELDOUT_SEED, never a
  held-out one; `ValueError` where n would reach them). The system prompt is the operator's text
  in one of several layouts (`instructions`), sometimes with the voice rules after it.
- The questions are paraphrases of the eval's kinds (open on a day, closing and opening time,
  hours, a price, the address, a booking within and beyond the largest party), plus questions the
  facts do not answer (the reply says it does not know and what it can help with), small talk,
  and general questions with a fixed answer. None of the eval's own question strings
  (`phone_bot.questions`, `phone_bot.OFF_TOPIC`) is ever a training question: the held-out score
  measures new businesses and new wordings both.
- Every answer is made from the business's facts: yes/no first, then the fact, one or two short
  sentences, English only.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from voice_agent.bench import phone_bot as pb

__all__ = ["EVAL_QUESTIONS", "conversations", "instructions", "turns"]

_UNKNOWN = ["Do you have parking?", "Is there parking nearby?", "Do you deliver?", "Do you have wifi?",
            "Is your place wheelchair accessible?", "Do you sell gift cards?", "Do you take credit cards?",
            "Are dogs allowed inside?", "Who is the owner?", "Do you have a website?", "Can I pay with cash?"]
_GREETINGS = [("Hello!", "Hello, thanks for calling {name}! How can I help you?"),
              ("Hi there.", "Hi, this is {name}. How can I help you today?"),
              ("Good morning.", "Good morning, thanks for calling {name}. How can I help?"),
              ("Hey, how's it going?", "I'm doing great, thanks for asking! How can I help you?"),
              ("Hello, is this {name}?", "Yes, this is {name}. How can I help you?"),
              ("How are you doing?", "I'm doing well, thank you! What can I do for you?")]
_THANKS = [("Thank you so much.", "You're welcome! Have a great day."),
           ("Great, thanks.", "You're welcome. Is there anything else I can help with?"),
           ("That's all I needed, goodbye.", "Thanks for calling {name}. Goodbye!"),
           ("Okay, thank you, bye.", "You're welcome. Goodbye!"),
           ("Perfect, thanks a lot!", "My pleasure. Have a nice day!")]
_GENERAL = [("What is the capital of France?", "The capital of France is Paris."),
            ("What's the capital of Italy?", "The capital of Italy is Rome."),
            ("Do you know the capital of Germany?", "Yes, the capital of Germany is Berlin."),
            ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
            ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
            ("How many days are in a week?", "There are seven days in a week."),
            ("What color is the sky?", "The sky is blue on a clear day."),
            ("What is two plus two?", "Two plus two is four."),
            ("How many hours are in a day?", "There are twenty four hours in a day.")]
_JOKES = ["Do you know any jokes?", "Tell me something funny.", "Make me laugh."]
_JOKE_REPLIES = ["Why did the bicycle fall over? Because it was two tired!",
                 "Why don't eggs tell jokes? They would crack each other up!",
                 "What do you call a fake noodle? An impasta!"]


def instructions(b: pb.Business, rng: random.Random) -> str:
    """The operator's text for b in one of several layouts; the eval's own layout is one of them."""
    prices = ", ".join(f"{item} ${price}" for item, price in b.items)
    hours = f"{pb.clock(b.open_hour)} to {pb.clock(b.close_hour)}"
    party = (f"We take bookings for up to {b.max_party} people." if b.kind == "restaurant"
             else f"Book {b.booking} by phone.")
    layouts: list[Callable[[], str]] = [
        lambda: pb.operator_instructions(b),
        lambda: (f"You answer the phone for {b.name}, a {b.kind} at {b.number} {b.street}, {b.city}. "
                 f"Hours: {hours}, every day except {b.closed_day}. Price list: {prices}. {party} Keep answers short."),
        lambda: (f"{b.name} ({b.kind}, {b.city}). Address: {b.number} {b.street}. Closed on {b.closed_day}s; "
                 f"open {hours} on other days. {party} Prices: {prices}. You are its friendly phone assistant."),
        lambda: (f"Phone assistant for {b.name}.\nAddress: {b.number} {b.street}, {b.city}\nOpen: {hours}\n"
                 f"Closed: {b.closed_day}\nPrices: {prices}\n{party}\nBe brief and friendly."),
    ]
    return rng.choice(layouts)()


def _yes_no_day(b: pb.Business, day: str, rng: random.Random) -> tuple[str, str]:
    q = rng.choice(["Are you guys open on {d}?", "Is {name} open on {d}?", "Can I come in on {d}?",
                    "Are you open this {d}?", "Do you open on {d}s?", "Will you be open {d}?"]).format(d=day, name=b.name)
    hours = f"{pb.clock(b.open_hour)} to {pb.clock(b.close_hour)}"
    if day == b.closed_day:
        a = rng.choice([f"No, sorry, we're closed on {day}s.", f"No, we are closed on {day}s.",
                        f"No, we're closed every {day}. We're open the other days from {hours}."])
    else:
        a = rng.choice([f"Yes, we're open on {day} from {hours}.", f"Yes, we are open {day}, from {hours}.",
                        f"Yes, on {day} we're open from {hours}."])
    return q, a


def turns(b: pb.Business, rng: random.Random) -> list[tuple[str, str]]:
    """Every kind of caller turn about b, one wording each (chosen by rng): (question, answer)."""
    open_h, close_h = pb.clock(b.open_hour), pb.clock(b.close_hour)
    item, price = rng.choice(b.items)
    other_items = [i for i, _ in pb.KINDS[b.kind][1] if i not in {x for x, _ in b.items}]
    menu = ", ".join(i for i, _ in b.items[:-1]) + f" and {b.items[-1][0]}"
    out = [
        _yes_no_day(b, b.closed_day, rng),
        _yes_no_day(b, rng.choice(b.open_days), rng),
        (rng.choice(["When do you close?", "How late are you open?", "Until what time are you open today?",
                     "What time do you close tonight?", "When do you close today?"]),
         rng.choice([f"We close at {close_h}.", f"We're open until {close_h}.", f"We close at {close_h} tonight."])),
        (rng.choice(["When do you open?", "What time do you open in the morning?", "How early do you open?",
                     "What time do you open tomorrow?"]),
         rng.choice([f"We open at {open_h}.", f"We open at {open_h} every day except {b.closed_day}."])),
        (rng.choice(["What are your hours?", "What are your opening hours?", "When are you open?"]),
         f"We're open from {open_h} to {close_h}, every day except {b.closed_day}."),
        (rng.choice(["What does the {i} cost?", "How much for the {i}?", "What's the price of the {i}?",
                     "How much do you charge for a {i}?", "How much is a {i}?"]).format(i=item),
         rng.choice([f"The {item} is ${price}.", f"The {item} costs ${price}.", f"It's ${price} for the {item}."])),
        (rng.choice(["What's your address?", "Where is {name}?", "Where can I find you?", "Where are you?",
                     "What street are you on?"]).format(name=b.name),
         rng.choice([f"We're at {b.number} {b.street} in {b.city}.", f"You can find us at {b.number} {b.street}, {b.city}."])),
        (rng.choice(_UNKNOWN),
         rng.choice(["Sorry, I don't have that information. I can help with our hours, prices and bookings.",
                     "I'm sorry, I don't know that. I can tell you about our hours, prices or bookings."])),
        (lambda g: (g[0].format(name=b.name), g[1].format(name=b.name)))(rng.choice(_GREETINGS)),
        (lambda t: (t[0], t[1].format(name=b.name)))(rng.choice(_THANKS)),
        rng.choice(_GENERAL),
        (rng.choice(_JOKES), rng.choice(_JOKE_REPLIES)),
    ]
    if other_items:
        other = rng.choice(other_items)
        out.append((f"What does the {other} cost?" if rng.random() < 0.5 else f"Do you have {other}?",
                    f"Sorry, we don't have {other}. We have {menu}."))
    if b.kind == "restaurant":
        small = rng.randint(1, b.max_party)
        big = b.max_party + rng.randint(1, 6)
        out += [(rng.choice(["Can I reserve a table for {n}?", "Do you take reservations for {n} people?",
                             "I'd like to book a table for {n}.", "Could I get a table for {n} people tonight?"]).format(n=small),
                 rng.choice([f"Yes, we can book a table for {small}. What day and time would you like?",
                             f"Yes, a table for {small} is fine. When would you like to come?"])),
                (rng.choice(["Can I reserve a table for {n}?", "Do you take reservations for {n} people?",
                             "I'd like to book a table for {n}.", "We're a group of {n}, can we book?"]).format(n=big),
                 rng.choice([f"No, sorry, we only take bookings for up to {b.max_party} people.",
                             f"No, sorry, we can only book tables for up to {b.max_party} people."]))]
    else:
        out.append(rng.choice([(f"Can I book {b.booking}?", f"Yes, you can book {b.booking} with me now. What day works for you?"),
                               ("Do you take appointments?", f"Yes, I can book {b.booking} for you. What day works for you?"),
                               (f"How do I book {b.booking}?", f"You can book {b.booking} with me on the phone. What day works for you?")]))
    return out


EVAL_QUESTIONS = frozenset(pb.OFF_TOPIC) | {"What time do you close?", "What time do you open?", "Where are you located?"}


def _is_eval_wording(question: str) -> bool:
    if question in EVAL_QUESTIONS:
        return True
    return question.startswith(("Are you open on ", "How much is the ", "Can I book a table for ")) and question.endswith("?")


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """n training conversations about businesses 0 .. n-1 (see the module docstring)."""
    if n > pb.HELDOUT_SEED:
        raise ValueError(f"at most {pb.HELDOUT_SEED} training businesses: seeds from {pb.HELDOUT_SEED} are held out")
    out = []
    for i in range(n):
        b = pb.business(i)
        rng = random.Random(seed * 1_000_003 + i)
        system = instructions(b, rng)
        if rng.random() < 0.3:
            system += "\n" + pb.VOICE_RULES
        pool = [t for t in turns(b, rng) if not _is_eval_wording(t[0])]
        chosen = rng.sample(pool, rng.choice([1, 1, 2, 3]))
        messages = [{"role": "system", "content": system}]
        for q, a in chosen:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append(messages)
    return out
