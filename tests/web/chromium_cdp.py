"""Debian's headless Chromium, kept off the network, driven over the DevTools protocol.

No chromedriver and no extra Python package: the DevTools protocol is JSON over a WebSocket, and
`websockets` is already a dependency of the project. The microphone is Chromium's fake capture
device fed from a WAV file; the permission prompt is answered yes by a flag. The process, the
profile and the command channel are browser_process.py's, shared with firefox_bidi.py.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from browser_process import BrowserProcess

__all__ = ["Chromium", "chromium_path"]

# Flags that keep the browser off the network and quiet, whatever the machine.
OFFLINE_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium(BrowserProcess):
    """`with Chromium(url, fake_audio=wav) as browser:` opens `url` in a fresh profile."""

    profile_prefix = "voice-agent-chromium-"

    def __init__(
        self,
        url: str,
        *,
        fake_audio: Path | None = None,
        deny_microphone: bool = False,
        window: tuple[int, int] = (1280, 860),
        timeout_s: float = 30.0,
    ) -> None:
        super().__init__(url, timeout_s=timeout_s)
        self.fake_audio = fake_audio
        self.deny_microphone = deny_microphone
        self.window = window
        self.console: list[str] = []

    def _start(self) -> None:
        self._launch()
        self.call("Runtime.enable")
        self.call("Page.enable")

    def _flags(self) -> list[str]:
        flags = [
            *OFFLINE_FLAGS,
            f"--user-data-dir={self.profile}",
            "--remote-debugging-port=0",
            f"--window-size={self.window[0]},{self.window[1]}",
            "--autoplay-policy=no-user-gesture-required",
            "--use-fake-device-for-media-stream",
        ]
        if not self.deny_microphone:
            flags.append("--use-fake-ui-for-media-stream")
        else:
            flags.append("--deny-permission-prompts")
        if self.fake_audio is not None:
            # %noloop: play the file once, then silence, so the user says it once.
            flags.append(f"--use-file-for-fake-audio-capture={self.fake_audio}%noloop")
        return flags

    def _launch(self) -> None:
        binary = chromium_path()
        if binary is None:
            raise RuntimeError("chromium is not installed")
        log = open(self.profile / "chromium.log", "wb")  # noqa: SIM115 (closed with the process)
        self.process = subprocess.Popen([binary, *self._flags(), self.url], stdout=log, stderr=log)
        port = self._devtools_port()
        self._connect(self._page_socket_url(port))

    def _devtools_port(self) -> int:
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}: {self.log_tail()}")
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                return int(active.read_text().splitlines()[0])
            time.sleep(0.1)
        raise TimeoutError(f"chromium did not open its DevTools port: {self.log_tail()}")

    def _page_socket_url(self, port: int) -> str:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                targets = json.load(response)
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.1)
        raise TimeoutError("chromium opened no page")

    def log_tail(self, chars: int = 2000) -> str:
        path = self.profile / "chromium.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # DevTools protocol -----------------------------------------------------------------------

    def _error(self, message: dict[str, Any]) -> str | None:
        return str(message["error"]) if "error" in message else None

    def _event(self, message: dict[str, Any]) -> None:
        """Console lines and uncaught exceptions are kept in `console`."""
        method = message.get("method")
        params = message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])
            )
            self.console.append(f"{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console.append(
                f"exception: {details.get('exception', {}).get('description', details.get('text'))}"
            )

    def exceptions(self) -> list[str]:
        """Uncaught page exceptions seen so far (reported while waiting for other answers)."""
        self.evaluate("0")  # collect what is pending
        return [line for line in self.console if line.startswith("exception")]

    def evaluate(self, expression: str, *, gesture: bool = False) -> Any:
        """The value of a JavaScript expression (promises awaited); `gesture` counts as a click."""
        result = self.call(
            "Runtime.evaluate",
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
            userGesture=gesture,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def _screenshot_png_base64(self) -> str:
        return self.call("Page.captureScreenshot", format="png")["data"]
