"""`voice-agent transcribe FILE.wav`: print the transcript of a WAV file (any common format).

With `--turns` the file is first cut into turns by the configured VAD endpointer, as a live call
would be, and each turn is printed with its start and end time.
"""

from __future__ import annotations

import argparse
import json

from voice_agent.config import Config

HELP = "transcribe a WAV file with the configured ASR model (faster-whisper)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", metavar="FILE.wav", help="a WAV file: any rate, channels, 8/16/24/32-bit or float"
    )
    parser.add_argument(
        "--turns", action="store_true", help="cut the file into turns with the VAD and print each"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace, config: Config) -> int:
    import numpy as np

    from audio.asr import ASR_SAMPLE_RATE_HZ
    from audio.io import read_wav
    from audio.vad import SpeechEnded
    from voice_agent.commands._audio_setup import load_transcriber, make_endpointer

    audio, _ = read_wav(args.file, sample_rate_hz=ASR_SAMPLE_RATE_HZ)
    transcriber = load_transcriber(config)
    if not args.turns:
        text = transcriber.transcribe(audio)
        print(json.dumps({"file": args.file, "text": text}) if args.json else text)
        return 0

    endpointer = make_endpointer(config, ASR_SAMPLE_RATE_HZ)
    chunk = ASR_SAMPLE_RATE_HZ // 50  # 20 ms, as a live stream would deliver it
    events = [e for i in range(0, audio.size, chunk) for e in endpointer.feed(audio[i : i + chunk])]
    # Close a turn still open at the end of the file with enough silence to reach the endpoint.
    events += endpointer.feed(
        np.zeros(ASR_SAMPLE_RATE_HZ * (config.vad.end_silence_ms + 100) // 1000, np.float32)
    )
    turns = []
    for event in events:
        if isinstance(event, SpeechEnded):
            start_s = event.audio_start_s
            end_s = min(start_s + event.audio.size / ASR_SAMPLE_RATE_HZ, audio.size / ASR_SAMPLE_RATE_HZ)
            turns.append(
                {
                    "start_s": round(start_s, 2),
                    "end_s": round(end_s, 2),
                    "text": transcriber.transcribe(event.audio),
                }
            )
    if args.json:
        print(json.dumps({"file": args.file, "turns": turns}, indent=2))
    else:
        for t in turns:
            print(f"[{t['start_s']:7.2f} - {t['end_s']:7.2f}] {t['text']}")
    return 0
