"""Headless Firefox (Debian's firefox-esr), kept off the network, driven over WebDriver BiDi.

Like chromium_cdp.py: no geckodriver and no extra package, BiDi is JSON over a WebSocket, and the
process, the profile and the command channel are browser_process.py's. The microphone is Firefox's
fake device (a tone), allowed without a prompt by profile preferences. Unlike Chromium, Firefox
starts no AudioContext without an output device: `null_sound_server()` runs a private PulseAudio
with a null sink for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from browser_process import BrowserProcess, stop_process, watch_lines

__all__ = ["Firefox", "firefox_path", "null_sound_server"]

PREFERENCES = {
    # The fake microphone, no permission prompt, sound without a click.
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.autoplay.default": 0,
    "media.autoplay.blocking_policy": 0,
    # Off the network: no updates, telemetry, safe browsing, captive portal or connectivity checks.
    "app.update.enabled": False,
    "app.normandy.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage": "about:blank",
    "browser.newtabpage.enabled": False,
    "remote.prefs.recommended": True,
}


def firefox_path() -> str | None:
    for name in ("firefox-esr", "firefox"):
        found = shutil.which(name)
        if found:
            return found
    return None


@contextlib.contextmanager
def null_sound_server(timeout_s: float = 10.0) -> Iterator[str]:
    """A private PulseAudio whose only output is a null sink; yields its PULSE_SERVER address."""
    folder = Path(tempfile.mkdtemp(prefix="voice-agent-pulse-"))
    socket = folder / "native"
    command = [
        "pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--log-target=stderr",
        "-L", "module-null-sink sink_name=null",
        "-L", f"module-native-protocol-unix auth-anonymous=1 socket={socket}",
    ]  # fmt: skip
    env = {**os.environ, "HOME": str(folder), "XDG_RUNTIME_DIR": str(folder)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while not socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pulseaudio did not start")
            time.sleep(0.05)
        yield f"unix:{socket}"
    finally:
        stop_process(process)
        shutil.rmtree(folder, ignore_errors=True)


class Firefox(BrowserProcess):
    """`with Firefox(url, pulse_server=...) as browser:` opens `url` in a fresh profile."""

    profile_prefix = "voice-agent-firefox-"
    close_timeout_s = 15.0

    def __init__(self, url: str, *, pulse_server: str = "", timeout_s: float = 60.0) -> None:
        super().__init__(url, timeout_s=timeout_s)
        self.pulse_server = pulse_server
        self.context = ""
        self.log: list[str] = []
        self.errors: list[str] = []

    def _start(self) -> None:
        self._launch()
        self.call("session.new", capabilities={})
        self.call("session.subscribe", events=["log.entryAdded"])
        self.context = self.call("browsingContext.getTree")["contexts"][0]["context"]
        self.call("browsingContext.navigate", context=self.context, url=self.url, wait="complete")

    def _launch(self) -> None:
        binary = firefox_path()
        if binary is None:
            raise RuntimeError("firefox is not installed")
        prefs = "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in PREFERENCES.items())
        (self.profile / "user.js").write_text(prefs)
        command = [
            binary,
            "--headless",
            "--no-remote",
            "--profile",
            str(self.profile),
            "--remote-debugging-port=0",
        ]
        env = {**os.environ, "PULSE_SERVER": self.pulse_server} if self.pulse_server else None
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        assert self.process.stderr is not None
        found, address = watch_lines(self.process.stderr, r"WebDriver BiDi listening on (ws://\S+)", self.log)
        if not found.wait(self.timeout_s):
            raise TimeoutError(f"firefox did not start its BiDi server: {''.join(self.log)[-2000:]}")
        self._connect(f"{address[0]}/session")

    def _error(self, message: dict[str, Any]) -> str | None:
        if message.get("type") == "error":
            return f"{message.get('error')}: {message.get('message')}"
        return None

    def _event(self, message: dict[str, Any]) -> None:
        """Error lines of the page's log are kept in `errors`."""
        if message.get("method") == "log.entryAdded" and message["params"].get("level") == "error":
            self.errors.append(message["params"].get("text", ""))

    def _before_close(self) -> None:
        self.call("session.end")

    def evaluate(self, expression: str, *, gesture: bool = False) -> Any:
        """The JSON value of an expression (promises awaited); `gesture` counts as a click."""
        result = self.call(
            "script.evaluate",
            expression=f"(async () => JSON.stringify(await ({expression})))()",
            target={"context": self.context},
            awaitPromise=True,
            userActivation=gesture,
        )
        if result.get("type") != "success":
            raise RuntimeError(f"{expression!r} threw: {result.get('exceptionDetails')}")
        value = result["result"].get("value")
        return None if value is None else json.loads(value)

    def _screenshot_png_base64(self) -> str:
        return self.call("browsingContext.captureScreenshot", context=self.context)["data"]
