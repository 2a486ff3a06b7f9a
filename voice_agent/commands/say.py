"""`voice-agent say "text" -o out.wav`: synthesize text with the configured piper voice.

Without `-o` the speech is played on the default output device (needs the `sounddevice` package
and a sound card). `--rate` resamples the output; "-" as the text reads it from standard input.
"""

from __future__ import annotations

import argparse
import sys
import time

from voice_agent.config import Config
from voice_agent.errors import UserError

HELP = "speak text with the configured TTS voice (piper), to a WAV file or the speakers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help='the text to speak ("-" reads standard input)')
    parser.add_argument("-o", "--output", metavar="OUT.wav", help="write a 16-bit WAV instead of playing")
    parser.add_argument(
        "--rate", type=int, metavar="HZ", help="output sample rate (default: the voice's own)"
    )


def run(args: argparse.Namespace, config: Config) -> int:
    import numpy as np

    from audio.io import write_wav
    from voice_agent.commands._audio_setup import load_synthesizer

    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise UserError("nothing to say: the text is empty")
    if args.rate is not None and not 1000 <= args.rate <= 384_000:
        raise UserError(f"--rate {args.rate}: expected a sample rate between 1000 and 384000 Hz")
    synthesizer = load_synthesizer(config)
    rate_hz = args.rate or synthesizer.sample_rate_hz
    if args.output:
        started = time.perf_counter()
        chunks = list(synthesizer.stream(text, sample_rate_hz=rate_hz))
        audio = np.concatenate([c.audio for c in chunks]) if chunks else np.zeros(0, dtype=np.float32)
        write_wav(args.output, audio, rate_hz)
        elapsed_s = time.perf_counter() - started
        print(
            f"{args.output}: {audio.size / rate_hz:.2f} s at {rate_hz} Hz, {len(chunks)} sentence(s), synthesized in {elapsed_s:.2f} s"
        )
        return 0
    try:
        import sounddevice
    except (ImportError, OSError) as e:
        raise UserError(
            f"cannot play audio ({e}); write a file with -o OUT.wav instead, or: pip install sounddevice"
        ) from None
    try:
        # Each sentence plays while the next one is synthesized.
        with sounddevice.OutputStream(samplerate=rate_hz, channels=1, dtype="float32") as stream:
            for chunk in synthesizer.stream(text, sample_rate_hz=rate_hz):
                stream.write(chunk.audio.reshape(-1, 1))
    except sounddevice.PortAudioError as e:
        raise UserError(f"cannot play audio: {e}; write a file with -o OUT.wav instead") from None
    return 0
