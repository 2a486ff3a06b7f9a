"""End to end on a real server with the real embedded models: espeak-ng speech in, speech out.

Slow (loads whisper tiny.en, piper and the LLM once for the module); skipped where espeak-ng or
an embedded model is missing. Audio is streamed in real time, as a caller would.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import shutil
import subprocess
import time
import wave

import numpy as np
import pytest

from audio.codecs import float32_to_pcm16, mulaw_decode, mulaw_encode, pcm16_to_float32
from audio.resample import resample
from voice_agent.config import load_config
from voice_agent.errors import UserError
from voice_agent.server import VoiceServer

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
RELEVANT = {"paris", "france", "french", "capital", "city"}


def espeak(text: str, tmp_path) -> np.ndarray:
    """float32 mono at 16 kHz."""
    path = tmp_path / "utterance.wav"
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), text], check=True, capture_output=True)
    with wave.open(str(path)) as w:
        rate = w.getframerate()
        x = pcm16_to_float32(w.readframes(w.getnframes()))
    return resample(x, rate, 16000)


@pytest.fixture(scope="module")
def services():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from voice_agent.services import ModelServices

    config = load_config()
    try:
        loaded = ModelServices.load(config)
    except UserError as e:
        pytest.skip(f"embedded models missing: {e}")
    yield loaded
    asyncio.run(loaded.aclose())


def make_config():
    config = load_config(overrides=["server.port=0", "store.path=''"])
    config.llm.max_new_tokens = 40  # short replies keep the test quick on a shared CPU
    return config


def relevant(text: str) -> bool:
    words = {w.strip(".,!?").lower() for w in text.split()}
    return bool(words & RELEVANT)


async def transcribe(services, audio: np.ndarray, rate: int) -> str:
    return await services.transcribe(resample(audio, rate, 16000))


async def stream_realtime(conn, audio_24k: np.ndarray, chunk_ms: int = 40) -> None:
    """Append audio paced in real time."""
    n = 24 * chunk_ms
    start = time.monotonic()
    for i, offset in enumerate(range(0, len(audio_24k), n)):
        await conn.input_audio_buffer.append(audio=base64.b64encode(float32_to_pcm16(audio_24k[offset : offset + n])).decode())
        await asyncio.sleep(max(0.0, start + (i + 1) * chunk_ms / 1000 - time.monotonic()))


async def spoken_turn(conn, utterance_16k: np.ndarray, timeout_s: float = 90) -> dict:
    """One spoken turn on a Realtime connection (openai SDK), audio paced in real time, up to the
    turn's `voice_agent.metrics`: what the server heard, the reply's text and audio, its metrics,
    and every error's message."""
    await conn.session.update(session={"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}})
    audio = resample(np.concatenate([utterance_16k, np.zeros(16000 * 2, np.float32)]), 16000, 24000)
    sender = asyncio.create_task(stream_realtime(conn, audio))
    turn = {"user_text": "", "transcript": "", "reply": [], "metrics": None, "errors": []}
    async with asyncio.timeout(timeout_s):
        async for event in conn:
            if event.type == "conversation.item.input_audio_transcription.completed":
                turn["user_text"] = event.transcript
            elif event.type == "response.output_audio.delta":
                turn["reply"].append(base64.b64decode(event.delta))
            elif event.type == "response.output_audio_transcript.delta":
                turn["transcript"] += event.delta
            elif event.type == "error":
                turn["errors"].append(event.error.message)
            elif event.type == "voice_agent.metrics":
                turn["metrics"] = event.metrics
                break
    await sender
    turn["reply"] = pcm16_to_float32(b"".join(turn["reply"]))
    return turn


def test_realtime_route_with_the_openai_sdk(services, tmp_path):
    from openai import AsyncOpenAI

    utterance = espeak(QUESTION, tmp_path)

    async def main():
        config = make_config()
        server = VoiceServer(config, services)
        await server.start()
        client = AsyncOpenAI(api_key="unused", base_url=f"http://127.0.0.1:{server.port}/v1")
        async with client.realtime.connect(model="voice-agent") as conn:
            turn = await spoken_turn(conn, utterance)
        await server.shutdown()
        return turn

    turn = asyncio.run(main())
    user_text, transcript, reply, metrics = turn["user_text"], turn["transcript"], turn["reply"], turn["metrics"]
    assert "capital" in user_text.lower()
    assert len(reply) > 24000 // 2, "less than half a second of reply audio"
    heard = asyncio.run(transcribe(services, reply, 24000))
    print(f"\nuser: {user_text!r}\nreply text: {transcript!r}\nreply heard by ASR: {heard!r}\nmetrics: {metrics}")
    assert heard.strip()
    assert relevant(heard) or relevant(transcript)
    assert metrics["voice_to_voice_ms"] is not None


def twilio_messages(audio_8k: np.ndarray) -> list[str]:
    data = mulaw_encode(audio_8k)
    return [
        json.dumps({"event": "media", "streamSid": "MZe2e", "media": {"track": "inbound", "payload": base64.b64encode(data[i : i + 160]).decode()}})
        for i in range(0, len(data), 160)
    ]


async def send_paced(ws, messages: list[str], frame_s: float = 0.02, started: list | None = None) -> None:
    start = time.monotonic()
    if started is not None:
        started.append(start)
    for i, m in enumerate(messages):
        await ws.send(m)
        await asyncio.sleep(max(0.0, start + (i + 1) * frame_s - time.monotonic()))


def test_twilio_route_and_barge_in(services, tmp_path):
    from websockets.asyncio.client import connect

    question_8k = resample(espeak(QUESTION, tmp_path), 16000, 8000)
    second_8k = resample(espeak("Tell me about the city of Paris.", tmp_path), 16000, 8000)
    interruption_8k = resample(espeak("Stop, wait a moment please.", tmp_path), 16000, 8000)
    silence = np.zeros(8000 * 3, np.float32)

    async def main():
        config = make_config()
        server = VoiceServer(config, services)
        await server.start()
        reply_frames: list[bytes] = []
        async with connect(f"ws://127.0.0.1:{server.port}/twilio") as ws:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            start = {"streamSid": "MZe2e", "callSid": "CAe2e", "customParameters": {}, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
            await ws.send(json.dumps({"event": "start", "streamSid": "MZe2e", "start": start}))
            # Turn 1: the whole reply, echoing every mark as Twilio does once the audio has played.
            sender = asyncio.create_task(send_paced(ws, twilio_messages(np.concatenate([question_8k, silence]))))
            async with asyncio.timeout(90):
                while True:
                    try:
                        msg = json.loads(await asyncio.wait_for(ws.recv(), 2.0 if reply_frames else None))
                    except TimeoutError:
                        break  # no more reply audio
                    if msg["event"] == "media":
                        reply_frames.append(base64.b64decode(msg["media"]["payload"]))
                    elif msg["event"] == "mark":
                        await ws.send(json.dumps({"event": "mark", "streamSid": "MZe2e", "mark": msg["mark"]}))
            await sender
            # Turn 2: ask again, and talk over the reply as soon as it starts playing.
            sender = asyncio.create_task(send_paced(ws, twilio_messages(np.concatenate([second_8k, silence]))))
            async with asyncio.timeout(90):
                while json.loads(await ws.recv())["event"] != "media":
                    pass
            sender.cancel()
            barge: list[float] = []
            talker = asyncio.create_task(send_paced(ws, twilio_messages(np.concatenate([interruption_8k, silence])), started=barge))
            last_media = got_clear = None
            async with asyncio.timeout(30):
                while got_clear is None:
                    msg = json.loads(await ws.recv())
                    if msg["event"] == "media":
                        last_media = time.monotonic()
                    elif msg["event"] == "clear":
                        got_clear = time.monotonic()
            talker.cancel()
            await ws.send(json.dumps({"event": "stop", "streamSid": "MZe2e"}))
        await server.shutdown()
        return b"".join(reply_frames), barge[0], last_media, got_clear

    reply, barge_t, last_media, clear_t = asyncio.run(main())
    heard = asyncio.run(transcribe(services, mulaw_decode(reply), 8000))
    print(f"\nreply heard by ASR: {heard!r}")
    print(f"clear {1000 * (clear_t - barge_t):.0f} ms after the caller started talking; "
          f"last reply media {1000 * ((last_media or barge_t) - barge_t):.0f} ms after")
    assert heard.strip()
    assert relevant(heard)
    # espeak's audio starts with a few ms of silence: the speech itself starts a little later.
    assert clear_t - barge_t < 0.3 + 0.05, "clear came too late"
    assert last_media is None or last_media - barge_t < 0.3 + 0.05


def test_twilio_speakerphone_echo_does_not_interrupt_the_reply(services, tmp_path):
    """The phone plays the reply and its microphone hears it again, 100 ms later at -10 dB, and
    nothing else: the agent must not take its own voice for the caller's."""
    from websockets.asyncio.client import connect

    question_8k = resample(espeak(QUESTION, tmp_path), 16000, 8000)

    async def main():
        config = make_config()
        assert config.agent.echo_gate_ratio > 0, "the echo gate is on by default"
        server = VoiceServer(config, services)
        await server.start()
        playback: collections.deque = collections.deque()  # reply frames and marks, in order
        events: list[str] = []
        played = 0
        async with connect(f"ws://127.0.0.1:{server.port}/twilio") as ws:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            start = {"streamSid": "MZe2e", "callSid": "CAecho", "customParameters": {}, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
            await ws.send(json.dumps({"event": "start", "streamSid": "MZe2e", "start": start}))

            async def receive():
                while True:
                    msg = json.loads(await ws.recv())
                    events.append(msg["event"])
                    if msg["event"] == "media":
                        playback.append(mulaw_decode(base64.b64decode(msg["media"]["payload"])))
                    elif msg["event"] == "mark":
                        playback.append(msg["mark"]["name"])
                    elif msg["event"] == "clear":
                        playback.clear()

            async def phone():
                nonlocal played
                await send_paced(ws, twilio_messages(question_8k))
                delay = collections.deque([np.zeros(160, np.float32)] * 5)  # 100 ms
                started = time.monotonic()
                for i in range(int(20 / 0.02)):
                    while playback and isinstance(playback[0], str):  # played up to a mark: say so
                        await ws.send(json.dumps({"event": "mark", "streamSid": "MZe2e", "mark": {"name": playback.popleft()}}))
                    frame = playback.popleft() if playback else np.zeros(160, np.float32)
                    played += bool(np.any(frame))
                    delay.append(frame)
                    await ws.send(twilio_messages(0.3 * delay.popleft())[0])
                    await asyncio.sleep(max(0.0, started + (i + 1) * 0.02 - time.monotonic()))

            receiver = asyncio.create_task(receive())
            await asyncio.wait_for(phone(), 60)
            receiver.cancel()
            await ws.send(json.dumps({"event": "stop", "streamSid": "MZe2e"}))
        await server.shutdown()
        return events, played

    events, played = asyncio.run(main())
    print(f"\nreply frames played: {played}, events: {dict(collections.Counter(events))}")
    assert played * 0.02 > 1.0, "less than a second of reply was played"
    assert "clear" not in events, "the agent's own echo was taken for a barge-in"
