"""The page's logic in headless Chromium against a model-free stand-in server (fake_realtime.py).

Fast checks of what the real end-to-end test cannot provoke cheaply: barge-in with the truncate
acknowledgement, the denoising view, and every error state (token, full, unreachable, denied).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from chromium_cdp import Chromium
from conftest import read_wav, speak, write_wav
from fake_realtime import MODELS, STALE_TOKEN, FakeOptions, fake_server

pytestmark = pytest.mark.browser

STATE = "window.voiceAgent.state()"


@pytest.fixture(scope="module")
def two_utterances(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """'hello there', a pause long enough for the reply to start, then speech over the reply."""
    folder = tmp_path_factory.mktemp("speech")
    first, rate_hz = read_wav(speak("hello there", folder / "first.wav", lead_s=1.0, tail_s=1.6))
    second, _ = read_wav(speak("wait a moment", folder / "second.wav", lead_s=0.0, tail_s=2.0))
    path = folder / "two.wav"
    write_wav(path, np.concatenate([first, second]), rate_hz)
    return path


def test_conversation_barge_in_and_denoising(chromium: str, two_utterances: Path, artifacts: Path) -> None:
    with fake_server() as server, Chromium(server.url, fake_audio=two_utterances) as browser:
        browser.wait_for_load()
        browser.evaluate("document.getElementById('trace-toggle').click()", gesture=True)
        browser.evaluate("document.getElementById('start').click()", gesture=True)
        try:
            browser.wait_for(f"{STATE}.transcripts.agent.some(a => a.interrupted)", timeout_s=30)
            state = browser.wait_for(f"{STATE}.waterfall.turns.length >= 1 && {STATE}", timeout_s=15)
        finally:
            browser.screenshot(artifacts / "fake-barge-in.png")
        assert state["transcripts"]["user"][0]["final"] == "hello there"
        interrupted = next(a for a in state["transcripts"]["agent"] if a["interrupted"])
        assert interrupted["heard"] != interrupted["text"], "the cut must fall inside the reply"
        assert state["playback"]["playedMs"] > 0
        assert state["denoise"]["steps"] >= 1
        # The first block is committed when block_start changes; the late step of the interrupted
        # reply (another response_id), sent after the second reply began, is never shown.
        state = browser.wait_for(
            f"{STATE}.transcripts.agent.length >= 2 && {STATE}.transcripts.agent[1].done && {STATE}",
            timeout_s=15,
        )
        assert state["denoise"]["committed"] == "Hi, nice to hear you. This", state["denoise"]
        assert state["denoise"]["tokens"][:4] == [" is", " a", " fake", " reply"], state["denoise"]
        assert STALE_TOKEN not in state["denoise"]["tokens"]
        assert state["models"] == MODELS
        assert browser.evaluate("document.getElementById('models').textContent") == (
            "ASR fake · LLM fake-dllm · TTS tone"
        )
        truncates = server.calls[0].truncates
        assert truncates, "barge-in must be acknowledged with conversation.item.truncate"
        assert 0 < truncates[0]["audio_end_ms"] < 3000
        assert not browser.exceptions()


def test_typing_then_push_to_talk(chromium: str, two_utterances: Path, artifacts: Path) -> None:
    with fake_server() as server, Chromium(server.url, fake_audio=two_utterances) as browser:
        browser.wait_for_load()
        browser.submit_text("hi by text")
        state = browser.wait_for(f"{STATE}.waterfall.turns.length >= 1 && {STATE}", timeout_s=20)
        assert state["transcripts"]["user"][0]["final"] == "hi by text"
        assert state["transcripts"]["agent"][0]["done"]
        assert state["microphone"] is None, "typing must not open the microphone"

        browser.evaluate("document.querySelector('input[value=ptt]').click()", gesture=True)
        browser.evaluate("document.getElementById('start').click()", gesture=True)  # opens the microphone
        browser.wait_for(f"{STATE}.microphone", timeout_s=10)
        space = {"key": " ", "code": "Space", "windowsVirtualKeyCode": 32}
        browser.call("Input.dispatchKeyEvent", type="keyDown", **space)
        browser.wait_for(f"{STATE}.phase === 'hearing'", timeout_s=5)
        time.sleep(1.0)  # a press shorter than 200 ms is a tap and commits nothing
        browser.call("Input.dispatchKeyEvent", type="keyUp", **space)
        state = browser.wait_for(f"{STATE}.waterfall.turns.length >= 2 && {STATE}", timeout_s=20)
        assert [u["final"] for u in state["transcripts"]["user"]] == ["hi by text", "hello there"]
        assert server.calls[0].commits == 1
        assert not server.calls[0].server_vad
        browser.screenshot(artifacts / "fake-typed-then-push-to-talk.png")


@pytest.mark.parametrize(
    ("options", "kind"),
    [(FakeOptions(token="secret"), "token"), (FakeOptions(full=True), "full")],
    ids=["token", "full"],
)
def test_refusals_are_explained(chromium: str, options: FakeOptions, kind: str, artifacts: Path) -> None:
    with fake_server(options) as server, Chromium(server.url) as browser:
        browser.wait_for_load()
        browser.evaluate("document.getElementById('start').click()", gesture=True)
        assert browser.wait_for(f"{STATE}.notice", timeout_s=10) == kind
        browser.screenshot(artifacts / f"fake-notice-{kind}.png")
        if kind == "token":
            browser.evaluate(
                "document.getElementById('token-input').value = 'secret';"
                "document.getElementById('token-form').requestSubmit()",
                gesture=True,
            )
            browser.wait_for(f"{STATE}.connected", timeout_s=10)


def test_denied_microphone_then_lost_and_unreachable_server(chromium: str, artifacts: Path) -> None:
    server_context = fake_server()
    server = server_context.__enter__()
    with Chromium(server.url, deny_microphone=True) as browser:
        try:
            browser.wait_for_load()
            browser.evaluate("document.getElementById('start').click()", gesture=True)
            assert browser.wait_for(f"{STATE}.notice", timeout_s=10) == "denied"
            assert browser.evaluate(f"{STATE}.connected"), "typing still works without a microphone"
            browser.screenshot(artifacts / "fake-notice-denied.png")
        finally:
            server_context.__exit__(None, None, None)
        # The page stays open; the server is gone.
        assert browser.wait_for(f"{STATE}.notice === 'closed' && {STATE}.notice", timeout_s=10)
        browser.evaluate("document.getElementById('start').click()", gesture=True)
        assert browser.wait_for(f"{STATE}.notice === 'unreachable' && {STATE}.notice", timeout_s=10)
        browser.screenshot(artifacts / "fake-notice-unreachable.png")
