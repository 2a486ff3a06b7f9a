"""The servers under test: a `voice-agent serve` subprocess per configuration, or one by URL.

Contract:
- `start_server(name, overrides, work_dir, config_path=...)` starts `voice-agent serve` (or
  with `command_name="serve-llm"` the LLM tier) on a free port of 127.0.0.1 with its call store
  and log in `work_dir`, and returns a `ServerProcess` at once; `wait_healthy(server, timeout_s, poll_s=0.5)` then waits for `/healthz`. A server
  that exits or does not answer in time raises `UserError` with the tail of its log.
  `stop()` is idempotent: SIGTERM, then SIGKILL after `grace_s`.
- `check_url(base_url, timeout_s)` fetches `/healthz` of a running server and returns its JSON,
  or raises `UserError` saying the server is unreachable.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voice_agent.errors import UserError

__all__ = ["ServerProcess", "check_url", "free_port", "start_server", "wait_healthy"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_url(base_url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """`/healthz` of a running server (see the module docstring)."""
    url = base_url.rstrip("/").replace("ws://", "http://").replace("wss://", "https://") + "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return json.loads(response.read().decode())
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"the server at {base_url} is unreachable ({url}: {reason})") from None


@dataclass
class ServerProcess:
    name: str  # the configuration it serves ("dllm", "ar")
    url: str  # http://127.0.0.1:<port>
    store_path: Path
    log_path: Path
    overrides: list[str]  # the --set options it was started with
    process: subprocess.Popen[bytes] = field(repr=False)
    health: dict[str, Any] = field(default_factory=dict)  # /healthz once it answered

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 15.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _voice_agent_command() -> list[str]:
    script = Path(sys.executable).with_name("voice-agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "voice_agent"]


def start_server(name: str, overrides: list[str], work_dir: Path, *, config_path: str | None = None,
                 command_name: str = "serve", args: list[str] | None = None) -> ServerProcess:
    """Start `voice-agent serve` (see the module docstring); returns before it is ready.
    `command_name="serve-llm"` (with its `args`, e.g. --ray) starts the LLM tier instead, on the
    free port (`api.port`); its url is then the tier's root, its /v1 the chat API."""
    port = free_port()
    store_path = work_dir / f"calls-{name}.db"
    log_path = work_dir / f"server-{name}.log"
    all_overrides = [*overrides, "server.host=127.0.0.1", f"server.port={port}", f"api.port={port}",
                     f"store.path={store_path}"]
    command = [*_voice_agent_command(), command_name, *(args or [])]
    if config_path:
        command += ["--config", config_path]
    for override in all_overrides:
        command += ["--set", override]
    log = open(log_path, "wb")  # noqa: SIM115 (the child writes to it until it ends)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    finally:
        log.close()
    return ServerProcess(name, f"http://127.0.0.1:{port}", store_path, log_path, all_overrides, process)


def wait_healthy(server: ServerProcess, timeout_s: float, *, poll_s: float = 0.5) -> dict[str, Any]:
    """Wait until `/healthz` answers (asked every `poll_s`); raises UserError if the server exits or
    times out."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        if server.process.poll() is not None:
            raise UserError(
                f"the {server.name} server exited with status {server.process.returncode} while starting; "
                f"its log ({server.log_path}) ends with:\n{server.log_tail()}"
            )
        try:
            server.health = check_url(server.url, timeout_s=2.0)
            return server.health
        except UserError:
            if time.monotonic() > deadline_s:
                server.stop()
                raise UserError(
                    f"the {server.name} server did not answer /healthz within {timeout_s:.0f} s; "
                    f"its log ({server.log_path}) ends with:\n{server.log_tail()}"
                ) from None
        time.sleep(poll_s)
