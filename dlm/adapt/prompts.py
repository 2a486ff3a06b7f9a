"""The prompt set for distillation: what a voice assistant and a phone bot are asked.

Contract: `generate_prompts(n, seed)` returns `n` distinct `Prompt`s, deterministic for a seed:
chat messages (system prompt first) ready for the teacher's chat template, and a `kind` naming
the category. Prompts are templates × slots (questions, small talk, everyday tasks,
customer-service turns, multi-turn follow-ups); the multi-turn ones carry an earlier user turn
and a short assistant reply written here, so the teacher answers a follow-up in context.

`self_prompt_starts(n, seed)` and `clean_request(text)` are the model-free half of prompts the
model writes itself (Magpie, arXiv 2406.08464; `dlm.adapt.teacher.written_prompts` runs the
model): for each, a system prompt and the first words of a user's request, then the check that
the model's continuation reads as one spoken request. Their kind is `SELF_KIND`.

`read_requests(path, n, seed)`: up to `n` requests written by people, from a text file (one a
line; a public set of what callers ask a voice assistant, converted as docs/models.md shows), each
as `clean_request` keeps it, under the voice assistant's system prompt. Their kind is
`REQUEST_KIND`.

Nothing here tokenizes: the caller renders messages with the chat template and encodes user
text with special-token parsing off.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KINDS", "PHONE_SYSTEM_PROMPT", "REQUEST_KIND", "SELF_KIND", "VOICE_SYSTEM_PROMPT", "Prompt",
           "clean_request", "generate_prompts", "read_requests", "self_prompt_starts"]

VOICE_SYSTEM_PROMPT = (
    "You are a friendly voice assistant. Your replies are spoken aloud, so answer in one to three "
    "short sentences of plain speech, with no lists, no markdown and no emojis."
)
PHONE_SYSTEM_PROMPT = (
    "You are the phone assistant of {business}. Your replies are spoken to the caller, so answer "
    "in one to three short, polite sentences of plain speech, with no lists and no markdown."
)


@dataclass(frozen=True)
class Prompt:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, system first
    kind: str  # one of KINDS, or SELF_KIND (a request the model wrote)

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


# -- slots ------------------------------------------------------------------------------------
_SLOTS: dict[str, list[str]] = {
    "animal": ["cats", "dogs", "owls", "dolphins", "bees", "octopuses", "penguins", "elephants", "sharks",
               "bats", "ants", "horses", "parrots", "frogs", "whales", "wolves", "camels", "snails"],
    "thing": ["the moon", "rainbows", "thunder", "the tides", "snow", "volcanoes", "earthquakes",
              "the northern lights", "fog", "hiccups", "yawning", "dreams", "coffee", "bread dough",
              "batteries", "magnets", "airplanes", "the internet", "vaccines", "glaciers", "clouds",
              "the seasons", "lightning", "soap", "microwaves", "GPS", "solar panels", "rust"],
    "topic": ["photosynthesis", "gravity", "inflation", "black holes", "the water cycle", "democracy",
              "compound interest", "DNA", "climate change", "electricity", "the stock market", "recycling",
              "the immune system", "jazz", "the Roman Empire", "artificial intelligence", "sleep",
              "meditation", "evolution", "the speed of light", "taxes", "the Olympics", "chess", "yoga"],
    "place": ["Paris", "Tokyo", "New York", "Cairo", "Sydney", "Rome", "Mexico City", "Toronto",
              "Berlin", "Lisbon", "Seoul", "Cape Town", "Iceland", "the Alps", "the Sahara", "Peru",
              "Norway", "Vietnam", "Scotland", "Kenya", "Chicago", "Bangkok", "Dublin", "Vancouver"],
    "food": ["pancakes", "a tomato soup", "fried rice", "banana bread", "guacamole", "a vegetable curry",
             "scrambled eggs", "a Greek salad", "pizza dough", "lemonade", "chili", "hummus", "risotto",
             "oatmeal", "a smoothie", "garlic bread", "tacos", "chocolate chip cookies", "lentil soup"],
    "skill": ["juggle", "whistle", "meditate", "swim faster", "sleep better", "learn a language",
              "save money", "run a 5K", "play the guitar", "take better photos", "speak in public",
              "touch type", "draw a face", "keep a plant alive", "cook rice", "tie a tie",
              "focus at work", "wake up earlier", "make friends in a new city", "stop procrastinating"],
    "event": ["a job interview", "a first date", "a long flight", "a wedding toast", "a marathon",
              "an exam", "a camping trip", "a birthday party", "a move to a new apartment",
              "a dentist appointment", "a presentation", "a road trip", "a family dinner"],
    "feeling": ["tired", "a bit stressed", "bored", "happy today", "nervous", "excited", "lonely",
                "overwhelmed", "proud of myself", "sleepy", "hungry", "in a great mood", "anxious"],
    "time": ["five minutes", "ten minutes", "twenty minutes", "half an hour", "an hour", "two hours",
             "seven a.m.", "noon", "six thirty", "tomorrow morning", "Friday evening", "nine tonight"],
    "chore": ["call my mom", "buy milk", "water the plants", "take out the trash", "pay the rent",
              "pick up the kids", "book a haircut", "return the library books", "walk the dog",
              "send the report", "renew my passport", "charge my phone", "take my medicine"],
    "number": ["12", "15", "24", "37", "48", "64", "75", "99", "120", "250", "365", "1000"],
    "unit_pair": ["miles to kilometers", "pounds to kilograms", "Fahrenheit to Celsius",
                  "cups to milliliters", "inches to centimeters", "feet to meters", "ounces to grams"],
    "business": ["Sunny Dental Clinic", "City Bike Repair", "Green Leaf Pizzeria", "Northwind Internet",
                 "Maple Street Pharmacy", "Blue Harbor Hotel", "QuickFix Plumbing", "Riverside Vet",
                 "Star Mobile", "Harbor Bank", "FreshCart Groceries", "Skyline Airlines", "Pixel Electronics"],
    "item": ["my order", "the blue sneakers", "a pizza", "my prescription", "the router", "my package",
             "a room for two nights", "my phone bill", "the headphones", "a table for four",
             "an appointment", "my flight", "the refund", "my subscription", "the washing machine"],
    "problem": ["my internet keeps dropping", "I was charged twice", "my package never arrived",
                "the app won't let me log in", "my order is missing an item", "the product arrived broken",
                "I forgot my password", "my card was declined", "the delivery is late",
                "I got the wrong size", "my phone has no signal", "the heating in my room is not working"],
    "weekday": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "person": ["my sister", "my boss", "a coworker", "my neighbor", "my best friend", "my dad",
               "my grandmother", "my partner", "my son", "my daughter", "a new colleague"],
    "genre": ["a mystery novel", "a comedy", "a science fiction film", "a podcast", "a board game",
              "a documentary", "a fantasy book", "an album", "a video game", "a cooking show"],
}

# -- templates ----------------------------------------------------------------------------------
# Each template is one user turn; {slot} names index _SLOTS.
_TEMPLATES: dict[str, list[str]] = {
    "question": [
        "Why do {animal} sleep so much?", "How do {animal} communicate?", "What do {animal} eat?",
        "How does {thing} work?", "What causes {thing}?", "Can you explain {topic} simply?",
        "What is {topic} in one sentence?", "Why is {topic} important?", "Tell me a fun fact about {animal}.",
        "Tell me something interesting about {place}.", "What's the best time of year to visit {place}?",
        "What language do they speak in {place}?", "What is {place} famous for?",
        "How long do {animal} live?", "Is {thing} dangerous?", "Who came up with {topic}?",
        "How would you explain {thing} to a child?", "What's the difference between {topic} and {thing}?",
        "How do I convert {unit_pair}?", "What is {number} times {number}?",
        "What's {number} divided by four?", "Is {number} a prime number?",
        "How many days are in {number} weeks?", "What does {topic} have to do with everyday life?",
    ],
    "smalltalk": [
        "Hi there!", "Good morning!", "How are you doing today?", "I'm feeling {feeling}.",
        "Tell me a joke.", "Tell me a joke about {animal}.", "What's your favorite food?",
        "Do you like {animal}?", "I just got back from {place}.", "Can you recommend {genre}?",
        "I'm bored, entertain me.", "What should I do this {weekday} evening?", "Thanks, that helped a lot!",
        "Say something nice to me.", "I can't sleep.", "I'm {feeling}, any advice?",
        "What do you think about {topic}?", "I'm going to {place} next month!", "Do you ever get tired?",
        "What's a good name for a cat?", "Give me a compliment.", "Cheer me up, please.",
        "I finally finished {event}.", "Guess what, I learned to {skill}!",
    ],
    "task": [
        "Set a timer for {time}.", "Remind me to {chore} at {time}.", "How do I make {food}?",
        "Give me a quick recipe for {food}.", "How can I {skill}?", "Give me one tip to {skill}.",
        "Help me prepare for {event}.", "What should I pack for {event}?",
        "Write a short text to {person} saying I'll be late.", "How do I politely decline an invitation from {person}?",
        "What should I get {person} for their birthday?", "Plan a quick dinner with {food}.",
        "Help me write a toast for {event}.", "How long should I boil an egg?",
        "What's a good stretch after sitting all day?", "Wake me up at {time}.",
        "Add {chore} to my to-do list.", "How do I get a stain out of a shirt?",
        "Give me a five minute workout.", "What's a quick healthy snack?",
        "Suggest a name for my new {animal} plush toy.", "How do I calm down before {event}?",
    ],
    "service": [
        "Hi, I'm calling about {item}.", "I'd like to cancel {item}.", "Where is {item}?",
        "Hello, {problem}.", "Hi, {problem}. Can you help?", "Can I change {item}?",
        "What are your opening hours on {weekday}?", "Are you open on {weekday}?",
        "I want to book {item} for {weekday}.", "How much does {item} cost?",
        "Can I speak to a real person?", "I want a refund for {item}.",
        "Do you deliver on {weekday}?", "How long will {item} take?",
        "I need to reschedule my appointment to {weekday}.", "Can you check the status of {item}?",
        "Is there a fee to cancel {item}?", "I'd like to make a complaint, {problem}.",
        "Do you have parking near your location?", "What payment methods do you accept?",
    ],
}

# Follow-ups: (first user turn, the assistant's short reply, the follow-up). Slots are shared
# across the three parts so the follow-up refers to what came before.
_DIALOGUES: list[tuple[str, str, str]] = [
    ("Tell me a fun fact about {animal}.", "Sure! {animal_cap} have some surprising habits that scientists still study.",
     "Really? Tell me more."),
    ("How do I make {food}?", "It's easy: you need a few basic ingredients and about twenty minutes.",
     "What ingredients do I need?"),
    ("How do I make {food}?", "Start with fresh ingredients and follow a simple recipe.", "Can I make it vegan?"),
    ("What is {place} famous for?", "{place} is known for its food, its history and its lively streets.",
     "What should I see first?"),
    ("I'm going to {place} next month!", "That sounds wonderful, you'll have a great time.",
     "What should I pack?"),
    ("Set a timer for {time}.", "Okay, your timer for {time} is set.", "Actually, make it longer."),
    ("Remind me to {chore} at {time}.", "Got it, I'll remind you to {chore} at {time}.",
     "Can you also remind me tomorrow?"),
    ("Hello, {problem}.", "I'm sorry to hear that. Let me help you with it.",
     "I already tried restarting everything."),
    ("Hi, I'm calling about {item}.", "Of course, I can help with {item}. What would you like to know?",
     "When will it be ready?"),
    ("I'd like to cancel {item}.", "I can help with that. May I ask why you'd like to cancel?",
     "It's just too expensive for me right now."),
    ("Can you explain {topic} simply?", "Sure, {topic} is a big idea, but the basics are simple.",
     "Can you give me an example?"),
    ("I'm feeling {feeling}.", "Thanks for telling me. Do you want to talk about it?", "Yes, a little."),
    ("How can I {skill}?", "Start small and practice a little every day.", "How long will it take?"),
    ("Help me prepare for {event}.", "Happy to help. Preparation makes a big difference.",
     "What's the most important thing?"),
    ("What are your opening hours on {weekday}?", "On {weekday} we're open from nine to five.",
     "And what about holidays?"),
    ("I want to book {item} for {weekday}.", "Sure, {weekday} works. What time suits you?",
     "Something in the afternoon, please."),
    ("Can you recommend {genre}?", "I'd be glad to. Do you prefer something light or something serious?",
     "Something light."),
    ("What is {number} times {number2}?", "{number} times {number2} is a quick one.", "Now add ten to that."),
]

_OPENERS = ["Hey, ", "Um, ", "Okay so ", "Quick question, ", "Hi, ", "So, ", "Hmm, ", "Excuse me, ",
            "Sorry, ", "Well, ", "Alright, ", "Hey there, ", "Listen, ", "Oh, ", "Okay, ", "Hello, "]

KINDS: tuple[str, ...] = ("question", "smalltalk", "task", "service", "followup")
# Share of each kind in the set (phone-bot turns and follow-ups weighted up: the agent's job).
_KIND_WEIGHTS = {"question": 0.22, "smalltalk": 0.18, "task": 0.2, "service": 0.22, "followup": 0.18}


def _fill(template: str, rng: random.Random, chosen: dict[str, str]) -> str:
    """Fill every {slot}; a slot already in `chosen` keeps its value (shared across turns).
    `{x_cap}` is slot x capitalised; `{x2}` is a second, independent draw from slot x."""
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None or name in chosen:
            continue
        base = name.removesuffix("_cap")
        if base not in chosen:
            chosen[base] = rng.choice(_SLOTS[base.removesuffix("2")])
        chosen[f"{base}_cap"] = chosen[base][0].upper() + chosen[base][1:]
    return template.format(**chosen)


def _system(kind: str, rng: random.Random, chosen: dict[str, str]) -> str:
    if kind == "service" or (kind == "followup" and "business" in chosen):
        business = chosen.setdefault("business", rng.choice(_SLOTS["business"]))
        return PHONE_SYSTEM_PROMPT.format(business=business)
    return VOICE_SYSTEM_PROMPT


def _one(kind: str, rng: random.Random) -> Prompt:
    chosen: dict[str, str] = {}
    if kind == "followup":
        first, reply, follow = rng.choice(_DIALOGUES)
        turns = [("user", _fill(first, rng, chosen))]
        turns += [("assistant", _fill(reply, rng, chosen)), ("user", _fill(follow, rng, chosen))]
        if any(k in chosen for k in ("item", "problem")):
            chosen["business"] = rng.choice(_SLOTS["business"])
    else:
        turns = [("user", _fill(rng.choice(_TEMPLATES[kind]), rng, chosen))]
    role, text = turns[-1]
    if rng.random() < 0.4:  # how people open a spoken request
        text = rng.choice(_OPENERS) + text[0].lower() + text[1:]
    if rng.random() < 0.25:  # transcripts are often lower-case without final punctuation
        text = text.rstrip(".!?").lower()
    turns[-1] = (role, text)
    return Prompt((("system", _system(kind, rng, chosen)), *turns), kind)


def generate_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """`n` distinct prompts, deterministic for `seed`; raises ValueError if the space runs dry."""
    rng = random.Random(seed)
    kinds, weights = list(_KIND_WEIGHTS), list(_KIND_WEIGHTS.values())
    seen: set[Prompt] = set()
    out: list[Prompt] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"only {len(out)} distinct prompts found for n={n}")
        p = _one(rng.choices(kinds, weights)[0], rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


# -- prompts the model writes ----------------------------------------------------------------------

SELF_KIND = "self"
# The first words of a request the model then goes on writing. Without them a small instruct
# model starts nearly every request alike ("I'm looking for a new ..."); with them the requests
# spread over questions, commands, small talk and a caller's business.
_SELF_STARTS = (
    "What", "What's", "What is the", "How do I", "How", "How long", "How many", "Why", "Why do", "Can you",
    "Could you", "Tell me", "Tell me a", "Is it", "Is there", "Are", "Does", "Do you", "Where", "When",
    "Who", "Which", "Should I", "I need", "I want to", "Help me", "Give me", "Explain", "Remind me to",
    "Set", "Please", "My", "I'm", "I have", "I just", "Any", "Recommend", "Describe", "Let's", "Good morning",
    "Thanks", "Okay, and", "So", "Hey, what", "Hi, can", "Quick question,", "What do you think about",
    "Do you know", "I was wondering", "Say",
)
_SERVICE_STARTS = (
    "Hi, I", "I'd like to", "I need to", "Can I", "Do you", "What are your", "How much", "When", "My",
    "I want to", "Is it possible to", "I have a question about", "Hello, I", "I called", "Could you",
)
_SELF_SERVICE_SHARE = 0.25  # of the requests, a caller's to a business's phone assistant
_MAX_REQUEST_WORDS = 40


def self_prompt_starts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (system prompt, first words of the user's request), deterministic for `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < _SELF_SERVICE_SHARE:
            business = rng.choice(_SLOTS["business"])
            out.append((PHONE_SYSTEM_PROMPT.format(business=business), rng.choice(_SERVICE_STARTS)))
        else:
            out.append((VOICE_SYSTEM_PROMPT, rng.choice(_SELF_STARTS)))
    return out


def clean_request(text: str) -> str | None:
    """The request as a caller would say it (runs of spaces made one), or None where the text is
    not one: more than one line (a letter, code), characters that are not plain ASCII text,
    markup, fewer than 3 or more than 40 words, or a last character that is neither a letter, a
    digit nor . ? ! (a spoken request may trail off after a word, not inside a bracket or quote)."""
    text = text.strip()
    if not text or "\n" in text or not text.isascii() or any(c in text for c in "<>{}[]|#*_`~\\"):
        return None
    words = text.split()
    if not 3 <= len(words) <= _MAX_REQUEST_WORDS or not (text[-1].isalnum() or text[-1] in ".?!"):
        return None
    return " ".join(words)


# -- requests from a file --------------------------------------------------------------------------

REQUEST_KIND = "request"


def read_requests(path: str | Path, n: int, seed: int = 0) -> list[Prompt]:
    """Up to `n` distinct requests (case aside) from a UTF-8 text file, one a line, each as
    `clean_request` keeps it (the others, blank lines and # comments among them, are skipped), in
    an order shuffled by `seed`, under VOICE_SYSTEM_PROMPT. ValueError where the file cannot be
    read as text or holds no usable request."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the requests ({e})") from e
    seen: set[str] = set()
    requests = []
    for line in lines:
        request = clean_request(line)
        if request is not None and request.lower() not in seen:
            seen.add(request.lower())
            requests.append(request)
    if not requests:
        raise ValueError(f"{path}: no usable request (one a line, 3 to {_MAX_REQUEST_WORDS} words of plain text)")
    random.Random(seed).shuffle(requests)
    return [Prompt((("system", VOICE_SYSTEM_PROMPT), ("user", r)), REQUEST_KIND) for r in requests[:n]]
