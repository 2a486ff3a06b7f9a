"""`voice-agent serve`: the server with the web demo, `/v1/realtime`, `/twilio` and the chat API."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal

from voice_agent.config import Config

HELP = ("run the voice agent server: web demo at /, OpenAI Realtime at /v1/realtime, Twilio at /twilio, "
        "chat completions at /v1/chat/completions")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="interface to listen on (default: server.host)")
    parser.add_argument("--port", type=int, help="port to listen on (default: server.port; 0 picks a free one)")


def run(args: argparse.Namespace, config: Config) -> int:
    from voice_agent.services import ModelServices
    from voice_agent.store import CallStore

    if args.host:
        config.server.host = args.host
    if args.port is not None:
        config.server.port = args.port
    # The API key of a remote LLM comes from the environment variable named in the config.
    api_key = config.secrets.llm_api_key if config.llm.backend == "openai" else ""
    services = ModelServices.load(config, api_key=api_key)
    # The models' objects live as long as the process: out of the collector's sight, its full
    # passes stay cheap (milliseconds, not 0.2 s) and come often enough that a cycle an ended call
    # left behind is not kept for minutes.
    gc.freeze()
    store = CallStore(config.store.path) if config.store.path else None
    try:
        asyncio.run(_serve(config, services, store))
    finally:
        if store is not None:
            store.close()
    return 0


async def _serve(config: Config, services, store) -> None:
    from voice_agent.server import VoiceServer

    model_names = {"asr": config.asr.model, "llm": services.llm.name, "tts": config.tts.voice}
    server = VoiceServer(config, services, store=store, model_name=services.llm.name, model_names=model_names)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    host = config.server.host
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    url = f"http://{shown}:{server.port}/"
    print(f"voice-agent: demo at {url}", flush=True)
    print(f"  OpenAI Realtime: ws://{shown}:{server.port}/v1/realtime  (openai SDK: base_url={url}v1)", flush=True)
    print(f"  Twilio Media Streams: ws://{shown}:{server.port}/twilio", flush=True)
    if config.api.enabled and config.llm.backend == "local":
        print(f"  OpenAI chat completions: {url}v1/chat/completions  (docs/api.md)", flush=True)
    if config.server.token:
        print("  an access token is required (Authorization: Bearer, or ?token= for browsers)", flush=True)
    if store is not None:
        print(f"  calls are stored in {store.path}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.shutdown()
        await services.aclose()
