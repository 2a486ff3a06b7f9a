"""Headless Firefox (Debian's firefox-esr), kept off the network, driven over WebDriver BiDi.

Like chromium_cdp.py: no geckodriver and no extra package, BiDi is JSON over a WebSocket. The
microphone is Firefox's fake device (a tone), allowed without a prompt by profile preferences.
Unlike Chromium, Firefox starts no AudioContext without an output device: `null_sound_server()`
runs a private PulseAudio with a null sink for it.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

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
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


class Firefox:
    """`with Firefox(url, pulse_server=...) as browser:` opens `url` in a fresh profile."""

    def __init__(self, url: str, *, pulse_server: str = "", timeout_s: float = 60.0) -> None:
        self.url = url
        self.pulse_server = pulse_server
        self.timeout_s = timeout_s
        self.profile = Path(tempfile.mkdtemp(prefix="voice-agent-firefox-"))
        self.process: subprocess.Popen[str] | None = None
        self.socket: ClientConnection | None = None
        self.context = ""
        self.ids = itertools.count(1)
        self.log: list[str] = []
        self.errors: list[str] = []

    def __enter__(self) -> Firefox:
        try:
            self._launch()
            self.call("session.new", capabilities={})
            self.call("session.subscribe", events=["log.entryAdded"])
            self.context = self.call("browsingContext.getTree")["contexts"][0]["context"]
            self.call("browsingContext.navigate", context=self.context, url=self.url, wait="complete")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        found = threading.Event()
        address: list[str] = []

        def read() -> None:
            assert self.process is not None and self.process.stderr is not None
            for line in self.process.stderr:
                self.log.append(line)
                match = re.search(r"WebDriver BiDi listening on (ws://\S+)", line)
                if match and not address:
                    address.append(match.group(1))
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(self.timeout_s):
            raise TimeoutError(f"firefox did not start its BiDi server: {''.join(self.log)[-2000:]}")
        socket = connect(f"{address[0]}/session", max_size=64 * 2**20, open_timeout=self.timeout_s)
        self.socket = socket.__enter__()  # closed in close()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.socket is not None
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout_s
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == message_id:
                if message.get("type") == "error":
                    raise RuntimeError(f"{method}: {message.get('error')}: {message.get('message')}")
                return message.get("result", {})
            if message.get("method") == "log.entryAdded" and message["params"].get("level") == "error":
                self.errors.append(message["params"].get("text", ""))

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

    def wait_for(self, expression: str, *, timeout_s: float, interval_s: float = 0.25) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} stayed falsy for {timeout_s} s")
            time.sleep(interval_s)

    def screenshot(self, path: Path) -> Path:
        data = self.call("browsingContext.captureScreenshot", context=self.context)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if self.socket is not None:
            with contextlib.suppress(Exception):
                self.call("session.end")
            with contextlib.suppress(Exception):
                self.socket.close()
            self.socket = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.profile, ignore_errors=True)
