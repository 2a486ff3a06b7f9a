// Audio in and out of the page: the microphone through the capture worklet, reply audio through
// the playback worklet. One AudioContext at the device's own rate; both worklets resample to and
// from the session rate, so Chromium and Firefox behave the same.

/** Why the microphone could not be opened. kind: "denied" | "missing" | "unsupported" | "failed" */
export class MicrophoneError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

const MIC_CONSTRAINTS = {
  audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
  video: false,
};

const AUDIO_START_TIMEOUT_MS = 5000;

export async function createAudioContext() {
  const context = new AudioContext({ latencyHint: "interactive" });
  const base = new URL(".", import.meta.url);
  await context.audioWorklet.addModule(new URL("capture-worklet.js", base));
  await context.audioWorklet.addModule(new URL("playback-worklet.js", base));
  // Firefox never starts a context on a machine without an audio output: say so, do not hang.
  if (context.state !== "running") await withTimeout(context.resume(), AUDIO_START_TIMEOUT_MS);
  return context;
}

function withTimeout(promise, timeoutMs) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error("no audio output device answered")), timeoutMs);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export class Microphone {
  /** onChunk(Int16Array at rateHz), onLevel(rms in [0, 1]) */
  constructor(context, { rateHz, chunkMs = 20, onChunk, onLevel }) {
    this.context = context;
    this.options = { rateHz, chunkMs };
    this.onChunk = onChunk;
    this.onLevel = onLevel;
    this.stream = null;
    this.node = null;
  }

  async open() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new MicrophoneError("unsupported", "This browser gives no microphone access on this page.");
    }
    try {
      this.stream = await navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS);
    } catch (error) {
      throw microphoneError(error);
    }
    const source = this.context.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.context, "capture-processor", {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      channelCount: 1,
      channelCountMode: "explicit",
      processorOptions: { targetRateHz: this.options.rateHz, chunkMs: this.options.chunkMs },
    });
    this.node.port.onmessage = (event) => {
      const message = event.data;
      this.onLevel(message.level);
      if (message.type === "chunk") this.onChunk(message.pcm);
    };
    source.connect(this.node);
  }

  /** Sending off (push-to-talk released) still meters the level. */
  setSending(enabled) {
    if (this.node) this.node.port.postMessage({ type: "enable", enabled });
  }

  get label() {
    const track = this.stream && this.stream.getAudioTracks()[0];
    return track ? track.label : "";
  }

  close() {
    if (this.node) this.node.disconnect();
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    this.node = null;
    this.stream = null;
  }
}

function microphoneError(error) {
  const name = error && error.name;
  if (name === "NotAllowedError" || name === "SecurityError") {
    return new MicrophoneError("denied", "Microphone access was denied.");
  }
  if (name === "NotFoundError" || name === "OverconstrainedError" || name === "DevicesNotFoundError") {
    return new MicrophoneError("missing", "No microphone was found.");
  }
  return new MicrophoneError("failed", `The microphone could not be opened (${name || error}).`);
}

export class Player {
  /**
   * Events: onStarted(itemId, atMs) when an item's first sample is played (atMs on the
   * performance.now() clock, output latency included); onProgress(played) with samples played per
   * item; onDrained(played) when the buffer runs empty.
   */
  constructor(context, { rateHz, prebufferMs = 80, onStarted, onProgress, onDrained }) {
    this.context = context;
    this.rateHz = rateHz;
    this.onStarted = onStarted;
    this.onProgress = onProgress;
    this.onDrained = onDrained;
    this.flushWaiters = [];
    this.node = new AudioWorkletNode(context, "playback-processor", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { sessionRateHz: rateHz, prebufferMs },
    });
    this.node.port.onmessage = (event) => this.receive(event.data);
    this.node.connect(context.destination);
  }

  receive(message) {
    if (message.type === "started") this.onStarted(message.itemId, performance.now() + this.outputLatencyMs());
    else if (message.type === "progress") this.onProgress(message.played);
    else if (message.type === "drained") this.onDrained(message.played);
    else if (message.type === "flushed") {
      for (const resolve of this.flushWaiters.splice(0)) resolve(message.played);
    }
  }

  outputLatencyMs() {
    return 1000 * (this.context.outputLatency || this.context.baseLatency || 0);
  }

  enqueue(itemId, pcm) {
    this.node.port.postMessage({ type: "audio", itemId, pcm }, [pcm.buffer]);
  }

  /** No more audio is coming for now: play out what is buffered even if below the prebuffer. */
  end() {
    this.node.port.postMessage({ type: "end" });
  }

  /** Stop at once; resolves with the samples played per item, for conversation.item.truncate. */
  flush() {
    return new Promise((resolve) => {
      this.flushWaiters.push(resolve);
      this.node.port.postMessage({ type: "flush" });
    });
  }

  samplesToMs(samples) {
    return Math.round((1000 * samples) / this.rateHz);
  }

  close() {
    this.node.disconnect();
  }
}
