"""The phone-bot eval of `voice-agent bench quality`: businesses generated from templates, each
with questions whose right answer can be checked against its facts, and the checks.

- `business(seed)`: one business (kind, name, street, opening days and hours, a day closed, items
  with prices, the largest party it books for), the same for the same seed. Seeds below
  `HELDOUT_SEED` are for tuning and training; `heldout(n)` gives the first n at and above it,
  never to be trained on.
- `operator_instructions(b)`: the instructions an operator would write for it (facts, and "answer
  in one or two short sentences"). `VOICE_RULES`: the voice rules a prompt assembly may add.
- `questions(b)`: (question, check) pairs: open on the closed day (no) and on an open day (yes),
  closing and opening time (the hour), an item's price (the number), the street, a booking
  within and beyond the largest party (yes / no); and `OFF_TOPIC` turns that have no checked
  answer (only loops, language and length count).
- `Check`: `right(reply)` judges a reply by the facts (yes/no by whichever comes first of a word
  or phrase that says yes or open and one that says no or closed: a reply that says both is
  judged by its first; "sorry" alone says neither; a time by its hour; a price by its number, whole;
  a street by name).
- `loops(reply)`: a word 4-gram that comes back, or a sentence said twice. `english(reply)`: at
  least one of a few very common English words, and none of Italian's or Spanish's most common
  ones that English does not use (the embedded ASR and voice are English only). `words(reply)`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

__all__ = ["HELDOUT_SEED", "OFF_TOPIC", "VOICE_RULES", "Business", "Check", "business", "clock", "english", "heldout", "loops",
           "operator_instructions", "questions", "words"]

HELDOUT_SEED = 10_000
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
KINDS = {
    "restaurant": (["Luigi's", "The Blue Door", "Mama Rosa's", "Golden Dragon", "Casa Verde", "The Olive Tree",
                    "Harbor Grill", "Saffron House"],
                   [("margherita pizza", 12), ("lasagna", 16), ("caesar salad", 9), ("tiramisu", 7), ("soup of the day", 6),
                    ("grilled salmon", 22), ("veggie burger", 13)], "a table"),
    "hair salon": (["Shear Magic", "Bella Hair", "The Cutting Room", "Style Studio", "Curl Up & Dye", "Urban Roots"],
                   [("haircut", 35), ("beard trim", 15), ("hair coloring", 80), ("blow dry", 25), ("kids haircut", 20)],
                   "an appointment"),
    "bike shop": (["Spoke & Chain", "Pedal Pushers", "City Cycles", "Gear Up Bikes", "Two Wheels"],
                  [("tune-up", 60), ("flat tire repair", 15), ("brake adjustment", 25), ("chain replacement", 40)],
                  "a repair slot"),
}
CITIES = ["Boston", "Denver", "Portland", "Austin", "Chicago", "Seattle", "Atlanta", "Phoenix"]
STREETS = ["Main Street", "Oak Avenue", "Maple Road", "Harbor Street", "Elm Street", "Park Avenue", "Cedar Lane",
           "Lake Street"]
VOICE_RULES = ("Answer the caller in English, in one or two short spoken sentences, "
               "using only the facts above; if you do not know, say so.")
OFF_TOPIC = ["Hi, how are you today?", "What is the capital of Spain?", "Can you tell me a joke?", "Thanks, bye!"]


def clock(h: int) -> str:
    return f"{h % 12 or 12} {'am' if h < 12 else 'pm'}"


@dataclass(frozen=True)
class Business:
    seed: int
    kind: str
    name: str
    city: str
    street: str
    number: int
    open_hour: int  # 24 h
    close_hour: int
    closed_day: str
    items: list[tuple[str, int]] = field(default_factory=list)
    booking: str = "a table"  # what is booked
    max_party: int = 6

    @property
    def open_days(self) -> list[str]:
        return [d for d in DAYS if d != self.closed_day]


def business(seed: int) -> Business:
    rng = random.Random(seed)
    kind = rng.choice(sorted(KINDS))
    names, menu, booking = KINDS[kind]
    open_hour = rng.choice([7, 8, 9, 10, 11, 12, 16, 17])
    close_hour = min(23, open_hour + rng.choice([6, 8, 9, 10]))
    items = rng.sample(menu, 3)
    return Business(seed=seed, kind=kind, name=rng.choice(names), city=rng.choice(CITIES), street=rng.choice(STREETS),
                    number=rng.randint(10, 999), open_hour=open_hour, close_hour=close_hour, closed_day=rng.choice(DAYS),
                    items=items, booking=booking, max_party=rng.choice([2, 4, 6, 8]) if kind == "restaurant" else 1)


def heldout(n: int) -> list[Business]:
    return [business(HELDOUT_SEED + i) for i in range(n)]


def operator_instructions(b: Business) -> str:
    prices = ", ".join(f"{item} ${price}" for item, price in b.items)
    party = (f"We take bookings for up to {b.max_party} people." if b.kind == "restaurant"
             else f"Book {b.booking} by phone.")
    return (f"You are the phone assistant of {b.name}, a {b.kind} in {b.city}, at {b.number} {b.street}. "
            f"Open {clock(b.open_hour)} to {clock(b.close_hour)}, closed {b.closed_day}s. Prices: {prices}. "
            f"{party} Answer in one or two short sentences.")


_YES = re.compile(r"\b(yes|yeah|yep|sure|of course|absolutely|certainly|we are open|we're open|open on|we can|we do)\b")
_NO = re.compile(r"\b(no|nope|closed|not open|aren't open|are not open|i'm not|we're not|we are not|cannot|can't|"
                 r"only up to|only take|not able)\b")


@dataclass(frozen=True)
class Check:
    kind: str  # "yes" | "no" | "contains"
    expected: tuple[str, ...] = ()  # for "contains": any of these (lower case) must appear

    def right(self, reply: str) -> bool:
        text = reply.lower()
        if self.kind == "contains":
            return any(re.search(rf"(?<![\w$]){re.escape(e)}(?!\d)", text) for e in self.expected)
        yes, no = _YES.search(text), _NO.search(text)
        if self.kind == "yes":
            return bool(yes) and (not no or yes.start() < no.start())
        return bool(no) and (not yes or no.start() < yes.start())


def questions(b: Business) -> list[tuple[str, Check]]:
    rng = random.Random(b.seed + 1)
    open_day = rng.choice(b.open_days)
    item, price = rng.choice(b.items)
    close, opening = clock(b.close_hour), clock(b.open_hour)
    out = [
        (f"Are you open on {b.closed_day}?", Check("no")),
        (f"Are you open on {open_day}?", Check("yes")),
        ("What time do you close?", Check("contains", (close, close.replace(" ", ""), f"{b.close_hour}:00",
                                                       f"{b.close_hour % 12 or 12}:00", f"{b.close_hour % 12 or 12} o'clock"))),
        ("What time do you open?", Check("contains", (opening, opening.replace(" ", ""), f"{b.open_hour}:00",
                                                      f"{b.open_hour % 12 or 12}:00", f"{b.open_hour % 12 or 12} o'clock"))),
        (f"How much is the {item}?", Check("contains", (f"${price}", f"{price} dollars", f"{price}.00", str(price)))),
        ("Where are you located?", Check("contains", (b.street.lower(), b.street.split()[0].lower()))),
    ]
    if b.kind == "restaurant":
        out += [(f"Can I book a table for {b.max_party} people?", Check("yes")),
                (f"Can I book a table for {b.max_party + 4} people?", Check("no"))]
    return out


def words(reply: str) -> list[str]:
    return re.findall(r"[\w'$.:]+", reply)


def loops(reply: str) -> bool:
    """A word 4-gram said again, or a sentence said twice."""
    tokens = [w.lower().strip(".,:") for w in words(reply)]
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    if len(grams) != len(set(grams)):
        return True
    sentences = [s.strip().lower() for s in re.split(r"[.!?]+", reply) if len(s.split()) >= 2]
    return len(sentences) != len(set(sentences))


_ENGLISH = {"the", "a", "an", "is", "are", "we", "you", "i", "it", "to", "and", "of", "on", "at", "our", "yes", "no",
            "open", "closed", "for", "in", "my", "your", "this", "that", "be", "can", "do", "not", "with", "hello", "hi",
            "thank", "thanks", "sorry", "sure", "am", "pm", "what", "how", "good", "great", "bye", "have", "day",
            "you're", "we're", "i'm", "it's", "welcome", "goodbye", "please", "okay", "they", "he", "she", "why",
            "who", "when", "where", "there", "here", "would", "will", "was", "were", "so", "but", "or", "if", "all",
            "don't", "up", "out", "each", "other", "because", "by", "from", "just", "like", "about", "very"}
_ROMANCE = {"il", "el", "la", "le", "lo", "gli", "los", "las", "è", "es", "un", "una", "uno", "di", "de", "del",
            "della", "che", "que", "per", "por", "con", "sono", "está", "non", "y", "e", "cielo"}


def english(reply: str) -> bool:
    tokens = {w.lower().strip(".,:!?") for w in words(reply)}
    if not tokens:
        return True  # nothing said is no wrong language (counted as an empty reply elsewhere)
    return bool(tokens & _ENGLISH) and len(tokens & _ROMANCE) <= max(0, len(tokens) // 10)
