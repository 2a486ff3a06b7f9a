"""`voice-agent models`: every model role, what is configured, where it was found, its size;
exit status 1 where one is not found or a shipped file is damaged (its sha256 not the registry's)."""

from __future__ import annotations

import argparse
import json

from voice_agent.config import Config
from voice_agent.models import describe_models

HELP = "list the models in use (ASR, TTS, dLLM, AR baseline), where they are and their size"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _human(n: int) -> str:
    if n == 0:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def run(args: argparse.Namespace, config: Config) -> int:
    infos = describe_models(config)
    if args.json:
        print(json.dumps([
            {
                "role": i.role,
                "configured": i.configured,
                "path": str(i.path) if i.path else None,
                "size_bytes": i.size_bytes,
                "detail": i.detail,
                "fallback": i.fallback,
            }
            for i in infos
        ], indent=2))
    else:
        for i in infos:
            print(f"{i.role:<12} {i.configured}")
            print(f"{'':<12} path:   {i.path if i.path else '-'}")
            print(f"{'':<12} size:   {_human(i.size_bytes)}")
            print(f"{'':<12} status: {i.detail}")
    unusable = [i for i in infos if i.detail.startswith(("NOT FOUND", "DAMAGED"))]
    return 1 if unusable else 0
