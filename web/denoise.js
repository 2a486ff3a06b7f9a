// The reply forming as the diffusion LLM denoises it: the slots of the current block, masked ones
// shown as empty tiles, filling in step by step. Fed by the opt-in denoising trace events.
//
// Steps can arrive faster than anyone can see (a GPU does a step in milliseconds), so they are
// replayed at most one per FRAME_MS; when the backlog grows, intermediate steps are skipped.

const FRAME_MS = 70;
const MAX_BACKLOG = 12;
const SPECIAL_TOKEN = /^<\|.*\|>$|^<\/?s>$/; // end-of-turn and similar markers, drawn faint

export class DenoiseView {
  constructor(root) {
    this.root = root;
    this.slots = root.querySelector(".slots");
    this.committed = root.querySelector(".denoise-committed");
    this.stepOutput = root.querySelector(".denoise-step");
    this.queue = []; // [{event}] steps to show, or [{commit: text}] a finished block (never skipped)
    this.timer = null;
    this.received = null; // the last step received
    this.shown = null; // the last step shown
    this.steps = 0;
  }

  /** One voice_agent.denoise_step event: {turn_id, response_id, item_id, step, block_start, tokens, mask}. */
  push(event) {
    const last = this.received;
    if (last && startsBlock(last, event)) this.queue.push({ commit: blockText(last) });
    this.received = event;
    this.queue.push({ event });
    this.trim();
    if (!this.timer) this.next();
  }

  /** Skip the oldest steps when they arrive faster than they are shown. */
  trim() {
    let steps = this.queue.filter((entry) => entry.event).length;
    for (let i = 0; i < this.queue.length && steps > MAX_BACKLOG; ) {
      if (this.queue[i].event) {
        this.queue.splice(i, 1);
        steps -= 1;
      } else {
        i += 1;
      }
    }
  }

  next() {
    let entry = this.queue.shift();
    while (entry && entry.commit !== undefined) {
      this.committed.textContent += entry.commit;
      this.shown = null;
      entry = this.queue.shift();
    }
    if (!entry) {
      this.timer = null;
      return;
    }
    this.show(entry.event);
    this.timer = setTimeout(() => this.next(), FRAME_MS);
  }

  /** A new reply: clear the view. */
  reset() {
    clearTimeout(this.timer);
    this.timer = null;
    this.queue = [];
    this.received = null;
    this.shown = null;
    this.committed.textContent = "";
    this.slots.replaceChildren();
    this.stepOutput.textContent = "";
  }

  show(event) {
    const tokens = event.tokens;
    const before = this.shown ? this.shown.tokens : [];
    this.slots.replaceChildren(...tokens.map((token, i) => tile(token, maskOf(event), before[i])));
    const filled = tokens.filter((t) => t !== maskOf(event)).length;
    this.steps += 1;
    this.stepOutput.textContent = `forward pass ${event.step} · ${filled} of ${tokens.length} slots filled`;
    this.shown = event;
    this.root.classList.add("has-data");
  }

  snapshot() {
    return { steps: this.steps, tokens: this.shown ? this.shown.tokens : [], committed: this.committed.textContent };
  }
}

function maskOf(event) {
  return event.mask || "<mask>";
}

function blockText(event) {
  return event.tokens.filter((t) => t !== maskOf(event)).join("");
}

/** A new block began: `block_start` changed where the server sends it, else inferred from the slots. */
function startsBlock(last, event) {
  if (Number.isInteger(last.block_start) && Number.isInteger(event.block_start)) {
    return event.block_start !== last.block_start;
  }
  return !continues(last.tokens, event.tokens, maskOf(event));
}

/** Within a block a committed slot never changes: any change means the next block began. */
function continues(before, after, mask) {
  return before.length === after.length && before.every((token, i) => token === mask || token === after[i]);
}

function tile(token, mask, before) {
  const element = document.createElement("span");
  if (token === mask) {
    element.className = "slot masked";
    element.setAttribute("aria-label", "masked");
    return element;
  }
  element.className = before === token ? "slot filled" : "slot filled new";
  if (SPECIAL_TOKEN.test(token)) element.classList.add("special");
  element.textContent = visibleToken(token);
  return element;
}

/** Leading spaces and newlines made visible, so word boundaries show inside the tiles. */
function visibleToken(token) {
  return token.replace(/\n/g, "⏎").replace(/^ /, "·") || "·";
}
