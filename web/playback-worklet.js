// Reply playback: a ring buffer of session-rate samples, a small jitter buffer, and resampling to
// the AudioContext rate by linear interpolation.
//
// Messages in:  {type: "audio", itemId, pcm: Int16Array}   queue reply audio of one item
//               {type: "end"}                              no more audio for now: play what is left
//               {type: "flush"}                            barge-in: drop everything at once
// Messages out: {type: "started", itemId}                  the first sample of an item was played
//               {type: "progress", itemId, played}         every ~50 ms while playing
//               {type: "drained", played}                  the buffer ran empty
//               {type: "flushed", played}                  the answer to "flush"
// `played` maps each item id to the number of its samples played so far.
// Sample counts are at the session rate, so the page can turn them into milliseconds of reply.

const CAPACITY_S = 120;

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { sessionRateHz, prebufferMs } = options.processorOptions;
    this.step = sessionRateHz / sampleRate; // session samples per output sample
    this.prebuffer = Math.round((sessionRateHz * prebufferMs) / 1000);
    this.ring = new Float32Array(sessionRateHz * CAPACITY_S);
    this.written = 0; // absolute index of the next sample to write
    this.read = 0; // absolute fractional read position
    this.items = []; // [{itemId, start}] in order; an item ends where the next one starts
    this.playing = false;
    this.ended = false; // the server sent all audio it has: no need to wait for the prebuffer
    this.startedItems = new Set();
    this.framesSinceProgress = 0;
    this.port.onmessage = (event) => this.receive(event.data);
  }

  receive(message) {
    if (message.type === "audio") this.enqueue(message.itemId, message.pcm);
    else if (message.type === "end") this.ended = true;
    else if (message.type === "flush") this.flush();
  }

  enqueue(itemId, pcm) {
    const last = this.items[this.items.length - 1];
    if (!last || last.itemId !== itemId) this.items.push({ itemId, start: this.written });
    const free = this.ring.length - (this.written - Math.floor(this.read));
    const count = Math.min(pcm.length, free); // never overwrite unplayed audio
    for (let i = 0; i < count; i++) this.ring[(this.written + i) % this.ring.length] = pcm[i] / 0x8000;
    this.written += count;
    this.ended = false;
  }

  playedByItem() {
    const played = {};
    const position = Math.floor(this.read);
    this.items.forEach((item, i) => {
      const end = i + 1 < this.items.length ? this.items[i + 1].start : this.written;
      played[item.itemId] = Math.max(0, Math.min(position, end) - item.start);
    });
    return played;
  }

  currentItem() {
    const position = Math.floor(this.read);
    for (let i = this.items.length - 1; i >= 0; i--) if (this.items[i].start <= position) return this.items[i];
    return null;
  }

  flush() {
    this.port.postMessage({ type: "flushed", played: this.playedByItem() });
    this.read = this.written;
    this.items = [];
    this.playing = false;
  }

  sample(position) {
    const index = Math.floor(position);
    const frac = position - index;
    const a = this.ring[index % this.ring.length];
    const b = index + 1 < this.written ? this.ring[(index + 1) % this.ring.length] : a;
    return a + (b - a) * frac;
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    const buffered = this.written - this.read;
    if (!this.playing && buffered > 0 && (buffered >= this.prebuffer || this.ended)) this.playing = true;
    if (!this.playing) return true;
    this.announceStart();
    let i = 0;
    for (; i < out.length && this.read < this.written; i++) {
      out[i] = this.sample(this.read);
      this.read += this.step;
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (this.read >= this.written) this.drain();
    this.reportProgress(out.length);
    return true;
  }

  announceStart() {
    const item = this.currentItem();
    if (item && !this.startedItems.has(item.itemId)) {
      this.startedItems.add(item.itemId);
      this.port.postMessage({ type: "started", itemId: item.itemId });
    }
  }

  drain() {
    this.read = this.written;
    this.playing = false;
    this.port.postMessage({ type: "drained", played: this.playedByItem() });
  }

  reportProgress(frames) {
    this.framesSinceProgress += frames;
    if (this.framesSinceProgress < sampleRate / 20) return;
    this.framesSinceProgress = 0;
    const item = this.currentItem();
    if (item) this.port.postMessage({ type: "progress", itemId: item.itemId, played: this.playedByItem() });
  }
}

registerProcessor("playback-processor", PlaybackProcessor);
