"""The LLM tier: the chat API (voice_agent/chat_api.py) of one local engine per process, standalone
or scaled out as Ray Serve replicas. Voice frontends (`voice-agent serve` with `llm.backend =
"openai"` and `llm.base_url` = the tier's `/v1`) hold the calls; the tier holds the model.

Contract:
- `load_chat_service(config, replica=)` loads the configured local LLM (seconds) and wraps it in a
  `ChatService`; `config.llm.backend` must be "local".
- `serve_standalone(config, service, host=, port=, stop=, on_ready=)` runs the chat app on
  uvicorn until `stop` is set; `on_ready(port)` is called once its socket listens (port 0 picks
  one); a port it cannot bind raises `UserError` (the service's engine is closed either way).
- `deploy(config, replicas=, address=, host=, port=)`: the same app on Ray Serve, `replicas`
  replicas (each owns one engine, reserves `api.replica_cpus` CPUs and runs its engine on as many
  threads, its other threads on one: dlm.threads), behind Ray Serve's HTTP proxies on host:port (one on every node that holds a replica, so a
  load balancer can reach any of them). `address` None starts a local Ray instance; otherwise
  it names a running cluster ("auto", "ray://head:10001", "head:6379"). Returns the URL of the
  deployment's `/v1`. Ray does placement, routing and restarts: a replica that dies is replaced by
  the Serve controller, and its requests in flight fail (their clients see a cut stream).
  `undeploy(config, stop_ray=)` removes the application (and stops the local Ray instance).
- Each replica names itself in every response (`x-voice-agent-replica`: Ray's replica id, or
  host:pid outside Ray).
- Ray (`ray[serve]`) is an optional dependency: without it `deploy` raises `UserError` saying
  how to install it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from voice_agent.config import Config
from voice_agent.errors import UserError

__all__ = ["deploy", "load_chat_service", "serve_standalone", "undeploy"]

log = logging.getLogger(__name__)

RAY_MISSING = "Ray Serve is not installed: pip install 'voice-agent[ray]' (or: pip install 'ray[serve]')"


def load_chat_service(config: Config, *, replica: str | None = None) -> Any:
    """The configured local engine behind a `ChatService` (loads the model: seconds)."""
    from voice_agent.chat_api import ChatService
    from voice_agent.llm import LocalDLM, build_llm

    if config.llm.backend != "local":
        raise UserError(f"the LLM tier serves a local model: llm.backend must be 'local', not {config.llm.backend!r}")
    llm = build_llm(config.llm)
    assert isinstance(llm, LocalDLM)
    return ChatService.of(llm, config, replica=replica)


async def serve_standalone(config: Config, service: Any, *, host: str, port: int, stop: asyncio.Event,
                           on_ready: Callable[[int], None] | None = None) -> None:
    """The chat app on uvicorn until `stop` is set; requests in progress then get
    `server.shutdown_grace_s` to finish."""
    import uvicorn

    from voice_agent.chat_api import chat_app

    # The socket is bound here, so that a taken port is a clear error (uvicorn would sys.exit).
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        await service.llm.aclose()
        raise UserError(f"the LLM tier cannot listen on {host}:{port}: {e.strerror or e}") from None
    server = uvicorn.Server(uvicorn.Config(
        chat_app(service), lifespan="off", log_config=None, access_log=False,
        timeout_graceful_shutdown=int(config.server.shutdown_grace_s) or None))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # the caller owns signals
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        if on_ready is not None:  # the socket listens already: a client's connection waits for uvicorn
            on_ready(sock.getsockname()[1])
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
    finally:
        server.should_exit = True
        await task
        sock.close()
        await service.llm.aclose()


def _replica_class() -> Any:
    """The Ray Serve deployment class (built on first use: Ray is imported only here)."""
    from ray import serve

    @serve.deployment
    @serve.ingress()
    class LlmReplica:
        """One engine per replica; its ASGI app is built once the engine is loaded."""

        def __init__(self, config: Config) -> None:
            from dlm.threads import confine_to_engines

            # As the voice-agent command does (dlm/threads.py): the engine's worker thread gets
            # the replica's CPUs, every other thread of the actor one torch thread.
            confine_to_engines(max(1, int(config.api.replica_cpus)))
            replica = serve.get_replica_context().replica_id.to_full_id_str()
            # Ray Serve's handlers write the replica's log; ours says what the replica serves and
            # one line per completion.
            logging.getLogger("voice_agent").setLevel(logging.INFO)
            self.service = load_chat_service(config, replica=replica)
            log.info("replica %s: serving %s", replica, self.service.model_id)

        def __serve_build_asgi_app__(self) -> Any:
            from voice_agent.chat_api import chat_app

            return chat_app(self.service)

    return LlmReplica


def deploy(config: Config, *, replicas: int, address: str | None, host: str, port: int,
           ray_init: dict[str, Any] | None = None) -> str:
    """Deploy the tier on Ray Serve (module docstring); blocks until every replica is ready."""
    if replicas < 1:
        raise UserError(f"--replicas must be at least 1, not {replicas}")
    if config.llm.backend != "local":
        raise UserError(f"the LLM tier serves a local model: llm.backend must be 'local', not {config.llm.backend!r}")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError(RAY_MISSING) from None
    if not ray.is_initialized():
        kwargs = dict(ray_init or {})
        if address:
            kwargs["address"] = address
        ray.init(**kwargs)
    # Ray Serve's default: an HTTP proxy on every node that holds a replica.
    serve.start(http_options={"host": host, "port": port})
    api = config.api
    app = _replica_class().options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": api.replica_cpus},
        # Ray queues requests beyond this at its proxy; one more than the app's own limit lets
        # the app answer the overflow at once with 429.
        max_ongoing_requests=api.max_requests + 1,
    ).bind(config)
    serve.run(app, name=api.ray_app, route_prefix="/")
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    return f"http://{shown}:{port}/v1"


def undeploy(config: Config, *, stop_ray: bool) -> None:
    """Remove the tier's application; `stop_ray`: also stop Serve and the Ray instance this
    process started."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if stop_ray:
        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(config.api.ray_app)
