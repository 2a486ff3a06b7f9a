"""llama.cpp as the reference engine of `voice-agent bench llm --reference llama.cpp`.

Contract: `llama_cpp_missing()` says in one line why llama.cpp cannot run here (None when
llama-cpp-python imports); `LlamaCppReference(gguf, threads, n_ctx)` loads the same GGUF file
our engine runs, and `measure(prompt_ids, max_new_tokens, eos_ids)` decodes each prompt (token
ids from our own chat template, so both engines see the same tokens), greedy, one request at a
time, and returns records shaped like `bench llm`'s own (first output, per-token times, ids, wall
time, tokens, forward passes); `close()` frees the model. llama-cpp-python keeps the K/V of the
longest common prefix of the previous prompt, as our engine's prefix reuse does, so a warm-up run
leaves the shared system prompt cached for both. llama-cpp-python is an optional extra (README
"llama.cpp reference": it builds from source, and a default `-march=native` build dies with
SIGILL on some VMs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

__all__ = ["LlamaCppReference", "llama_cpp_missing"]


def llama_cpp_missing() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return (f"llama-cpp-python is not installed ({e}); install the optional extra: see README "
                "'llama.cpp reference'")
    return None


class LlamaCppReference:
    def __init__(self, gguf: str | Path, *, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        if Path(gguf).suffix.lower() != ".gguf":
            raise ValueError(f"llama.cpp runs GGUF files; the model under test is {gguf}")
        self.path = Path(gguf)
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, seed=0, verbose=False)
        import llama_cpp

        self.version = getattr(llama_cpp, "__version__", "?")

    def close(self) -> None:
        """Frees the model and its context (their memory goes back to the system); idempotent."""
        self.llm.close()

    def measure(self, prompt_ids: list[list[int]], max_new_tokens: int,
                eos_ids: list[int]) -> tuple[list[dict[str, Any]], float]:
        """Greedy replies to each prompt, one after the other; (records, total wall time)."""
        records = []
        eos = set(eos_ids) | {self.llm.token_eos()}
        t_all = time.perf_counter()
        for ids in prompt_ids:
            rec: dict[str, Any] = {"first_output_s": None, "token_times": [], "token_ids": []}
            t0 = time.perf_counter()
            finish = "length"
            for token in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                now = time.perf_counter()
                if token in eos:
                    finish = "eos"
                    break
                rec["token_ids"].append(int(token))
                rec["token_times"].append([round(now - t0, 6), len(rec["token_ids"])])
                if rec["first_output_s"] is None:
                    rec["first_output_s"] = now - t0
                if len(rec["token_ids"]) >= max_new_tokens:
                    break
            wall = time.perf_counter() - t0
            n = len(rec["token_ids"])
            rec.update(wall_s=wall, tokens=n, steps=n + (1 if finish == "eos" else 0), prefill_steps=1, prefill_tokens=min(n, 1),
                       finish=finish, error=None, tokens_per_forward=1.0, tokens_per_s=n / max(wall, 1e-9),
                       text=self.llm.detokenize(rec["token_ids"]).decode("utf-8", "replace"))
            records.append(rec)
        return records, time.perf_counter() - t_all
