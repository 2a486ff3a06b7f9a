"""`voice-agent chat`: a streaming text REPL on the configured model (no audio).

Text appears block by block as the engine finalizes it; after each reply one line gives tokens,
forward passes, tokens per forward and the time to the first text. Ctrl-C during a reply aborts
that request; Ctrl-D or an empty line quits. The "default" model decodes by draft-and-verify (the
AR SmolLM2 with its drafter); where the drafter file is missing it resolves to the plain AR
checkpoint, and the command says so instead of pretending to decode in parallel.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from voice_agent.config import Config

HELP = "chat with the configured LLM in the terminal (streaming text, no audio)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="torch device (default: llm.device)")
    parser.add_argument("--ar", action="store_true", help="use the AR baseline engine on the same weights")
    parser.add_argument("--max-new-tokens", type=int, help="default: llm.max_new_tokens")
    parser.add_argument("--compile", metavar="MODE", help="torch.compile the denoising forward (e.g. reduce-overhead "
                                                          "on CUDA); the first replies pay for compilation")


def load_llm(config: Config, name: str, device: str, dtype: str, weights: str | None = None) -> tuple[Any, bool]:
    """Load a model by registry name or path (with its drafter) -> (LoadedModel, decodes more
    than one token per forward). Prints a warning line where a fallback stands in for the
    configured model."""
    from dlm.engines import parallel
    from voice_agent.llm import load_local_llm

    loaded, resolved = load_local_llm(name, device=device, dtype=dtype, weights=weights or config.llm.weights,
                                      kv_cache=config.llm.kv_cache)
    if resolved.fallback_from:
        print(f"WARNING: model {resolved.fallback_from!r} is not shipped yet; using the AR model "
              f"{resolved.name!r} ({resolved.path}) instead: no diffusion decoding.", file=sys.stderr)
    return loaded, parallel(loaded)


def run(args: argparse.Namespace, config: Config) -> int:
    from dlm.engines import decoding, make_engine
    from voice_agent.llm import generation_params

    device = args.device or config.llm.device
    loaded, diffusion = load_llm(config, config.llm.model, device, config.llm.dtype)
    kind = "ar" if args.ar else "auto"
    if not diffusion and not args.ar:
        print(f"WARNING: {loaded.path} ({loaded.family}) has no mask token and no drafter; chatting with the AR "
              "baseline engine.", file=sys.stderr)
    params = generation_params(config.llm, max_new_tokens=args.max_new_tokens)
    history: list[dict[str, str]] = [{"role": "system", "content": config.agent.system_prompt}]
    print(f"{loaded.family} model from {loaded.path} on {device}, {decoding(loaded, kind)} "
          "decoding. Empty line or Ctrl-D quits.", file=sys.stderr)
    with make_engine(loaded, kind, max_batch_size=1, compile_mode=args.compile,
                     **config.llm.draft_settings()) as engine:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return 0
            if not line:
                return 0
            history.append({"role": "user", "content": line})
            t0 = time.perf_counter()
            handle = engine.submit(history, params)
            first_s = None
            reply: list[str] = []
            last = None
            print("bot> ", end="", flush=True)
            try:
                for delta in handle:
                    if delta.text and first_s is None:
                        first_s = time.perf_counter() - t0
                    reply.append(delta.text)
                    print(delta.text, end="", flush=True)
                    last = delta
            except KeyboardInterrupt:
                engine.abort(handle.request_id)
                for delta in handle:  # drain up to the abort delta
                    last = delta
            wall = time.perf_counter() - t0
            history.append({"role": "assistant", "content": "".join(reply)})
            if last is not None:
                per_fwd = last.tokens / max(last.steps, 1)
                first = f"{first_s * 1000:.0f} ms" if first_s is not None else "-"
                print(f"\n  [{last.finish_reason}; {last.tokens} tokens, {last.steps} forwards, "
                      f"{per_fwd:.2f} tok/forward, first text {first}, {wall:.2f} s]", file=sys.stderr)
