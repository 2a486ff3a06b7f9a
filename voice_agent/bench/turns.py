"""The labelled turn set of `voice-agent bench turns`, and the endpointing run over it.

Contract:
- `SENTENCES`: complete requests a caller would say; `VOICES`: the embedded piper voice at three
  speeds and five espeak-ng voices. Sentence i is spoken by `voices_per_sentence` voices
  (i, i+1, ... modulo the list), and each recording gives two items:
  "complete": the whole sentence, then `TRAIL_S` of silence;
  "paused": the same recording cut at a word boundary inside it (at least two words before and
  after), with `PAUSES_MS[k % 5]` (400-1200 ms) of silence spliced in, then the rest and the
  trailing silence. The audio before the cut is the whole sentence's, so it carries
  mid-sentence prosody (a fragment synthesized alone would end like a finished sentence).
  Word boundaries come from whisper's word timestamps (`Transcriber.words`), moved to the quietest
  10 ms within 60 ms.
- `build_turn_set(cache_dir, piper_voice_path, transcriber_factory, voices_per_sentence=2)`:
  the items, synthesized once and cached under `cache_dir` (WAV plus a JSON of the labels, keyed
  by a hash of what shapes them); `transcriber_factory()` is only called on a cache miss. A
  missing espeak-ng raises `UserError`.
- `first_end_s(item, ...)`: the stream time at which an endpointer ends the item's first turn,
  run exactly as a call runs it (20 ms chunks): silence alone (`check_ms=0`), or pause checks
  whose verdict `verdict(k, audio) -> (over, seconds, unsure_ms)` on the k-th check arrives
  `seconds` later in stream time and ends the turn if over and the pause still goes on; if not
  over, a non-zero `unsure_ms` (an unsure transcript: turn.unsure_silence_ms) lets that pause end
  the turn after that much silence (`Endpointer.shorten_pause`). None: no turn ended.
- `outcome(item, end_s)`: "cut" (the turn ended before the caller's last word), "missed" (no
  end) or the wait in ms from the end of the speech to the end of the turn.
- `build_training_clips(cache_dir, piper_voice_path, transcriber_factory, voices_per_sentence=8)`:
  the prosody turn model's training set (`audio.prosody`), made the same way from
  `TRAIN_SENTENCES` (none of them in `SENTENCES` or the e2e bench's prompts, so `bench turns`
  stays a held-out test): sentence i spoken by voices i*3, i*3+1, ... (modulo `VOICES`); each
  recording gives one `TrainingClip` with label 1 (the whole sentence: the turn is over) and one
  with label 0 at every word boundary inside it (the audio up to that word boundary, cut as
  above: the turn goes on), each followed by `CLIP_TAIL_S` of silence. Cached like the turn set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from voice_agent.bench.prompts import PIPER, PROMPT_RATE_HZ, espeak, voiced_bounds
from voice_agent.errors import UserError

__all__ = [
    "PAUSES_MS",
    "SENTENCES",
    "TRAIL_S",
    "TRAIN_SENTENCES",
    "VOICES",
    "TrainingClip",
    "TurnItem",
    "build_training_clips",
    "build_turn_set",
    "first_end_s",
    "outcome",
]

RATE = PROMPT_RATE_HZ
TRAIL_S = 2.0
PAUSES_MS = (400, 600, 800, 1000, 1200)
CHUNK_S = 0.02
_GENERATOR_VERSION = "1"  # bump when the synthesis or the cutting below changes

SENTENCES: tuple[str, ...] = (
    "What time does the pharmacy on Main Street open tomorrow morning?",
    "I would like to book a table for four people at seven tonight.",
    "Can you tell me the weather forecast for Boston this weekend?",
    "My order number is four five seven two and it has not arrived yet.",
    "Please move my dentist appointment from Tuesday to Thursday afternoon.",
    "How long does it take to drive from the airport to the city center?",
    "I need to cancel my subscription before the end of the month.",
    "Do you have any vegetarian dishes on the dinner menu?",
    "Could you remind me to call my sister at six thirty this evening?",
    "The heating in my apartment stopped working last night.",
    "What is the best way to get to the train station from here?",
    "I am calling about the invoice I received for the last two months.",
    "Can I pay my electricity bill with a credit card over the phone?",
    "We are looking for a hotel room near the beach for three nights.",
    "Is the swimming pool open to visitors on Sunday afternoons?",
    "I would like to speak with someone about changing my delivery address.",
    "How much does a return ticket to Chicago cost next Friday?",
    "Please send the documents to my email address instead of my home.",
    "What are your opening hours during the Christmas holidays?",
    "My flight was delayed and I missed my connection in Denver.",
    "Can you recommend a good Italian restaurant that is open late?",
    "I want to add my daughter as a second driver on my car insurance.",
    "Where can I find the nearest charging station for an electric car?",
    "The package was left at the wrong door and my neighbor has it.",
)

# The prosody model's training sentences: other requests, answers and short replies of every
# length (short complete turns keep the model from learning that a short utterance goes on).
TRAIN_SENTENCES: tuple[str, ...] = (
    "Yes, please.",
    "No, thank you.",
    "That is all for today.",
    "Sure, go ahead.",
    "I am not sure.",
    "Thanks a lot, goodbye.",
    "Sorry, could you repeat that?",
    "Okay, that works for me.",
    "Hello, is anyone there?",
    "Maybe later.",
    "Can I change the date of my reservation?",
    "My credit card was charged twice for the same order.",
    "I would like to know if you deliver on weekends.",
    "The printer in our office keeps jamming every morning.",
    "How do I update the address on my account?",
    "We need a taxi to the museum at ten o'clock.",
    "Is there a discount for students or seniors?",
    "I lost my keys somewhere in the parking garage.",
    "Could you check whether my prescription is ready?",
    "The internet has been down since yesterday afternoon.",
    "What documents do I need to open a bank account?",
    "I want to return a jacket that does not fit.",
    "Please tell the doctor that I will be ten minutes late.",
    "Our team meeting has moved to the second floor.",
    "Do you know a good plumber in this neighborhood?",
    "My son has a fever and a sore throat since Monday.",
    "Can you help me reset the password for my email?",
    "The train to Boston was cancelled again this morning.",
    "I am looking for a gift for my mother's birthday.",
    "How early should I arrive at the airport for an international flight?",
    "Is it possible to bring a dog into the hotel?",
    "The washing machine makes a loud noise when it spins.",
    "I would like to order two large pizzas and a salad.",
    "When does the library close on Saturdays?",
    "My neighbor's car is blocking our driveway.",
    "Could you send a technician to look at the boiler?",
    "We booked a double room but got a single one.",
    "I need a receipt for the repair you did last week.",
    "What is the fastest way to get downtown during rush hour?",
    "Please cancel the newspaper delivery while we are away.",
    "Our flight lands at midnight, so we will check in late.",
    "The water in the bathroom has been cold for two days.",
    "Can I transfer my membership to my brother?",
    "I would like to report a broken street light on Oak Avenue.",
    "Is the museum free on the first Sunday of the month?",
    "My package says delivered but there is nothing at the door.",
    "How much would it cost to ship a box to Canada?",
    "We are planning a small party for about twenty guests.",
    "The elevator in building C has been out of order all week.",
    "Can you tell me which bus goes to the university?",
    "I think there is a mistake on my phone bill.",
    "Please add extra cheese and no onions.",
    "Do I need an appointment, or can I just walk in?",
    "The kids would like to try the swimming lessons in summer.",
    "I forgot my umbrella on the bus this morning.",
    "Could we get a table by the window, please?",
    "Got it.",
    "Not right now, thanks.",
    "Yes, that is correct.",
    "Wait, one more thing.",
    "Perfect, thank you very much.",
    "No, the other one.",
    "I already did that.",
    "That sounds good to me.",
    "Can you spell that for me?",
    "It is the blue house on the corner.",
    "My account number starts with three seven.",
    "I have been waiting on hold for almost an hour.",
    "Would it be possible to speak to a manager?",
    "The heater in the car only blows cold air.",
    "We would like two tickets for the evening show.",
    "How many days does it take for a refund to arrive?",
    "Is there parking at the stadium or should we take the train?",
    "I moved last month and never got my new card.",
    "Can you book me a haircut for Friday after lunch?",
    "The coffee machine on the third floor is leaking again.",
    "Which platform does the express to the airport leave from?",
    "My grandmother needs a wheelchair at the gate.",
    "I was charged a late fee even though I paid on time.",
    "Do you sell gift cards in the store or only online?",
    "Our dishwasher stopped halfway through the cycle.",
    "Please put me down for the early shift next week.",
    "What is the difference between the basic and the premium plan?",
    "I would rather have the window seat if there is one.",
    "The lights in the hallway keep flickering at night.",
    "Can I bring my own wine to the restaurant?",
    "I need to renew my passport before our trip in June.",
    "How late is the pharmacy open on public holidays?",
    "There is a strange smell coming from the basement.",
    "Our cat has not eaten anything since yesterday.",
    "Is breakfast included in the price of the room?",
    "I want to move my savings into a fixed deposit.",
    "The garage door will not open with the remote.",
    "Could you read me the last three transactions on my card?",
    "We are two adults and three children under twelve.",
    "I think I left my laptop charger in room two hundred.",
    "What time is checkout on the day we leave?",
    "My daughter would like to join the football club.",
    "Can the delivery be left with the building manager?",
    "The app keeps logging me out every few minutes.",
    "Please let me know when the part comes in.",
    "How much is it to add another line to my phone plan?",
    "I need someone to fix a leak under the kitchen sink.",
    "Are there any tables free for lunch today?",
    "The bus was so full that it did not stop at our station.",
    "Could you move the meeting to half past three?",
    "I am allergic to nuts, so please check the dessert.",
    "My internet bill went up without any warning.",
    "We would like to extend our stay by one more night.",
    "Where do I drop off old batteries for recycling?",
    "The doctor said I should call back with my test results.",
    "Can you tell my husband that I will pick up the kids?",
    "I have a question about the warranty on my television.",
    "Our neighbors have been playing loud music all night.",
    "Is the road to the mountains open after the snow?",
    "I ordered a large but they sent me a small.",
    "How do I know if my application was received?",
    "Please transfer me to the billing department.",
    "The kettle switched itself off and now it will not turn on.",
    # An assistant's requests (session 26): questions of fact, commands, advice; the first 119
    # were mostly a phone line's errands, and the e2e prompts' kind of turn scored worst.
    "Who wrote the novel Pride and Prejudice?",
    "How tall is the Eiffel Tower?",
    "Play some relaxing piano music.",
    "What is the boiling point of water in Fahrenheit?",
    "Turn off the lights in the living room.",
    "How many ounces are in a cup?",
    "Tell me something interesting about octopuses.",
    "What year did the first man walk on the moon?",
    "Wake me up at six tomorrow.",
    "Is it going to rain this afternoon?",
    "Explain how a rainbow forms.",
    "What's a good name for a goldfish?",
    "How do you make a paper airplane?",
    "Spell the word necessary.",
    "What rhymes with orange?",
    "How many bones are in the human body?",
    "Suggest a movie for a rainy evening.",
    "What's twelve times fourteen?",
    "Convert fifty miles to kilometers.",
    "Who painted the Mona Lisa?",
    "Why do cats purr?",
    "Give me a word that means happy.",
    "How do I get a coffee stain out of a white shirt?",
    "What's the longest river in the world?",
    "Read me the news headlines.",
    "How do bees make honey?",
    "Add milk and eggs to my shopping list.",
    "What is the population of Canada?",
    "Can you sing me a song?",
    "How old is the universe?",
    "What should I cook for dinner tonight?",
    "Tell me a fun fact about space.",
    "Where do penguins live?",
    "How do I change a flat tire?",
    "What's the square root of one hundred forty four?",
    "Recommend a podcast about history.",
    "How many players are on a soccer team?",
    "Describe the taste of a mango.",
    "What does the word serendipity mean?",
    "Call my brother on speaker.",
    "How much water should I drink every day?",
    "What's the best time of year to visit Japan?",
    "Teach me a simple card trick.",
    "Which is bigger, a dolphin or a shark?",
    "Pause the music for a minute.",
    "How do airplanes stay in the air?",
    "Find a quiet cafe nearby.",
    "What is the chemical symbol for gold?",
    "When was the Great Wall of China built?",
    "Give me a riddle to solve.",
    "How can I stop my hiccups?",
    "What's the weather going to be like on Saturday?",
    "Start a stopwatch.",
    "Who invented the telephone?",
    "How long do elephants live?",
    "Tell me a bedtime story about a dragon.",
    "What's the fastest land animal?",
    "How do magnets attract metal?",
    "Set the thermostat to twenty degrees.",
    "What causes thunder?",
    "How many continents are there?",
    "Name three fruits that are high in vitamin C.",
    "Is a tomato a fruit or a vegetable?",
    "How do I keep basil fresh?",
    "Is coffee bad for your heart?",
    "Summarize the plot of Romeo and Juliet.",
    "How hot does lava get?",
    "Remind me to water the plants on Sunday.",
    "What language do they speak in Brazil?",
    "Why do leaves change color in the fall?",
    "Help me plan a birthday party for a six year old.",
    "How many calories are in a banana?",
    "Which city hosted the first modern Olympics?",
    "Text my wife that I'm on my way.",
    "How do I fold a fitted sheet?",
    "What is the speed of sound?",
    "Play the next episode.",
    "Which planet has the most moons?",
    "What's an easy dessert I can make in ten minutes?",
    "How do I calm down before an exam?",
    "Who was the first president of the United States?",
    "Tell me the score of last night's game.",
    "What is a haiku?",
    "Shuffle my workout playlist.",
    "How do volcanoes erupt?",
    "Why is the ocean salty?",
    "Write a short poem about autumn.",
    "How do I remove a splinter?",
    "Give me a synonym for difficult.",
    "What's the tallest mountain in Europe?",
    "Count backwards from ten.",
    "How many hours of sleep does a teenager need?",
    "What is the meaning of life?",
    "Describe a sunset in one sentence.",
    "How are diamonds formed?",
    "Add a dentist visit to my calendar for Monday.",
    "Which countries border Germany?",
    "How do I boil rice without it sticking?",
    "What's the most popular sport in the world?",
    "Tell me about the history of chocolate.",
    "How does a compass work?",
    "What's seven percent of two hundred?",
    "Can dogs eat grapes?",
    "Lower the volume a little.",
    "What's on my schedule today?",
    "How do I make my own pasta?",
    "Why do we have leap seconds?",
    "Where is the Great Barrier Reef?",
    "What's a polite way to decline an invitation?",
    "Give me three ideas for a date night.",
    "How many teaspoons are in a tablespoon?",
    "What happens when you mix baking soda and vinegar?",
    "Who discovered penicillin?",
    "Find me a recipe that uses chickpeas.",
    "What is the smallest country in the world?",
    "Tell me a tongue twister.",
    "How do I unclog a drain without chemicals?",
    "What time is it in London right now?",
    "Which vegetables grow well in shade?",
    "How do I politely ask my boss for a raise?",
    "Skip this song.",
    "What's the plural of cactus?",
    "Why do onions make you cry?",
    "Tell me how to do a push up correctly.",
    "What is the hottest planet in our solar system?",
    "How long should I rest between sets at the gym?",
    "Describe what a platypus looks like.",
    "What's a good stretch for a stiff neck?",
    "Thank you, that was helpful.",
    "Never mind, forget it.",
)

# (voice, speed): piper speed is 1 / length_scale, espeak-ng speed is words per minute.
VOICES: tuple[tuple[str, float], ...] = (
    (PIPER, 1.0),
    ("en-us", 160),
    (PIPER, 0.9),
    ("en-gb", 150),
    (PIPER, 1.1),
    ("en-gb-scotland", 155),
    ("en-029", 150),
    ("en-gb-x-rp", 165),
)


@dataclass
class TurnItem:
    item_id: str
    kind: str  # "complete" | "paused"
    text: str
    voice: str
    speed: float
    audio: np.ndarray = field(repr=False)  # float32 16 kHz
    speech_end_s: float  # end of the last voiced audio (the caller's last word)
    pause_ms: int = 0  # paused: the silence spliced in
    cut_after: str = ""  # paused: the words before the pause

    @property
    def label(self) -> dict:
        d = asdict(self)
        d.pop("audio")
        return d


def _synthesize(text: str, voice: str, speed: float, piper_voice_path: Path, cache: dict) -> np.ndarray:
    if voice == PIPER:
        if speed not in cache:
            from audio.tts import Synthesizer

            cache[speed] = Synthesizer(piper_voice_path, length_scale=1.0 / speed)
        audio = cache[speed].synthesize(text, sample_rate_hz=RATE)
    else:
        audio = espeak(text, voice=voice, words_per_minute=int(speed))
    start, end = voiced_bounds(audio, RATE)
    if end <= start:
        raise UserError(f"{voice} synthesized {text!r} to silence")
    return audio[start:end].astype(np.float32)


def _quietest(audio: np.ndarray, boundary_s: float) -> int:
    """The middle of the quietest 10 ms within 60 ms of `boundary_s`: where a cut clips no word."""
    frame = RATE // 100
    lo = max(frame, int((boundary_s - 0.06) * RATE))
    hi = min(audio.size - frame, int((boundary_s + 0.06) * RATE))
    if hi - lo < frame:  # a boundary at an edge of the recording: no room to look around it
        return int(np.clip(boundary_s * RATE, 0, audio.size))
    starts = np.arange(lo, max(lo + 1, hi - frame), frame // 2)
    energy = [float(np.mean(np.square(audio[s : s + frame], dtype=np.float64))) for s in starts]
    return int(starts[int(np.argmin(energy))] + frame // 2)


def _cut_sample(audio: np.ndarray, words, k: int) -> tuple[int, str]:
    """A cut between two words inside the sentence (k picks which), at the quietest 10 ms."""
    inner = list(range(2, len(words) - 1))  # cut before word j: >= 2 words before, >= 2 after
    if not inner:
        raise UserError(f"whisper found too few words to cut ({len(words)}) in a sentence of the turn set")
    j = inner[(k * 7) % len(inner)]
    return _quietest(audio, (words[j - 1].end_s + words[j].start_s) / 2), " ".join(w.text for w in words[:j])


@dataclass
class TrainingClip:
    sentence: int  # index into TRAIN_SENTENCES (the group of a held-out split)
    voice: str
    label: int  # 1: the turn is over (the whole sentence); 0: it goes on (cut at a word boundary)
    words: str  # the words the clip holds
    audio: np.ndarray = field(repr=False)  # float32 16 kHz, then CLIP_TAIL_S of silence


CLIP_TAIL_S = 0.3


def _word_cuts(audio: np.ndarray, words) -> list[tuple[int, str]]:
    """(cut, the words before it) at every boundary between two words, at the quietest 10 ms."""
    return [(_quietest(audio, (words[j - 1].end_s + words[j].start_s) / 2), " ".join(w.text for w in words[:j]))
            for j in range(1, len(words))]


def _key(*parts: object) -> str:
    return hashlib.sha1("\x1f".join(map(str, (_GENERATOR_VERSION, *parts))).encode()).hexdigest()[:16]


def build_turn_set(
    cache_dir: Path,
    piper_voice_path: Path,
    transcriber_factory: Callable[[], object],
    voices_per_sentence: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> list[TurnItem]:
    """The labelled items (see the module docstring)."""
    from audio.io import read_wav, write_wav

    if not 1 <= voices_per_sentence <= len(VOICES):
        raise UserError(f"voices per sentence must be 1..{len(VOICES)}, got {voices_per_sentence}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    pipers: dict = {}
    transcriber = None
    items: list[TurnItem] = []
    total = len(SENTENCES) * voices_per_sentence
    k = 0
    for i, text in enumerate(SENTENCES):
        for v in range(voices_per_sentence):
            voice, speed = VOICES[(i + v) % len(VOICES)]
            voice_id = f"piper:{piper_voice_path.name}" if voice == PIPER else f"espeak-ng:{voice}"
            pause_ms = PAUSES_MS[k % len(PAUSES_MS)]
            key = _key(voice_id, speed, text, pause_ms, k, TRAIL_S)
            wav, meta = cache_dir / f"{key}.paused.wav", cache_dir / f"{key}.json"
            if wav.exists() and meta.exists():
                labels = json.loads(meta.read_text())
                sentence, _ = read_wav(cache_dir / f"{key}.complete.wav", RATE)
                paused, _ = read_wav(wav, RATE)
            else:
                if transcriber is None:
                    transcriber = transcriber_factory()
                speech = _synthesize(text, voice, speed, piper_voice_path, pipers)
                cut, before = _cut_sample(speech, transcriber.words(speech), k)
                trail = np.zeros(int(TRAIL_S * RATE), np.float32)
                sentence = np.concatenate([speech, trail])
                paused = np.concatenate([speech[:cut], np.zeros(RATE * pause_ms // 1000, np.float32), speech[cut:], trail])
                labels = {"cut_after": before}
                for name, audio in (("complete", sentence), ("paused", paused)):
                    write_wav(cache_dir / f"{key}.{name}.wav", audio, RATE)
                meta.write_text(json.dumps(labels))  # last: its presence says the entry is whole
            for kind, audio in (("complete", sentence), ("paused", paused)):
                end = voiced_bounds(audio, RATE)[1] / RATE
                items.append(TurnItem(
                    item_id=f"{key}-{kind}", kind=kind, text=text, voice=voice, speed=float(speed),
                    audio=audio, speech_end_s=end,
                    pause_ms=pause_ms if kind == "paused" else 0,
                    cut_after=labels["cut_after"] if kind == "paused" else "",
                ))
            k += 1
            if progress is not None:
                progress(k, total)
    return items


def build_training_clips(
    cache_dir: Path,
    piper_voice_path: Path,
    transcriber_factory: Callable[[], object],
    voices_per_sentence: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> list[TrainingClip]:
    """The prosody model's labelled clips (see the module docstring)."""
    from audio.io import read_wav, write_wav

    if not 1 <= voices_per_sentence <= len(VOICES):
        raise UserError(f"voices per sentence must be 1..{len(VOICES)}, got {voices_per_sentence}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    pipers: dict = {}
    transcriber = None
    clips: list[TrainingClip] = []
    tail = np.zeros(int(CLIP_TAIL_S * RATE), np.float32)
    total = len(TRAIN_SENTENCES) * voices_per_sentence
    done = 0
    for i, text in enumerate(TRAIN_SENTENCES):
        for v in range(voices_per_sentence):
            voice, speed = VOICES[(i * 3 + v) % len(VOICES)]
            voice_id = f"piper:{piper_voice_path.name}" if voice == PIPER else f"espeak-ng:{voice}"
            key = _key("train", voice_id, speed, text)
            wav, meta = cache_dir / f"{key}.wav", cache_dir / f"{key}.json"
            if wav.exists() and meta.exists():
                speech, _ = read_wav(wav, RATE)
                cuts = [tuple(c) for c in json.loads(meta.read_text())["cuts"]]
            else:
                if transcriber is None:
                    transcriber = transcriber_factory()
                speech = _synthesize(text, voice, speed, piper_voice_path, pipers)
                cuts = _word_cuts(speech, transcriber.words(speech))
                write_wav(wav, speech, RATE)
                speech, _ = read_wav(wav, RATE)  # the 16-bit samples a later run reads from the cache
                meta.write_text(json.dumps({"cuts": cuts}))  # last: its presence says the entry is whole
            clips.append(TrainingClip(i, voice, 1, text, np.concatenate([speech, tail])))
            clips.extend(TrainingClip(i, voice, 0, words, np.concatenate([speech[:cut], tail])) for cut, words in cuts)
            done += 1
            if progress is not None:
                progress(done, total)
    return clips


def first_end_s(
    item: TurnItem,
    make_endpointer: Callable[..., object],
    *,
    end_silence_ms: int,
    check_ms: int = 0,
    verdict: Callable[[int, np.ndarray], tuple[bool, float, int]] | None = None,
) -> float | None:
    """When the item's first turn ends (see the module docstring)."""
    from audio.vad import PauseCheck, SpeechEnded

    endpointer = make_endpointer(end_silence_ms=end_silence_ms, check_silence_ms=check_ms)
    chunk = int(CHUNK_S * RATE)
    pending: tuple[float, int, bool, int] | None = None  # the newest pause's verdict: (due, pause_id, over, unsure_ms)
    checks = 0
    for start in range(0, item.audio.size, chunk):
        t0 = start / RATE
        if pending is not None and pending[0] < t0 + CHUNK_S:  # the verdict arrives within this chunk
            (due, pause_id, over, unsure_ms), pending = pending, None
            if over and endpointer.end_turn(pause_id):
                return max(due, t0)
            if not over and unsure_ms and endpointer.shorten_pause(pause_id, unsure_ms):
                return max(due, t0)
        for ev in endpointer.feed(item.audio[start : start + chunk]):
            if isinstance(ev, SpeechEnded):
                return ev.t_s
            if isinstance(ev, PauseCheck) and verdict is not None:
                over, seconds, unsure_ms = verdict(checks, ev.audio)
                checks += 1
                pending = (ev.t_s + seconds, ev.pause_id, over, unsure_ms)  # a newer pause replaces the older one
    return None


def outcome(item: TurnItem, end_s: float | None) -> str | float:
    """"cut", "missed" or the wait in ms after the last word (see the module docstring)."""
    if end_s is None:
        return "missed"
    if end_s < item.speech_end_s:
        return "cut"
    return (end_s - item.speech_end_s) * 1000
