"""`voice-agent train-turn`: train the prosody end-of-turn head (`audio/prosody.py`).

Builds the training clips of `voice_agent.bench.turns.build_training_clips` (synthesized once and
cached: piper and espeak-ng voices saying `TRAIN_SENTENCES`, whole and cut at every word
boundary; each clip also as a phone caller's: 8 kHz G.711 µ-law and back, as /twilio hears it,
and over a noise floor: white noise 45-65 dB below full scale, as a real line has, where
synthesized speech falls to digital silence),
runs whisper tiny.en's encoder over the window at the end of each clip, checks the
head on sentences it was not fitted on (`--folds` splits by sentence: the area under the ROC
curve, and how many clips of each kind fall on the wrong side of 0.5), then fits it on every clip
and writes it to `--out`. The head shipped in `audio/assets/` is this command's output with
`--out audio/assets/prosody-turn.npz`; `voice-agent bench turns --detectors prosody+text` tests
it on the turn set, whose sentences it never heard. About 30 minutes on two cores the first time
(the synthesis and whisper's word times of 1,992 recordings), about 15 from the cache (the
encoder over 47,061 clips; progress lines on stderr).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

import numpy as np

from voice_agent.config import Config

HELP = "train the prosody end-of-turn model (a head on whisper's encoder) on synthesized speech"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/prosody-turn.npz"), metavar="FILE",
                        help="where to write the head (default: runs/prosody-turn.npz; use it with "
                             "--set turn.model=FILE)")
    parser.add_argument("--voices-per-sentence", type=int, default=8,
                        help="recordings per sentence, each in another voice (default: 8, all of them)")
    parser.add_argument("--phone", action=argparse.BooleanOptionalAction, default=True,
                        help="add each clip as heard over a phone line, 8 kHz µ-law (default: on)")
    parser.add_argument("--noise", action=argparse.BooleanOptionalAction, default=True,
                        help="add each clip over a noise floor, 45-65 dB below full scale (default: on)")
    parser.add_argument("--folds", type=int, default=8, help="held-out check: sentence folds (default: 8; 0: none)")
    parser.add_argument("--l2", type=float, default=100.0, help="L2 penalty on the standardized weights (default: 100)")
    parser.add_argument("--cache-dir", default="~/.cache/voice-agent/turn-training", help="where the clips are kept")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The area under the ROC curve: P(a random positive scores above a random negative), ties half."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("the area under the ROC curve needs both classes")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(order.size)
    ranks[order] = np.arange(1, order.size + 1)
    values = np.concatenate([pos, neg])
    for v in np.unique(values):  # average ranks of ties
        tied = values == v
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def phone_line(audio_16k: np.ndarray) -> np.ndarray:
    """The audio as a phone caller's reaches the server: 8 kHz G.711 µ-law, back at 16 kHz."""
    from audio.codecs import mulaw_decode, mulaw_encode
    from audio.resample import resample

    return resample(mulaw_decode(mulaw_encode(resample(audio_16k, 16_000, 8_000))), 8_000, 16_000)


def noise_floor(audio_16k: np.ndarray, seed: int) -> np.ndarray:
    """The audio over white noise at an RMS level between -65 and -45 dBFS (drawn from `seed`)."""
    rng = np.random.default_rng(seed)
    level = 10 ** (rng.uniform(-65.0, -45.0) / 20)
    return (audio_16k + rng.normal(0.0, level, audio_16k.size)).astype(np.float32)


def held_out(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int, l2: float) -> dict[str, Any]:
    """Each clip scored by a head fitted without its sentence's fold."""
    from audio.prosody import fit_head

    scores = np.zeros(labels.size)
    for fold in range(folds):
        test = groups % folds == fold
        if test.any():
            scores[test] = fit_head(features[~test], labels[~test], l2=l2).probability(features[test])
    return {
        "folds": folds,
        "auc": round(roc_auc(scores, labels), 4),
        "over_below_half": int(((scores < 0.5) & (labels == 1)).sum()),
        "over": int((labels == 1).sum()),
        "goes_on_above_half": int(((scores >= 0.5) & (labels == 0)).sum()),
        "goes_on": int((labels == 0).sum()),
    }


