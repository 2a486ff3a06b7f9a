// Microphone capture: resample from the AudioContext rate to the session rate, convert to PCM16,
// and post one chunk every `chunkMs` to the main thread (which sends it to the server).
//
// Resampling is a low-pass biquad (cut-off below the target Nyquist frequency, so downsampling
// does not alias) followed by linear interpolation at a fractional read position. That is plenty
// for speech recognition and costs a few operations per sample.

class LowPass {
  // RBJ cookbook low-pass biquad, direct form I.
  constructor(cutoffHz, sampleRateHz) {
    const w0 = (2 * Math.PI * cutoffHz) / sampleRateHz;
    const alpha = Math.sin(w0) / (2 * Math.SQRT1_2);
    const cos = Math.cos(w0);
    const a0 = 1 + alpha;
    this.b0 = (1 - cos) / 2 / a0;
    this.b1 = (1 - cos) / a0;
    this.b2 = this.b0;
    this.a1 = (-2 * cos) / a0;
    this.a2 = (1 - alpha) / a0;
    this.x1 = this.x2 = this.y1 = this.y2 = 0;
  }

  process(x) {
    const y = this.b0 * x + this.b1 * this.x1 + this.b2 * this.x2 - this.a1 * this.y1 - this.a2 * this.y2;
    this.x2 = this.x1;
    this.x1 = x;
    this.y2 = this.y1;
    this.y1 = y;
    return y;
  }
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRateHz, chunkMs } = options.processorOptions;
    this.step = sampleRate / targetRateHz; // input samples per output sample
    // Two cascaded biquads give a steeper slope; a pass-through when not downsampling.
    const cutoffHz = Math.min(targetRateHz, sampleRate) * 0.45;
    this.filters = this.step > 1 ? [new LowPass(cutoffHz, sampleRate), new LowPass(cutoffHz, sampleRate)] : [];
    this.chunk = new Int16Array(Math.round((targetRateHz * chunkMs) / 1000));
    this.filled = 0;
    this.previous = 0; // last filtered input sample of the previous render quantum
    this.position = 0; // fractional read position, relative to `previous` at index -1
    this.sumSquares = 0;
    this.enabled = true;
    this.port.onmessage = (event) => {
      if (event.data.type === "enable") this.enabled = event.data.enabled;
    };
  }

  filter(x) {
    for (const f of this.filters) x = f.process(x);
    return x;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    const filtered = new Float32Array(channel.length);
    for (let i = 0; i < channel.length; i++) filtered[i] = this.filter(channel[i]);
    // Output sample k sits at input position `position`, measured from `previous` (index -1).
    while (this.position < channel.length - 1) {
      const index = Math.floor(this.position);
      const frac = this.position - index;
      const a = index < 0 ? this.previous : filtered[index];
      const b = filtered[index + 1];
      this.emit(a + (b - a) * frac);
      this.position += this.step;
    }
    this.position -= channel.length;
    this.previous = filtered[channel.length - 1];
    return true;
  }

  emit(sample) {
    const clipped = Math.max(-1, Math.min(1, sample));
    this.chunk[this.filled++] = clipped < 0 ? clipped * 0x8000 : clipped * 0x7fff;
    this.sumSquares += clipped * clipped;
    if (this.filled < this.chunk.length) return;
    const level = Math.sqrt(this.sumSquares / this.chunk.length);
    if (this.enabled) {
      const pcm = this.chunk.slice();
      this.port.postMessage({ type: "chunk", pcm, level }, [pcm.buffer]);
    } else {
      this.port.postMessage({ type: "level", level });
    }
    this.filled = 0;
    this.sumSquares = 0;
  }
}

registerProcessor("capture-processor", CaptureProcessor);
