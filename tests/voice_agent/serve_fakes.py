"""Testing only: `voice-agent serve`'s serving loop (signals, drain, store) with the fake models.

    python tests/voice_agent/serve_fakes.py --store calls.db [--set server.shutdown_grace_s=2]
        [--reply TEXT] [--piece-delay-s 0.05]

Prints the same banner as `voice-agent serve` (the port is in its first line). The SIGTERM and
kill -9 tests start it as a subprocess; it is not part of the product and not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from va_fakes import FakeLLM, FakeServices

from voice_agent.commands.serve import _serve
from voice_agent.config import load_config
from voice_agent.store import CallStore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--reply", default="One two three. Four five six. Seven eight nine.")
    parser.add_argument("--piece-delay-s", type=float, default=0.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config(overrides=["server.port=0", "agent.speculative_start=false", *args.set])
    services = FakeServices(FakeLLM(args.reply, piece_delay_s=args.piece_delay_s))
    store = CallStore(args.store)
    try:
        asyncio.run(_serve(config, services, store))
    finally:
        store.close()


if __name__ == "__main__":
    main()
