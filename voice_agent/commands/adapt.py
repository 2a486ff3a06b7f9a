"""`voice-agent adapt STEP ...`: the adaptation recipe (dlm/adapt), same options as `python -m dlm.adapt`."""

from __future__ import annotations

import argparse

from voice_agent.config import Config

HELP = "adapt the AR teacher into the block-diffusion default model (data, train, eval, export, pipeline)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dlm.adapt.cli import add_arguments as add

    add(parser)


def run(args: argparse.Namespace, config: Config) -> int:
    from dlm.adapt.cli import run as run_adapt

    return run_adapt(args)
