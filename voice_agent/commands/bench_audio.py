"""`voice-agent bench audio`: speed of the audio stack on this machine, on speech it generates.

Measures (each the median over `--repeats` runs):
- ASR real-time factor: seconds of compute per second of audio, whole utterance.
- Endpoint to final: the compute after the VAD endpoint until the final transcript, with partial
  transcripts running during the utterance as in a call; plus the audio-time part
  (`end_silence_ms`) that the endpointer waits before it declares the end.
- TTS time to first audio (from the call to the first sentence's samples) and real-time factor,
  at the agent's output rate.
- With `--wer`: word error rate and median decode time of each ASR `audio_context` ("full":
  whisper's 30 s window; "utterance": the utterance plus a margin) over the spoken prompts of
  `bench e2e` and the complete sentences of `bench turns` (both synthesized and cached as there).
- With `--vad`: both VAD backends at every aggressiveness on generated scenes (piper and
  espeak-ng speech, silences, a cough-like burst, white noise at several SNRs): turns found,
  false turns, clipped starts and ends, detection delays, CPU cost. docs/audio.md records a run.
Speech comes from the configured piper voice (and espeak-ng when installed): no files needed.
This module is dispatched by `voice-agent bench audio`; it exposes `add_arguments` and `run`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from typing import Any

import numpy as np

from voice_agent.config import Config

HELP = "benchmark ASR, endpointing and TTS speed (and, with --vad, compare VAD backends)"

_SAMPLE_RATE_HZ = 16000
_ASR_TEXT = (
    "The weather today is sunny with a light breeze from the west. "
    "Please remind me to call my sister at six thirty this evening, and book a table for four."
)
_TTS_TEXT = (
    "Sure, I can help with that. Your table for four is booked at seven thirty tonight. "
    "Would you like me to send a reminder an hour before?"
)
_VAD_SENTENCES = (
    "Hello, I would like to check the status of my order.",
    "It was supposed to arrive yesterday afternoon.",
    "Sure, the number is four five seven two.",
    "Thanks, that is all for now.",
)
_NOISE_SNRS_DB = (None, 20.0, 5.0)  # None: clean


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--repeats", type=int, default=3, metavar="N", help="runs per measurement (default 3)"
    )
    parser.add_argument(
        "--vad", action="store_true", help="also compare the VAD backends on generated scenes"
    )
    parser.add_argument(
        "--wer", action="store_true", help="also measure ASR word error rate and decode time per audio_context"
    )


def _median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 1)


# --- ASR and endpointing ------------------------------------------------------------------------


def _bench_asr(
    transcriber, endpointer_factory, speech: np.ndarray, config: Config, repeats: int
) -> dict[str, Any]:
    from audio.asr import StreamingTranscriber
    from audio.vad import SpeechEnded

    duration_s = speech.size / _SAMPLE_RATE_HZ
    transcriber.transcribe(speech[:_SAMPLE_RATE_HZ])  # warm-up: first-call allocations
    times, text = [], ""
    for _ in range(repeats):
        started = time.perf_counter()
        text = transcriber.transcribe(speech)
        times.append(time.perf_counter() - started)

    silence = np.zeros(_SAMPLE_RATE_HZ // 2, dtype=np.float32)
    stream = np.concatenate([silence, speech, silence, silence, silence])
    chunk = _SAMPLE_RATE_HZ * 20 // 1000
    final_s, decode_s, partial_s, partials, wait_s = [], [], [], [], []
    reused = 0
    for _ in range(repeats):
        endpointer = endpointer_factory()
        streaming = StreamingTranscriber(transcriber, config.asr.partial_interval_ms)
        n_partials = 0
        for i in range(0, stream.size, chunk):
            for event in endpointer.feed(stream[i : i + chunk]):
                if isinstance(event, SpeechEnded):
                    before = streaming.reused_finals
                    started = time.perf_counter()
                    streaming.final(event.audio)
                    final_s.append(time.perf_counter() - started)
                    reused += streaming.reused_finals - before
                    wait_s.append(event.t_s - event.speech_end_s)
                    started = time.perf_counter()  # what the final costs when it cannot reuse a partial
                    transcriber.transcribe(event.audio)
                    decode_s.append(time.perf_counter() - started)
            if endpointer.in_speech:
                started = time.perf_counter()
                if streaming.partial(endpointer.utterance_audio()) is not None:
                    partial_s.append(time.perf_counter() - started)
                    n_partials += 1
        partials.append(n_partials)
    return {
        "model": config.asr.model,
        "load_s": round(transcriber.load_s, 2),
        "audio_s": round(duration_s, 2),
        "rtf": round(statistics.median(times) / duration_s, 3),
        "transcript": text,
        "partial_interval_ms": config.asr.partial_interval_ms,
        "partials_per_utterance": statistics.median(partials) if partials else 0,
        "partial_decode_ms": _median_ms(partial_s) if partial_s else None,
        "endpoint_to_final_ms": _median_ms(final_s) if final_s else None,
        "finals_reusing_a_partial": f"{reused}/{len(final_s)}",
        "final_decode_ms": _median_ms(decode_s) if decode_s else None,
        "endpoint_wait_ms": _median_ms(wait_s) if wait_s else None,
    }


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word-level edit distance, reference words), case and punctuation aside."""
    import re

    ref, hyp = (re.sub(r"[^a-z0-9' ]", " ", t.lower()).split() for t in (reference, hypothesis))
    row = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        diagonal, row[0] = row[0], i
        for j in range(1, len(hyp) + 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ref[i - 1] != hyp[j - 1]))
    return row[len(hyp)], len(ref)


