// The per-turn latency waterfall: every stage in milliseconds from the end of the user's speech,
// the latest turn in full, the previous turns as small stacked bars, and running medians.

/**
 * The stages in pipeline order. `key` is the field of the server's metrics event, except
 * `played_first_audio_ms`, which the page measures itself (audio sent + the browser's buffering).
 */
export const STAGES = [
  { key: "asr_final_ms", label: "Final transcript" },
  { key: "llm_first_text_ms", label: "First LLM text" },
  { key: "tts_first_audio_ms", label: "First TTS audio" },
  { key: "played_first_audio_ms", label: "First audio played" },
];

const HISTORY_ROWS = 8;

export class Waterfall {
  constructor(root) {
    this.root = root;
    this.turns = []; // [{id, values: {key: ms | null}}]
    this.table = root.querySelector(".waterfall-latest tbody");
    this.history = root.querySelector(".waterfall-history");
    this.medianOutput = root.querySelector(".waterfall-median");
    this.caption = root.querySelector(".waterfall-turn");
    this.passes = root.querySelector(".waterfall-passes");
  }

  /** Merge values into turn `id` (server metrics and the browser's own playback time). */
  update(id, values) {
    let turn = this.turns.find((t) => t.id === id);
    if (!turn) {
      turn = { id, values: {} };
      this.turns.push(turn);
    }
    for (const [key, value] of Object.entries(values)) {
      if (typeof value === "number" && Number.isFinite(value)) turn.values[key] = value;
    }
    if (typeof values.speculative === "string") turn.speculative = values.speculative;
    this.render();
  }

  medians() {
    const result = {};
    for (const { key } of STAGES) {
      result[key] = median(this.turns.map((t) => t.values[key]).filter((v) => v !== undefined));
    }
    return result;
  }

  render() {
    const complete = this.turns.filter((t) => Object.keys(t.values).length > 0);
    if (complete.length === 0) return;
    this.root.classList.add("has-data");
    const latest = complete[complete.length - 1];
    const scaleMs = niceCeiling(Math.max(...complete.slice(-HISTORY_ROWS).map(turnEnd), 100));
    this.caption.textContent = `Turn ${complete.length}, ms after you stopped speaking`;
    this.renderLatest(latest, scaleMs);
    this.renderHistory(complete.slice(-HISTORY_ROWS), scaleMs);
    this.renderMedian();
    this.renderPasses(latest);
  }

  /** The diffusion model's point: more than one token per forward pass. */
  renderPasses(turn) {
    const { tokens, forward_passes: passes } = turn.values;
    if (!tokens || !passes) return;
    const perPass = (tokens / passes).toFixed(2);
    let text = `Reply: ${tokens} tokens in ${passes} forward passes (${perPass} per pass)`;
    const speculative = turn.speculative;
    if (speculative === "hit" || speculative === "miss") text += ` · speculative start: ${speculative}`;
    this.passes.textContent = text;
  }

  renderLatest(turn, scaleMs) {
    let previous = 0;
    const rows = STAGES.map((stage, index) => {
      const value = turn.values[stage.key];
      const row = document.createElement("tr");
      row.className = `stage-${index}`;
      const bar = document.createElement("div");
      bar.className = "bar";
      if (value !== undefined) {
        const start = Math.min(previous, value);
        bar.style.left = percent(start, scaleMs);
        bar.style.width = percent(Math.max(value - start, scaleMs / 200), scaleMs);
        previous = Math.max(previous, value);
      }
      row.append(cell("th", stage.label), cell("td", bar, "track"), cell("td", formatMs(value), "ms"));
      return row;
    });
    this.table.replaceChildren(...rows, axisRow(scaleMs));
  }

  renderHistory(turns, scaleMs) {
    const items = turns.map((turn) => {
      const item = document.createElement("li");
      let previous = 0;
      for (const [index, stage] of STAGES.entries()) {
        const value = turn.values[stage.key];
        if (value === undefined || value < previous) continue;
        const segment = document.createElement("span");
        segment.className = `segment stage-${index}`;
        segment.style.left = percent(previous, scaleMs);
        segment.style.width = percent(value - previous, scaleMs);
        item.append(segment);
        previous = value;
      }
      item.title = STAGES.map((s) => `${s.label}: ${formatMs(turn.values[s.key])}`).join(", ");
      return item;
    });
    this.history.replaceChildren(...items);
  }

  renderMedian() {
    const medians = this.medians();
    const last = [...STAGES].reverse().find((stage) => medians[stage.key] !== undefined);
    if (!last) return;
    const count = this.turns.filter((t) => t.values[last.key] !== undefined).length;
    this.medianOutput.textContent = `Median ${last.label.toLowerCase()}: ${formatMs(medians[last.key])} over ${count} turn${count === 1 ? "" : "s"}`;
  }

  snapshot() {
    return { turns: this.turns.map((t) => ({ id: t.id, ...t.values })), medians: this.medians() };
  }
}

function turnEnd(turn) {
  return Math.max(0, ...STAGES.map((stage) => turn.values[stage.key] ?? 0));
}

function median(values) {
  if (values.length === 0) return undefined;
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

/** 1, 2 or 5 times a power of ten, at least `value`: a scale people can read at a glance. */
function niceCeiling(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function percent(value, scale) {
  return `${Math.max(0, Math.min(100, (100 * value) / scale)).toFixed(2)}%`;
}

function formatMs(value) {
  return value === undefined ? "—" : `${Math.round(value)} ms`;
}

/** 0 (the end of the user's speech) on the left, the scale on the right, under the bars. */
function axisRow(scaleMs) {
  const row = document.createElement("tr");
  row.className = "axis";
  const labels = document.createElement("div");
  labels.append(textSpan("end of speech"), textSpan(`${scaleMs} ms`));
  row.append(cell("th", ""), cell("td", labels, "axis-labels"), cell("td", ""));
  return row;
}

function textSpan(text) {
  const element = document.createElement("span");
  element.textContent = text;
  return element;
}

function cell(tag, content, className) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (tag === "th") element.scope = "row";
  element.append(content);
  return element;
}
