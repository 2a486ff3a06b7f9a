"""`voice-agent talk`: a conversation through the local microphone and speaker (sounddevice).

The session is the same as the server's; the "transport" is the sound card: microphone blocks
go into the session, reply chunks are played one after the other and acknowledged as played
(so a barge-in keeps only what was heard). Without a headset the speaker's sound reaches the
microphone; the echo gate (`agent.echo_gate_ratio`, on by default) learns how it comes back and
keeps it from interrupting the agent, but a loudspeaker next to the microphone can be louder than
its user (never tried here: no sound card): headphones remain the safe choice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import queue
import threading

import numpy as np

from voice_agent.config import Config
from voice_agent.errors import UserError

HELP = "talk to the agent through the local microphone and speaker (sounddevice; use headphones)"

log = logging.getLogger(__name__)

MIC_RATE_HZ = 16_000
BLOCK_MS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-device", help="sounddevice input device (name or index)")
    parser.add_argument("--output-device", help="sounddevice output device (name or index)")


def _open_sounddevice():
    try:
        import sounddevice as sd
    except (ImportError, OSError) as e:  # OSError: the PortAudio library itself is missing
        raise UserError(f"sounddevice is not usable ({e}); install PortAudio (apt install libportaudio2) and sounddevice") from None
    try:
        devices = sd.query_devices()
    except Exception as e:  # PortAudio raises its own error types
        raise UserError(f"cannot list audio devices: {e}") from None
    if not any(d["max_input_channels"] > 0 for d in devices):
        raise UserError("no audio input device (microphone) found; `voice-agent talk` needs one")
    if not any(d["max_output_channels"] > 0 for d in devices):
        raise UserError("no audio output device (speaker) found; `voice-agent talk` needs one")
    return sd


def run(args: argparse.Namespace, config: Config) -> int:
    sd = _open_sounddevice()
    from voice_agent.services import ModelServices

    services = ModelServices.load(config)
    print("voice-agent talk: speak after the beep... (Ctrl-C to stop)", flush=True)
    try:
        asyncio.run(_talk(sd, services, config, args))
    finally:
        asyncio.run(services.aclose())
    return 0


async def _talk(sd, services, config: Config, args) -> None:
    from voice_agent.events import AudioIn, Flush, ReplyAudio, ResponseDone, TranscriptFinal
    from voice_agent.session import Session

    loop = asyncio.get_running_loop()
    session = Session(services, config.agent)
    # Playback runs in its own thread; bounded, and a flush empties it (the reply is dropped).
    playback: queue.Queue[ReplyAudio | None] = queue.Queue(maxsize=32)
    flushed = threading.Event()

    def mic_callback(indata, frames, time_info, status) -> None:  # PortAudio's thread
        samples = np.array(indata[:, 0], dtype=np.float32)
        loop.call_soon_threadsafe(lambda: loop.create_task(session.handle(AudioIn(samples=samples, sample_rate_hz=MIC_RATE_HZ))))

    def player() -> None:
        while (chunk := playback.get()) is not None:
            if flushed.is_set():
                continue
            sd.play(chunk.samples, chunk.sample_rate_hz, device=args.output_device)
            while sd.get_stream().active:
                if flushed.wait(0.02):
                    sd.stop()
                    break
            else:
                loop.call_soon_threadsafe(session.playback_mark, chunk.turn_id, chunk.chunk_index)

    thread = threading.Thread(target=player, name="playback", daemon=True)
    thread.start()
    mic = sd.InputStream(
        samplerate=MIC_RATE_HZ,
        channels=1,
        dtype="float32",
        blocksize=MIC_RATE_HZ * BLOCK_MS // 1000,
        device=args.input_device,
        callback=mic_callback,
    )
    try:
        with mic:
            while (event := await session.outbox.get()) is not None:
                if isinstance(event, ReplyAudio):
                    flushed.clear()
                    session.audio_sent(event.turn_id)
                    await asyncio.to_thread(playback.put, event)
                elif isinstance(event, Flush):
                    flushed.set()
                elif isinstance(event, TranscriptFinal):
                    print(f"you:   {event.text}", flush=True)
                elif isinstance(event, ResponseDone):
                    print(f"agent: {event.heard}{'  (interrupted)' if event.status == 'cancelled' else ''}", flush=True)
    finally:
        await session.close()
        playback.put(None)
