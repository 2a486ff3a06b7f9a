"""The web demo end to end: `voice-agent serve` with the embedded models, headless Chromium with
espeak-ng speech as its microphone, and the page's own state read over the DevTools protocol.

Checks what a person would see: their words as a transcript, the reply heard (audio played by
the page's playback worklet), and a turn in the latency waterfall. Saves a screenshot under
artifacts/web/.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_process import stop_process, watch_lines
from chromium_cdp import Chromium
from conftest import speak

pytestmark = [pytest.mark.browser, pytest.mark.slow]

STATE = "window.voiceAgent.state()"
STARTUP_TIMEOUT_S = 240  # model loading on a busy CPU
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`voice-agent serve` on a free port with a throw-away call store; yields the demo URL."""
    folder = tmp_path_factory.mktemp("server")
    env = {k: v for k, v in os.environ.items() if k != "VOICE_AGENT_TOKEN"}
    command = [sys.executable, "-m", "voice_agent", "serve", "--port", "0", "--host", "127.0.0.1",
               "--set", f"store.path={folder / 'calls.db'}"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert process.stdout is not None
    lines: list[str] = []
    found, url = watch_lines(process.stdout, r"demo at (http://\S+)", lines)
    try:
        if not found.wait(STARTUP_TIMEOUT_S):
            pytest.fail(
                f"voice-agent serve did not start in {STARTUP_TIMEOUT_S} s:\n{''.join(lines)[-3000:]}"
            )
        yield url[0].replace("localhost", "127.0.0.1")
    finally:
        stop_process(process, timeout_s=20)
        print("".join(lines)[-3000:])  # the server's log, shown by pytest where the test failed


def test_spoken_turn_through_the_real_server(
    chromium: str, server_url: str, tmp_path: Path, artifacts: Path
) -> None:
    wav = speak(QUESTION, tmp_path / "question.wav", lead_s=1.5, tail_s=3.0)
    with Chromium(server_url, fake_audio=wav) as browser:
        browser.wait_for_load()
        browser.evaluate("document.getElementById('trace-toggle').click()", gesture=True)
        browser.evaluate("document.getElementById('start').click()", gesture=True)
        started = time.monotonic()
        try:
            transcript = browser.wait_for(
                f"{STATE}.transcripts.user.map(u => u.final).join(' ')", timeout_s=60
            )
            browser.wait_for(f"{STATE}.playback.playedMs > 500", timeout_s=60)
            state = browser.wait_for(
                f"{STATE}.waterfall.turns.some(t => t.played_first_audio_ms > 0) && {STATE}", timeout_s=60
            )
        finally:
            shot = browser.screenshot(artifacts / "e2e-real-server.png")
            print(f"screenshot: {shot}; console: {browser.console[-10:]}")
        exceptions = browser.exceptions()
        print(f"turn took {time.monotonic() - started:.1f} s; state: {state}")
    words = transcript.lower()
    assert "capital" in words or "france" in words, transcript
    assert state["transcripts"]["agent"] and state["transcripts"]["agent"][0]["text"].strip()
    assert state["playback"]["startedResponses"] >= 1
    turn = next(t for t in state["waterfall"]["turns"] if t.get("played_first_audio_ms"))
    for stage in ("asr_final_ms", "llm_first_text_ms", "tts_first_audio_ms"):
        assert turn.get(stage) is not None, f"{stage} missing from {turn}"
    assert turn["played_first_audio_ms"] >= turn["tts_first_audio_ms"]
    assert not state["errors"], state["errors"]
    assert not exceptions, exceptions


def test_push_to_talk_interrupts_a_typed_reply(
    chromium: str, server_url: str, tmp_path: Path, artifacts: Path
) -> None:
    """Barge-in by hand: the reply stops, the caption is cut, the server acknowledges the truncate."""
    wav = speak("Stop please.", tmp_path / "stop.wav", lead_s=0.5, tail_s=1.0)
    space = {"key": " ", "code": "Space", "windowsVirtualKeyCode": 32}
    with Chromium(server_url, fake_audio=wav) as browser:
        browser.wait_for_load()
        browser.evaluate("document.querySelector('input[value=ptt]').click()", gesture=True)
        browser.submit_text("Tell me a long story about a cat in Paris.")
        try:
            browser.wait_for(f"{STATE}.playback.playedMs > 1000", timeout_s=60)
            browser.evaluate("document.getElementById('start').click()", gesture=True)  # the microphone
            browser.wait_for(f"{STATE}.microphone", timeout_s=10)
            # Press while a received part of the reply is still unheard: on a loaded CPU the reply
            # can pause between sentences (all of it heard), and a barge-in there cuts nothing.
            agent = f"{STATE}.transcripts.agent[0]"
            browser.wait_for(f"{agent}.heard.length < {agent}.text.length", timeout_s=60)
            browser.call("Input.dispatchKeyEvent", type="keyDown", **space)
            browser.wait_for(f"{STATE}.transcripts.agent[0].interrupted", timeout_s=5)
            time.sleep(2.0)  # "stop please" plays from the fake microphone
            browser.call("Input.dispatchKeyEvent", type="keyUp", **space)
            state = browser.wait_for(f"{STATE}.transcripts.user.length >= 2 && {STATE}", timeout_s=30)
        finally:
            browser.screenshot(artifacts / "e2e-push-to-talk-barge-in.png")
        exceptions = browser.exceptions()
    reply = state["transcripts"]["agent"][0]
    assert reply["heard"] and reply["heard"] != reply["text"], reply
    assert state["events"].get("output_audio_buffer.cleared") == 1
    assert state["events"].get("conversation.item.truncated") == 1
    assert "stop" in state["transcripts"]["user"][1]["final"].lower()
    assert not state["errors"], state["errors"]
    assert not exceptions, exceptions