def _bench_wer(config: Config) -> dict[str, Any]:
    from dataclasses import replace
    from pathlib import Path

    from voice_agent.bench.prompts import PROMPTS, load_prompts
    from voice_agent.bench.turns import build_turn_set
    from voice_agent.commands._audio_setup import load_transcriber
    from voice_agent.models import resolve_tts_voice

    voice = resolve_tts_voice(config.tts.voice)
    spoken = [(p.prompt.text, p.audio) for p in load_prompts(len(PROMPTS), Path("~/.cache/voice-agent/bench-e2e").expanduser(), voice)]
    items = build_turn_set(Path("~/.cache/voice-agent/bench-turns").expanduser(), voice, lambda: load_transcriber(config))
    spoken += [(i.text, i.audio[: int((i.speech_end_s + 0.3) * _SAMPLE_RATE_HZ)]) for i in items if i.kind == "complete"]
    out: dict[str, Any] = {"utterances": len(spoken)}
    for context in ("full", "utterance"):
        transcriber = load_transcriber(replace(config, asr=replace(config.asr, audio_context=context)))
        transcriber.transcribe(spoken[0][1])  # warm-up
        errors = words = 0
        times = []
        for text, audio in spoken:
            started = time.perf_counter()
            hypothesis = transcriber.transcribe(audio)
            times.append(time.perf_counter() - started)
            e, n = word_errors(text, hypothesis)
            errors, words = errors + e, words + n
        out[context] = {"wer": round(errors / words, 3), "decode_ms_p50": _median_ms(times)}
    return out


# --- TTS ----------------------------------------------------------------------------------------


def _bench_tts(synthesizer, rate_hz: int, repeats: int) -> dict[str, Any]:
    synthesizer.synthesize("Warm up.")
    first, rtf = [], []
    n_sentences = 0
    for _ in range(repeats):
        started = time.perf_counter()
        audio_s, first_s = 0.0, None
        n_sentences = 0
        for chunk in synthesizer.stream(_TTS_TEXT, sample_rate_hz=rate_hz):
            if first_s is None:
                first_s = time.perf_counter() - started
            audio_s += chunk.duration_s
            n_sentences += 1
        total_s = time.perf_counter() - started
        first.append(first_s or 0.0)
        rtf.append(total_s / audio_s)
    return {
        "voice": synthesizer.voice_path.name,
        "load_s": round(synthesizer.load_s, 2),
        "output_rate_hz": rate_hz,
        "sentences": n_sentences,
        "time_to_first_audio_ms": _median_ms(first),
        "rtf": round(statistics.median(rtf), 3),
    }


# --- VAD comparison -----------------------------------------------------------------------------


def _espeak(text: str) -> np.ndarray | None:
    """espeak-ng speech for the VAD comparison, or None where espeak-ng is not installed."""
    from voice_agent.bench.prompts import espeak

    if shutil.which("espeak-ng") is None:
        return None
    return espeak(text, sample_rate_hz=_SAMPLE_RATE_HZ)


def _speech_bounds(clip: np.ndarray) -> tuple[int, int]:
    """First and last sample above 2 % of the clip's peak: the truth for 'not clipped'."""
    loud = np.flatnonzero(np.abs(clip) > 0.02 * np.max(np.abs(clip)))
    return int(loud[0]), int(loud[-1]) + 1


