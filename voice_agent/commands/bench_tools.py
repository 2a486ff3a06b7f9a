"""`voice-agent bench tools`: the tool-use eval (voice_agent/bench/tool_cases.py) on the configured
LLM: which function it calls, with which arguments, and whether every call is valid JSON for its
function's schema.

Each case is one request (the agent's system prompt, the caller's words, the eval's four
functions), decoded greedily by the configured client: the local model under the tools' grammar
(voice_agent/tools.py), or an OpenAI-compatible server with the tools passed through. Two modes:
`auto` (the model decides whether to call; every case counts, "no call" is right for the cases
that need none) and `required` (a call must come: the cases that need one; which function and
which arguments). Prints a line per case and the scores; `--json FILE` keeps them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from voice_agent.config import Config

HELP = "tool-use eval: which function, which arguments, valid JSON (auto and required tool choice)"
MODES = ("auto", "required")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modes", default="auto,required", help="tool choices to run (default: auto,required)")
    parser.add_argument("--cases", type=int, default=0, help="only the first N cases (default: all)")
    parser.add_argument("--heldout", action="store_true",
                        help="the held-out cases instead (written after the router was designed on the others)")
    parser.add_argument("--json", metavar="FILE", type=Path, help="write the results to FILE")


def _schema_valid(arguments: dict[str, Any], schema: dict[str, Any]) -> bool:
    """The eval's schemas only: an object with typed properties, required ones, enums."""
    if not isinstance(arguments, dict) or any(name not in arguments for name in schema.get("required", [])):
        return False
    kinds = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
    for name, value in arguments.items():
        spec = schema.get("properties", {}).get(name)
        if spec is None:
            return False  # the grammar allows no property the schema does not name
        kind = kinds.get(spec.get("type"))
        if kind is not None and (not isinstance(value, kind) or (spec.get("type") == "integer" and isinstance(value, bool))):
            return False
        if "enum" in spec and value not in spec["enum"]:
            return False
    return True


async def _run_case(llm: Any, system: str, case: Any, mode: str) -> dict[str, Any]:
    from voice_agent.bench.tool_cases import TOOLS, arguments_match
    from voice_agent.llm import LlmError, LlmOptions

    messages = [{"role": "system", "content": system}, {"role": "user", "content": case.request}]
    started = time.perf_counter()
    text, calls, error = "", [], None
    try:
        async for delta in llm.stream(messages, options=LlmOptions(tools=TOOLS, tool_choice=mode)):
            text += delta.text
            calls = delta.tool_calls or calls
    except LlmError as e:
        error = str(e)
    took_s = time.perf_counter() - started
    call = calls[0] if calls else None
    arguments: Any = None
    valid = None
    if call is not None:
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
        try:
            arguments = json.loads(call.arguments)
            valid = call.name in schemas and _schema_valid(arguments, schemas[call.name])
        except ValueError:
            valid = False
    right_tool = (call.name if call else None) == case.tool
    right = right_tool and (case.tool is None or (isinstance(arguments, dict) and arguments_match(case.arguments, arguments)))
    return {"request": case.request, "mode": mode, "expected": case.tool, "called": call.name if call else None,
            "arguments": arguments, "text": text.strip()[:120], "valid": valid, "right_tool": right_tool,
            "right": right, "error": error, "seconds": round(took_s, 3)}


def _scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    calls = [r for r in rows if r["called"] is not None]
    return {
        "cases": len(rows),
        "right_tool": sum(r["right_tool"] for r in rows),
        "right_call": sum(r["right"] for r in rows),
        "calls": len(calls),
        "valid_calls": sum(bool(r["valid"]) for r in calls),
        "errors": sum(r["error"] is not None for r in rows),
        "mean_s": round(sum(r["seconds"] for r in rows) / len(rows), 3) if rows else None,
    }


def run(args: argparse.Namespace, config: Config) -> int:
    from voice_agent.bench.tool_cases import CASES, HELDOUT
    from voice_agent.errors import UserError
    from voice_agent.llm import build_llm

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise UserError(f"--modes takes {', '.join(MODES)}, not {args.modes!r}")
    chosen = HELDOUT if args.heldout else CASES
    cases = chosen[: args.cases] if args.cases > 0 else chosen
    config.llm.temperature = 0.0
    llm = build_llm(config.llm, api_key=config.secrets.llm_api_key)

    async def main() -> dict[str, Any]:
        results: dict[str, Any] = {"llm": llm.name, "cases": "heldout" if args.heldout else "main", "modes": {}}
        try:
            for mode in modes:
                rows = []
                for case in cases:
                    if mode == "required" and case.tool is None:
                        continue
                    row = await _run_case(llm, config.agent.system_prompt, case, mode)
                    rows.append(row)
                    shown = f"{row['called']}({json.dumps(row['arguments'])})" if row["called"] else f"words: {row['text'][:50]!r}"
                    print(f"  [{mode}] {'ok ' if row['right'] else 'BAD'} {case.request[:44]:44s} -> {shown}"
                          + (f"  error: {row['error']}" if row["error"] else ""), flush=True)
                scores = _scores(rows)
                results["modes"][mode] = {"scores": scores, "rows": rows}
                print(f"{mode}: right calls {scores['right_call']}/{scores['cases']}, right function (or none) "
                      f"{scores['right_tool']}/{scores['cases']}, valid JSON for the schema {scores['valid_calls']}/"
                      f"{scores['calls']} calls, {scores['errors']} errors, {scores['mean_s']} s per case", flush=True)
        finally:
            await llm.aclose()
        return results

    print(f"voice-agent bench tools: {len(cases)} {'held-out ' if args.heldout else ''}cases on {llm.name}", flush=True)
    results = asyncio.run(main())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
