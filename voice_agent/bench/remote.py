"""Any OpenAI-compatible server as the engine of `voice-agent bench llm --url URL`: our LLM tier,
or vLLM, SGLang, Mercury elsewhere, measured the same way as the in-process engines.

Contract: `RemoteChat(url, api_key=, model=)`; `model()` is the model requests name (the given
one, else the first of the server's `/models`); `measure(prompts, max_tokens)` sends every
prompt at once as a streamed, greedy chat completion with `stream_options.include_usage` and
returns (records, wall time of the level) with records shaped like `bench llm`'s own: time to the
first text, per-chunk times, wall time, completion tokens (the server's usage, else one per text
chunk), forward passes where the server reports them (voice-agent's `voice_agent.forwards`
extension; None elsewhere), the server's own time to the first text (`voice_agent.first_text_ms`;
None elsewhere), the finish reason, and an `error` line for a request that failed.
The API key is sent as a bearer token and never printed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx2

from voice_agent.llm import LlmError, parse_stream_line

__all__ = ["RemoteChat"]

TIMEOUT_S = 300.0


class RemoteChat:
    def __init__(self, url: str, *, api_key: str = "", model: str = "") -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._model = model

    def model(self) -> str:
        if self._model:
            return self._model
        try:
            response = httpx2.get(f"{self.url}/models", headers=self._headers, timeout=30)
            response.raise_for_status()
            self._model = response.json()["data"][0]["id"]
        except (httpx2.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"{self.url}/models: no model to name ({type(e).__name__}: {e}); pass --model") from None
        return self._model

    def measure(self, prompts: list[list[dict[str, str]]], max_tokens: int) -> tuple[list[dict[str, Any]], float]:
        return asyncio.run(self._measure(prompts, max_tokens))

    async def _measure(self, prompts: list[list[dict[str, str]]], max_tokens: int) -> tuple[list[dict[str, Any]], float]:
        limits = httpx2.Limits(max_connections=len(prompts) + 1, max_keepalive_connections=len(prompts) + 1)
        async with httpx2.AsyncClient(headers=self._headers, timeout=TIMEOUT_S, limits=limits) as client:
            t0 = time.perf_counter()
            records = await asyncio.gather(*(self._one(client, messages, max_tokens, t0) for messages in prompts))
            wall = time.perf_counter() - t0
        for rec in records:
            rec["tokens_per_forward"] = rec["tokens"] / rec["steps"] if rec["steps"] else None
            rec["tokens_per_s"] = rec["tokens"] / max(rec["wall_s"], 1e-9)
        return list(records), wall

    async def _one(self, client: Any, messages: list[dict[str, str]], max_tokens: int, t0: float) -> dict[str, Any]:
        body = {"model": self.model(), "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        rec: dict[str, Any] = {"first_output_s": None, "server_first_output_s": None, "token_times": [], "text": "",
                               "tokens": 0, "steps": None, "prefill_steps": 0, "finish": None, "error": None}
        chunks = 0
        try:
            async with client.stream("POST", f"{self.url}/chat/completions", json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread())[:200].decode("utf-8", "replace")
                    raise RuntimeError(f"HTTP {response.status_code}: {detail}")
                async for line in response.aiter_lines():
                    chunk = parse_stream_line(line)
                    if chunk is None or chunk.done:
                        continue
                    now = time.perf_counter() - t0
                    if chunk.text:
                        chunks += 1
                        rec["first_output_s"] = rec["first_output_s"] or now
                        rec["text"] += chunk.text
                        rec["token_times"].append([round(now, 6), chunks])
                    rec["finish"] = chunk.finish_reason or rec["finish"]
                    if chunk.stats is not None:
                        rec["steps"] = chunk.stat("forwards")
                        rec["prefill_steps"] = chunk.stat("prefill_forwards") or 0
                        rec["prefill_tokens"] = chunk.stat("prefill_tokens") or 0
                        server_ms = chunk.stats.get("first_text_ms")  # a float: not one of stat()'s integers
                        if isinstance(server_ms, int | float) and not isinstance(server_ms, bool):
                            rec["server_first_output_s"] = server_ms / 1000
                    if chunk.usage_tokens:
                        rec["tokens"] = chunk.usage_tokens
        except (httpx2.HTTPError, LlmError, RuntimeError, ValueError) as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["finish"] = "error"
        rec["tokens"] = rec["tokens"] or chunks
        rec["wall_s"] = time.perf_counter() - t0
        return rec