def build_scene(
    clips: list[np.ndarray], snr_db: float | None, seed: int = 0
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Clips separated by 1-1.5 s silences with a 120 ms cough-like burst in one gap, plus noise.

    Returns the scene and the truth: (start_s, end_s) of the speech in each clip.
    """
    rng = np.random.default_rng(seed)
    sr = _SAMPLE_RATE_HZ
    parts: list[np.ndarray] = [np.zeros(sr, dtype=np.float32)]
    truth = []
    pos = sr
    clips = [0.5 * c / np.max(np.abs(c)) for c in clips]
    for k, clip in enumerate(clips):
        start, end = _speech_bounds(clip)
        truth.append(((pos + start) / sr, (pos + end) / sr))
        parts.append(clip.astype(np.float32))
        pos += clip.size
        gap = np.zeros(int(sr * rng.uniform(1.0, 1.5)), dtype=np.float32)
        if k == 0:  # a cough: a short broadband burst, far from both neighbours
            burst = rng.standard_normal(int(0.12 * sr)) * np.hanning(int(0.12 * sr)) * 0.3
            mid = gap.size // 2
            gap[mid : mid + burst.size] = burst
        parts.append(gap)
        pos += gap.size
    scene = np.concatenate(parts).astype(np.float32)
    if snr_db is not None:
        speech_rms = float(np.sqrt(np.mean(np.concatenate(clips) ** 2)))
        noise = rng.standard_normal(scene.size) * speech_rms / 10 ** (snr_db / 20)
        scene = np.clip(scene + noise, -1, 1).astype(np.float32)
    return scene, truth


def score_vad(endpointer, scene: np.ndarray, truth: list[tuple[float, float]]) -> dict[str, Any]:
    """Feed the scene in 20 ms chunks; compare the turns with the truth."""
    from audio.vad import SpeechEnded, SpeechStarted

    chunk = _SAMPLE_RATE_HZ * 20 // 1000
    turns, started_at = [], []
    cpu_started = time.process_time()
    stream = np.concatenate([scene, np.zeros(_SAMPLE_RATE_HZ * 2, dtype=np.float32)])
    for i in range(0, stream.size, chunk):
        for event in endpointer.feed(stream[i : i + chunk]):
            if isinstance(event, SpeechStarted):
                started_at.append(endpointer.time_s)
            elif isinstance(event, SpeechEnded):
                audio_end_s = event.audio_start_s + event.audio.size / _SAMPLE_RATE_HZ
                turns.append(
                    (event.audio_start_s, audio_end_s, event.t_s, started_at[-1] if started_at else event.t_s)
                )
    cpu_s = time.process_time() - cpu_started
    matched = false_turns = merged = clipped_start = clipped_end = 0
    start_delays, end_delays = [], []
    hits = [0] * len(truth)
    for start_s, end_s, endpoint_s, detected_s in turns:
        overlapping = [k for k, (a, b) in enumerate(truth) if start_s < b and end_s > a]
        if not overlapping:
            false_turns += 1
            continue
        for k in overlapping:
            hits[k] += 1
        merged += len(overlapping) > 1
        if len(overlapping) == 1:
            a, b = truth[overlapping[0]]
            matched += 1
            clipped_start += start_s > a
            clipped_end += end_s < b
            start_delays.append(detected_s - a)
            end_delays.append(endpoint_s - b)
    return {
        "turns_expected": len(truth),
        "turns_found": len(turns),
        "matched": matched,
        "missed": sum(h == 0 for h in hits),
        "split": sum(h > 1 for h in hits),
        "merged": merged,
        "false_turns": false_turns,
        "clipped_starts": clipped_start,
        "clipped_ends": clipped_end,
        "start_detect_ms": round(1000 * statistics.mean(start_delays)) if start_delays else None,
        "end_detect_ms": round(1000 * statistics.mean(end_delays)) if end_delays else None,
        "cpu_ms_per_audio_s": round(1000 * cpu_s / (stream.size / _SAMPLE_RATE_HZ), 2),
    }


def _bench_vad(synthesizer, config: Config) -> list[dict[str, Any]]:
    from audio.errors import AudioModelNotFoundError
    from audio.vad import BACKENDS
    from voice_agent.commands._audio_setup import make_endpointer

    voices = {"piper": [synthesizer.synthesize(s, sample_rate_hz=_SAMPLE_RATE_HZ) for s in _VAD_SENTENCES]}
    espeak = [_espeak(s) for s in _VAD_SENTENCES]
    if all(c is not None for c in espeak):
        voices["espeak-ng"] = espeak
    rows = []
    for voice, clips in voices.items():
        for snr_db in _NOISE_SNRS_DB:
            scene, truth = build_scene(clips, snr_db)
            for backend in BACKENDS:
                for aggressiveness in range(4):
                    cfg = config.vad
                    saved = cfg.aggressiveness
                    cfg.aggressiveness = aggressiveness
                    try:
                        endpointer = make_endpointer(config, _SAMPLE_RATE_HZ, backend=backend)
                    except AudioModelNotFoundError as e:
                        rows.append({"backend": backend, "error": str(e)})
                        break
                    finally:
                        cfg.aggressiveness = saved
                    row = {
                        "voice": voice,
                        "snr_db": snr_db,
                        "backend": backend,
                        "aggressiveness": aggressiveness,
                    }
                    row.update(score_vad(endpointer, scene, truth))
                    rows.append(row)
    return rows


# --- output -------------------------------------------------------------------------------------


def _print_table(result: dict[str, Any]) -> None:
    asr, tts = result["asr"], result["tts"]
    print(f"machine: {result['machine']['cpu_count']} CPU cores")
    print(f"{'measurement':<42} {'value':>10}")
    lines = [
        (f"ASR model load ({asr['model']})", f"{asr['load_s']} s"),
        (f"ASR real-time factor ({asr['audio_s']} s utterance)", f"{asr['rtf']}"),
        (
            f"ASR partial decode (every {asr['partial_interval_ms']} ms audio)",
            f"{asr['partial_decode_ms']} ms",
        ),
        ("ASR partials per utterance", f"{asr['partials_per_utterance']}"),
        ("endpoint wait (end_silence, audio time)", f"{asr['endpoint_wait_ms']} ms"),
        ("endpoint -> final transcript (compute)", f"{asr['endpoint_to_final_ms']} ms"),
        ("  finals that reused the last partial", asr["finals_reusing_a_partial"]),
        ("  final decode when not reusable", f"{asr['final_decode_ms']} ms"),
        (f"TTS voice load ({tts['voice']})", f"{tts['load_s']} s"),
        (f"TTS time to first audio ({tts['sentences']} sentences)", f"{tts['time_to_first_audio_ms']} ms"),
        (f"TTS real-time factor (at {tts['output_rate_hz']} Hz)", f"{tts['rtf']}"),
    ]
    for name, value in lines:
        print(f"{name:<42} {value:>10}")
    print(f"transcript: {asr['transcript']}")
    if "wer" in result:
        wer = result["wer"]
        print(f"\nASR on {wer['utterances']} spoken prompts, per audio_context:")
        for context in ("full", "utterance"):
            print(f"  {context:<10} word error rate {wer[context]['wer']:.3f}, decode p50 {wer[context]['decode_ms_p50']} ms")
    if "vad" in result:
        print()
        header = f"{'voice':<10} {'snr':>5} {'backend':<7} {'agr':>3} {'found':>5} {'match':>5} {'false':>5} {'clipS':>5} {'clipE':>5} {'startms':>7} {'endms':>6} {'cpu ms/s':>8}"
        print(header)
        for r in result["vad"]:
            if "error" in r:
                print(f"{r['backend']}: {r['error']}")
                continue
            snr = "clean" if r["snr_db"] is None else f"{r['snr_db']:.0f}dB"
            print(
                f"{r['voice']:<10} {snr:>5} {r['backend']:<7} {r['aggressiveness']:>3} "
                f"{r['turns_found']:>2}/{r['turns_expected']:<2} {r['matched']:>5} {r['false_turns']:>5} "
                f"{r['clipped_starts']:>5} {r['clipped_ends']:>5} {r['start_detect_ms']!s:>7} "
                f"{r['end_detect_ms']!s:>6} {r['cpu_ms_per_audio_s']:>8}"
            )


def run(args: argparse.Namespace, config: Config) -> int:
    from voice_agent.commands._audio_setup import load_synthesizer, load_transcriber, make_endpointer
    from voice_agent.errors import UserError

    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: expected at least 1")
    synthesizer = load_synthesizer(config)
    transcriber = load_transcriber(config)
    speech = synthesizer.synthesize(_ASR_TEXT, sample_rate_hz=_SAMPLE_RATE_HZ)
    result: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count()},
        "asr": _bench_asr(
            transcriber, lambda: make_endpointer(config, _SAMPLE_RATE_HZ), speech, config, args.repeats
        ),
        "tts": _bench_tts(synthesizer, config.agent.sample_rate_hz, args.repeats),
    }
    if args.vad:
        result["vad"] = _bench_vad(synthesizer, config)
    if args.wer:
        result["wer"] = _bench_wer(config)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0
