"""What both test browsers (chromium_cdp.py, firefox_bidi.py) share: a process in a throw-away
profile, one JSON-over-WebSocket command channel, polling, screenshots and an idempotent close.

Each subclass says only what differs: how it starts, how its protocol marks an error answer and an
event, how it evaluates JavaScript and takes a screenshot. `stop_process` and `watch_lines` serve
the other helper processes of the tests too (the sound server, `voice-agent serve`).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

from websockets.sync.client import ClientConnection, connect

__all__ = ["BrowserProcess", "stop_process", "watch_lines"]

# Page load, as the test hook sees it: the document is complete and the page's module has run.
PAGE_LOADED = "document.readyState === 'complete' && window.voiceAgent !== undefined"


def stop_process(process: subprocess.Popen[Any] | None, *, timeout_s: float = 10.0) -> None:
    """Terminate `process` if it still runs; kill it if it has not ended within `timeout_s`."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def watch_lines(lines: Iterable[str], pattern: str, log: list[str]) -> tuple[threading.Event, list[str]]:
    """Read `lines` (a process's output) on a daemon thread, appending each to `log`; the event is
    set once a line matches `pattern`, and the list then holds the first match's group 1."""
    found = threading.Event()
    match_group: list[str] = []

    def read() -> None:
        for line in lines:
            log.append(line)
            match = re.search(pattern, line)
            if match and not match_group:
                match_group.append(match.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    return found, match_group


class BrowserProcess:
    """A browser in a fresh profile, driven by commands `{"id", "method", "params"}` on a WebSocket.

    `with Subclass(url, ...) as browser:` starts it (`_start`), closes it on the way out.
    """

    profile_prefix = "voice-agent-browser-"
    close_timeout_s = 10.0

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.profile = Path(tempfile.mkdtemp(prefix=self.profile_prefix))
        self.process: subprocess.Popen[Any] | None = None
        self.socket: ClientConnection | None = None
        self.ids = itertools.count(1)

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # What a subclass says ---------------------------------------------------------------------

    def _start(self) -> None:
        """Launch the browser, `_connect` to it, and open `self.url`."""
        raise NotImplementedError

    def _error(self, message: dict[str, Any]) -> str | None:
        """The error an answer carries, or None where it is a result."""
        raise NotImplementedError

    def _event(self, message: dict[str, Any]) -> None:
        """An event that arrived while waiting for an answer."""

    def _before_close(self) -> None:
        """Last words on the socket before it is closed (errors are ignored)."""

    def evaluate(self, expression: str, *, gesture: bool = False) -> Any:
        """The value of a JavaScript expression (promises awaited); `gesture` counts as a click."""
        raise NotImplementedError

    def _screenshot_png_base64(self) -> str:
        raise NotImplementedError

    # Shared -----------------------------------------------------------------------------------

    def _connect(self, url: str) -> None:
        socket = connect(url, max_size=64 * 2**20, open_timeout=self.timeout_s)
        self.socket = socket.__enter__()  # closed in close()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer; events seen meanwhile go to `_event`."""
        assert self.socket is not None
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout_s
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == message_id:
                error = self._error(message)
                if error is not None:
                    raise RuntimeError(f"{method}: {error}")
                return message.get("result", {})
            self._event(message)

    def wait_for(self, expression: str, *, timeout_s: float, interval_s: float = 0.25) -> Any:
        """Poll `expression` until it is truthy; returns its value or raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} stayed falsy for {timeout_s} s")
            time.sleep(interval_s)

    def wait_for_load(self, *, timeout_s: float | None = None) -> None:
        self.wait_for(PAGE_LOADED, timeout_s=self.timeout_s if timeout_s is None else timeout_s)

    def submit_text(self, text: str) -> None:
        """Type `text` into the page's composer and send it, as a person pressing Enter would."""
        self.evaluate(
            # One expression (a comma, not a semicolon): Firefox's evaluate wraps it in `await (...)`.
            f"document.getElementById('composer-text').value = {json.dumps(text)},"
            "document.getElementById('composer').requestSubmit()",
            gesture=True,
        )

    def screenshot(self, path: Path) -> Path:
        data = self._screenshot_png_base64()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """Idempotent: the socket, then the process, then the profile."""
        if self.socket is not None:
            with contextlib.suppress(Exception):
                self._before_close()
            with contextlib.suppress(Exception):
                self.socket.close()
            self.socket = None
        stop_process(self.process, timeout_s=self.close_timeout_s)
        self.process = None
        shutil.rmtree(self.profile, ignore_errors=True)
