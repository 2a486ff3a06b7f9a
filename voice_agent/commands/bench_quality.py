"""`voice-agent bench quality`: the phone-bot eval (voice_agent/bench/phone_bot.py) on the
configured LLM: answers right by the business's facts, replies that loop, replies not in
English, median reply length; per prompt assembly, on generated businesses.

Each question is one request as a Realtime session makes it when an operator set instructions:
the system prompt, then the caller's question, decoded greedily by the configured client (the
loop guard as configured). Prompt assemblies (`--styles`; `ASSEMBLIES`): "operator" (the
operator's instructions alone: what a session sends today), "rules-after" (then the voice rules),
"rules-before" (the voice rules, then the operator's text). `--heldout` takes the held-out
businesses (never to be trained on). Prints a table (one row per assembly) and writes JSON
(`--json`) with every reply.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from voice_agent.bench import phone_bot as pb
from voice_agent.config import Config

HELP = "phone-bot eval: answers right by the facts, loops, language, reply length, per prompt assembly"
ASSEMBLIES = {
    "operator": lambda text: text,
    "rules-after": lambda text: f"{text}\n{pb.VOICE_RULES}",
    "rules-before": lambda text: f"{pb.VOICE_RULES.replace(' above', ' below')}\n{text}",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--businesses", type=int, default=6, help="how many generated businesses (default 6)")
    parser.add_argument("--heldout", action="store_true", help="the held-out businesses (default: the tuning ones)")
    parser.add_argument("--styles", default="operator,rules-after",
                        help=f"prompt assemblies to compare: {', '.join(ASSEMBLIES)} (default: operator,rules-after)")
    parser.add_argument("--json", metavar="FILE", type=Path, help="write every reply and the scores to FILE")


def _score(rows: list[dict[str, Any]]) -> dict[str, Any]:
    factual = [r for r in rows if r["right"] is not None]
    lengths = [r["words"] for r in rows]
    return {
        "replies": len(rows),
        "factual": len(factual),
        "right": sum(r["right"] for r in factual),
        "right_pct": round(100 * sum(r["right"] for r in factual) / len(factual), 1) if factual else None,
        "loops": sum(r["loops"] for r in rows),
        "not_english": sum(not r["english"] for r in rows),
        "stopped_by_loop_guard": sum(r["finish"] == "repetition" for r in rows),
        "median_words": statistics.median(lengths) if lengths else None,
        "errors": sum(r["error"] is not None for r in rows),
    }


def run(args: argparse.Namespace, config: Config) -> int:
    from voice_agent.errors import UserError
    from voice_agent.llm import LlmError, build_llm

    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    if not styles or any(s not in ASSEMBLIES for s in styles):
        raise UserError(f"--styles takes {', '.join(ASSEMBLIES)}, not {args.styles!r}")
    if args.businesses < 1:
        raise UserError("--businesses must be at least 1")
    businesses = pb.heldout(args.businesses) if args.heldout else [pb.business(i) for i in range(args.businesses)]
    config.llm.temperature = 0.0
    llm = build_llm(config.llm, api_key=config.secrets.llm_api_key)

    async def ask(system: str, question: str) -> tuple[str, str | None, str | None]:
        text, finish = "", None
        try:
            async for delta in llm.stream([{"role": "system", "content": system}, {"role": "user", "content": question}]):
                text += delta.text
                finish = delta.finish_reason or finish
        except LlmError as e:
            return text, finish, str(e)
        return text.strip(), finish, None

    async def main() -> dict[str, Any]:
        results: dict[str, Any] = {"llm": llm.name, "businesses": "heldout" if args.heldout else "tuning", "styles": {}}
        try:
            for style in styles:
                rows: list[dict[str, Any]] = []
                started = time.perf_counter()
                for b in businesses:
                    system = ASSEMBLIES[style](pb.operator_instructions(b))
                    turns = [(q, c) for q, c in pb.questions(b)] + [(q, None) for q in pb.OFF_TOPIC]
                    for question, check in turns:
                        reply, finish, error = await ask(system, question)
                        rows.append({"business": b.seed, "question": question, "reply": reply, "finish": finish,
                                     "error": error, "right": check.right(reply) if check is not None else None,
                                     "loops": pb.loops(reply), "english": pb.english(reply), "words": len(pb.words(reply))})
                    print(f"  [{style}] business {b.seed} ({b.kind}): "
                          f"{sum(bool(r['right']) for r in rows if r['business'] == b.seed)} right", flush=True)
                scores = _score(rows)
                scores["seconds"] = round(time.perf_counter() - started, 1)
                results["styles"][style] = {"scores": scores, "rows": rows}
        finally:
            await llm.aclose()
        return results

    print(f"voice-agent bench quality: {len(businesses)} {'held-out ' if args.heldout else ''}businesses on {llm.name}",
          flush=True)
    results = asyncio.run(main())
    print("\n| assembly | right (factual) | loops | not English | stopped by the loop guard | median words |")
    print("|---|---|---|---|---|---|")
    for style, result in results["styles"].items():
        s = result["scores"]
        print(f"| {style} | {s['right']}/{s['factual']} ({s['right_pct']} %) | {s['loops']}/{s['replies']} | "
              f"{s['not_english']}/{s['replies']} | {s['stopped_by_loop_guard']} | {s['median_words']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