def run(args: argparse.Namespace, config: Config) -> int:
    import functools

    from audio.prosody import WindowEncoder, fit_head
    from voice_agent.bench.turns import TRAIN_SENTENCES, build_training_clips
    from voice_agent.commands._audio_setup import load_transcriber
    from voice_agent.errors import UserError
    from voice_agent.models import EMBEDDED_ASR, resolve_asr_model, resolve_tts_voice

    if args.folds == 1 or args.folds < 0 or args.folds > len(TRAIN_SENTENCES):
        raise UserError(f"--folds must be 0 (no check) or 2..{len(TRAIN_SENTENCES)}, got {args.folds}")
    if args.l2 <= 0:
        raise UserError("--l2 must be positive")

    def progress(done: int, total: int) -> None:
        if not args.no_progress and (done == total or done % 20 == 0):
            print(f"  clips: {done}/{total} recordings", file=sys.stderr, flush=True)

    cache_dir = Path(args.cache_dir).expanduser()
    print(f"building the training clips (piper + espeak-ng, cut with whisper word times) in {cache_dir} ...",
          file=sys.stderr, flush=True)
    transcriber = functools.cache(lambda: load_transcriber(config))
    clips = build_training_clips(cache_dir, resolve_tts_voice(config.tts.voice), transcriber, args.voices_per_sentence,
                                 progress)
    encoder = WindowEncoder(resolve_asr_model(EMBEDDED_ASR))
    rows, labels, groups = [], [], []
    for n, clip in enumerate(clips, 1):
        copies = [clip.audio]
        if args.phone:
            copies.append(phone_line(clip.audio))
        if args.noise:
            copies.append(noise_floor(clip.audio, seed=n))
        for audio in copies:
            rows.append(encoder.features(audio))
            labels.append(clip.label)
            groups.append(clip.sentence)
        if not args.no_progress and (n == len(clips) or n % 200 == 0):
            print(f"  encoder: {n}/{len(clips)} clips", file=sys.stderr, flush=True)
    features, labels, groups = np.stack(rows), np.array(labels), np.array(groups)
    check = held_out(features, labels, groups, args.folds, args.l2) if args.folds else None
    meta = {
        "trained": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["voice-agent", *sys.argv[1:]]) if sys.argv else None,
        "encoder": "whisper tiny.en (embedded)",
        "features": int(features.shape[1]),
        "clips": int(labels.size),
        "over": int(labels.sum()),
        "sentences": len(TRAIN_SENTENCES),
        "voices_per_sentence": args.voices_per_sentence,
        "phone_line_copies": args.phone,
        "noise_floor_copies": args.noise,
        "l2": args.l2,
        "held_out": check,
    }
    head = fit_head(features, labels, l2=args.l2, meta=meta)
    head.save(args.out)
    print(f"{labels.size} clips ({int(labels.sum())} of a whole sentence, {int((labels == 0).sum())} cut at a word "
          f"boundary) from {len(TRAIN_SENTENCES)} sentences x {args.voices_per_sentence} voices"
          f"{', each clip also over a phone line (counted)' if args.phone else ''}"
          f"{', each clip also over a noise floor (counted)' if args.noise else ''}")
    if check:
        print(f"held out by sentence ({check['folds']} folds): AUC {check['auc']:.3f}; whole-sentence clips below 0.5: "
              f"{check['over_below_half']}/{check['over']}; cut ones at or above 0.5: "
              f"{check['goes_on_above_half']}/{check['goes_on']}")
    train_p = head.probability(features)
    print(f"fitted on all: AUC {roc_auc(train_p, labels):.3f} on its own clips")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
