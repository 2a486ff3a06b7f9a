"""The two AudioWorklets, run inside headless Chromium: resampling, jitter buffer, barge-in counts."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from chromium_cdp import Chromium
from fake_realtime import fake_server

pytestmark = pytest.mark.browser

# 1 s of a tone through the capture worklet in an OfflineAudioContext at 48 kHz -> 24 kHz PCM16.
CAPTURE = """
(async (frequencyHz) => {
  const context = new OfflineAudioContext(1, 48000, 48000);
  await context.audioWorklet.addModule("capture-worklet.js");
  const node = new AudioWorkletNode(context, "capture-processor", {
    numberOfInputs: 1, numberOfOutputs: 0,
    processorOptions: { targetRateHz: 24000, chunkMs: 20 },
  });
  const samples = [];
  node.port.onmessage = (event) => { if (event.data.type === "chunk") samples.push(...event.data.pcm); };
  const tone = new OscillatorNode(context, { frequency: frequencyHz });
  tone.connect(new GainNode(context, { gain: 0.5 })).connect(node);
  tone.start();
  await context.startRendering();
  await new Promise((resolve) => setTimeout(resolve, 300));  // the last port messages
  return samples;
})(%s)
"""

# Reply audio through the playback worklet on the real-time context; returns its reports.
PLAYBACK = """
(async (seconds, flushAfterMs) => {
  const context = new AudioContext();
  await context.audioWorklet.addModule("playback-worklet.js");
  await context.resume();
  const node = new AudioWorkletNode(context, "playback-processor", {
    numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
    processorOptions: { sessionRateHz: 24000, prebufferMs: 80 },
  });
  node.connect(context.destination);
  const reports = [];
  const done = new Promise((resolve) => {
    node.port.onmessage = (event) => {
      reports.push(event.data);
      if (event.data.type === "drained" || event.data.type === "flushed") resolve();
    };
  });
  const pcm = new Int16Array(Math.round(24000 * seconds));
  for (let i = 0; i < pcm.length; i++) pcm[i] = 8000 * Math.sin((2 * Math.PI * 300 * i) / 24000);
  node.port.postMessage({ type: "audio", itemId: "a", pcm });
  node.port.postMessage({ type: "end" });
  if (flushAfterMs !== null) setTimeout(() => node.port.postMessage({ type: "flush" }), flushAfterMs);
  await done;
  await context.close();
  return reports;
})(%s, %s)
"""


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Chromium]:
    with fake_server() as server, Chromium(server.url) as browser:
        browser.wait_for_load()
        yield browser


def dominant_hz(samples: np.ndarray, rate_hz: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate_hz)[np.argmax(spectrum)])


def test_capture_resamples_48k_to_24k_pcm16(browser: Chromium) -> None:
    samples = np.array(browser.evaluate(CAPTURE % 440), dtype=np.float64) / 32768
    assert 23000 <= len(samples) <= 24000  # 1 s at 24 kHz, in whole 20 ms chunks
    steady = samples[2400:]  # after the filters settle
    assert abs(dominant_hz(steady, 24000) - 440) < 3
    assert np.sqrt(np.mean(steady**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


def test_capture_filters_what_would_alias(browser: Chromium) -> None:
    # 18 kHz cannot be represented at 24 kHz; unfiltered it would fold down to 6 kHz.
    samples = np.array(browser.evaluate(CAPTURE % 18000), dtype=np.float64)[2400:] / 32768
    assert np.sqrt(np.mean(samples**2)) < 0.25 * (0.5 / np.sqrt(2))


def test_playback_plays_everything_then_reports_drained(browser: Chromium) -> None:
    reports = browser.evaluate(PLAYBACK % (0.5, "null"))
    kinds = [r["type"] for r in reports]
    assert kinds[0] == "started" and kinds[-1] == "drained"
    assert reports[-1]["played"]["a"] == 12000


def test_playback_flush_stops_at_once_and_counts_what_was_heard(browser: Chromium) -> None:
    reports = browser.evaluate(PLAYBACK % (3.0, 400))
    assert reports[-1]["type"] == "flushed"
    played_ms = 1000 * reports[-1]["played"]["a"] / 24000
    assert 100 < played_ms < 1500, played_ms  # about 400 ms, with slack for a busy machine
