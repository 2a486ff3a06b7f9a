"""The `voice-agent` command line.

Each subcommand lives in `voice_agent/commands/<name>.py` and exposes:

    HELP: str                                   # one line for `voice-agent --help`
    def add_arguments(parser) -> None           # its own options
    def run(args, config) -> int                # the exit status

Command modules import heavy libraries (torch, faster-whisper, piper) inside `run`, so that
`voice-agent --help` and argument errors stay instant. A subcommand whose module does not exist
yet exits with status 2 and one line saying it is not built.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from audio.errors import AudioError
from dlm.errors import DlmError
from voice_agent.config import ConfigError, load_config
from voice_agent.errors import UserError

__all__ = ["COMMANDS", "main"]

# Subcommand name -> module under voice_agent.commands.
COMMANDS: dict[str, str] = {
    "serve": "serve",
    "serve-llm": "serve_llm",
    "talk": "talk",
    "chat": "chat",
    "say": "say",
    "transcribe": "transcribe",
    "bench": "bench",
    "models": "models",
    "calls": "calls",
    "adapt": "adapt",
    "calibrate": "calibrate",
    "train-turn": "train_turn",
}

_NOT_BUILT_HELP = "(not built yet)"


def _load_command(module: str) -> ModuleType | None:
    """The command's module, or None where it does not exist yet."""
    name = f"voice_agent.commands.{module}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration (default: the embedded configs/default.toml)")
    parser.add_argument(
        "--set",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one configuration key; repeatable (e.g. --set llm.device=cuda)",
    )


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType | None]]:
    parser = argparse.ArgumentParser(
        prog="voice-agent",
        description="A low-latency voice agent built on a block-diffusion LLM.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, ModuleType | None] = {}
    for command, module_name in COMMANDS.items():
        module = _load_command(module_name)
        modules[command] = module
        help_text = getattr(module, "HELP", None) if module else _NOT_BUILT_HELP
        p = sub.add_parser(command, help=help_text, description=help_text)
        if module is not None:
            add_config_arguments(p)
            module.add_arguments(p)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser, modules


def run() -> int:
    """The `voice-agent` command: the engines get the CPU's OpenMP threads (dlm.threads; before
    any torch work in this process), then `main`. VOICE_AGENT_ENGINE_THREADS: how many (default:
    torch's count, the cores); 0: leave torch's threads as they are, shared by every thread."""
    from dlm.threads import confine_to_engines

    wanted = os.environ.get("VOICE_AGENT_ENGINE_THREADS", "").strip()
    if not wanted.isdigit() and wanted:
        print(f"VOICE_AGENT_ENGINE_THREADS must be a whole number, not {wanted!r}", file=sys.stderr)
        return 2
    if wanted != "0":
        confine_to_engines(int(wanted) if wanted else None)
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = modules[args.command]
    if module is None:
        print(f"voice-agent {args.command}: not built yet in this version", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, args.overrides)
        return int(module.run(args, config) or 0)
    except (ConfigError, UserError, DlmError, AudioError) as e:
        print(f"voice-agent {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
