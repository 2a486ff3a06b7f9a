"""`voice-agent serve-llm`: the LLM tier, an OpenAI-compatible `/v1/chat/completions` of the local
engine, standalone or as Ray Serve replicas (voice_agent/llm_tier.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from voice_agent.config import Config

HELP = "run the LLM tier: the local model behind an OpenAI-compatible /v1/chat/completions (--ray: Ray Serve replicas)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="interface to listen on (default: server.host)")
    parser.add_argument("--port", type=int, help="port to listen on (default: api.port, 8000; 0 picks a free one "
                        "without --ray)")
    parser.add_argument("--ray", action="store_true", help="deploy on Ray Serve, one engine per replica")
    parser.add_argument("--replicas", type=int, default=1, metavar="N", help="with --ray: replicas (default 1)")
    parser.add_argument("--num-cpus", type=float, metavar="N",
                        help="with --ray, without --ray-address: CPUs the local Ray instance may use (default: all; "
                        "leave some to voice frontends on the same machine)")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="with --ray: a running Ray cluster (e.g. auto, or ray://head:10001); default: start a "
                        "local Ray instance")


def _print_ready(url: str, config: Config) -> None:
    print(f"voice-agent LLM tier: {url}  (openai SDK: base_url={url})", flush=True)
    print(f"  frontends: voice-agent serve --set llm.backend=openai --set llm.base_url={url}", flush=True)
    if config.server.token:
        print("  an access token is required (Authorization: Bearer); frontends send it from the variable "
              "named by llm.api_key_env", flush=True)


def run(args: argparse.Namespace, config: Config) -> int:
    from voice_agent.errors import UserError

    host = args.host or config.server.host
    port = config.api.port if args.port is None else args.port
    if not args.ray and (args.replicas != 1 or args.ray_address or args.num_cpus is not None):
        raise UserError("--replicas, --num-cpus and --ray-address need --ray")
    if args.num_cpus is not None and (args.ray_address or args.num_cpus <= 0):
        raise UserError("--num-cpus sizes a local Ray instance: above 0, and not with --ray-address")
    if args.ray:
        return _run_ray(args, config, host, port)
    from voice_agent.llm_tier import load_chat_service, serve_standalone

    service = load_chat_service(config)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
        await serve_standalone(config, service, host=host, port=port, stop=stop,
                               on_ready=lambda bound: _print_ready(f"http://{shown}:{bound}/v1", config))

    asyncio.run(main())
    return 0


def _run_ray(args: argparse.Namespace, config: Config, host: str, port: int) -> int:
    import threading

    from voice_agent.llm_tier import deploy, undeploy

    print(f"voice-agent LLM tier: deploying {args.replicas} replica(s) on Ray Serve "
          f"({args.ray_address or 'a local Ray instance'}); each loads the model...", flush=True)
    ray_init = {"num_cpus": args.num_cpus} if args.num_cpus is not None else None
    url = deploy(config, replicas=args.replicas, address=args.ray_address, host=host, port=port, ray_init=ray_init)
    _print_ready(url, config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        print("voice-agent LLM tier: shutting down", flush=True)
        undeploy(config, stop_ray=not args.ray_address)
    return 0
