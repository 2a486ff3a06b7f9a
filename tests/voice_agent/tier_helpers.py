"""The LLM tier in tests: tiny random checkpoints (tests/dlm/tiny_checkpoints.py) behind the real
chat API on uvicorn, in a thread with its own event loop, so that the blocking openai SDK can be
the client. Every wait here is bounded."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "dlm"))

import tiny_checkpoints

from voice_agent.config import Config
from voice_agent.llm_tier import load_chat_service, serve_standalone

TOKEN = "s3cret-token-for-tests"
# A random Llama big enough to take ~15 ms a token on one thread: a request of a few hundred
# tokens is still running when a test pulls the plug on it.
SLOW_SIZES = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=2048)


def tiny_model(folder: Path, *, slow: bool = False) -> Path:
    """A tiny random Llama checkpoint with a byte-level tokenizer and a ChatML template."""
    path, _ = tiny_checkpoints.llama_ar(folder, **(SLOW_SIZES if slow else {}))
    return path


def tier_config(model: Path, **api) -> Config:
    config = Config()
    config.llm.model = str(model)
    config.llm.dtype = "float32"
    config.server.token = TOKEN
    config.store.path = ""
    for key, value in api.items():
        setattr(config.api, key, value)
    return config


class RunningTier:
    """`serve-llm` without --ray, in a background thread: `with RunningTier(config) as tier:`
    `tier.url` is its /v1, `tier.service` its ChatService."""

    def __init__(self, config: Config, *, port: int = 0, service=None) -> None:
        self.config = config
        self.port = port
        self.service = service or load_chat_service(config)
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="tier", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            await serve_standalone(self.config, self.service, host="127.0.0.1", port=self.port, stop=self._stop,
                                   on_ready=self._on_ready)

        try:
            self._loop.run_until_complete(main())
        except BaseException as e:  # shown by __enter__ instead of a silent hang
            self.error = e
            self._ready.set()

    def _on_ready(self, port: int) -> None:
        self.port = port
        self._ready.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> RunningTier:
        self._thread.start()
        assert self._ready.wait(30), "the tier did not start"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the tier did not stop"
