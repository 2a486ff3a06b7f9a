// Live captions: the user's partial and final transcript, the agent's reply as it streams, the part
// of the reply already heard, and where an interrupted reply was cut.

/** A user turn: partial hypothesis (grey, italic) replaced by the final transcript. */
class UserCaption {
  constructor(list, { typed = false } = {}) {
    this.final = "";
    this.partial = "";
    this.element = bubble(list, "user", typed ? "You (typed)" : "You");
    this.textElement = this.element.querySelector(".text");
  }

  setPartial(text) {
    this.partial = text;
    this.render();
  }

  setFinal(text) {
    this.final = text;
    this.partial = "";
    this.render();
  }

  render() {
    const final = this.final || "";
    const partial = this.final ? "" : this.partial;
    this.textElement.replaceChildren(span("final", final), span("partial", partial));
    this.element.classList.toggle("pending", !this.final);
  }
}

/**
 * An agent reply. Text arrives in segments, each followed by its audio; knowing the samples of
 * each segment, the samples played tell how much of the text was heard.
 */
class AgentCaption {
  constructor(list, { audio }) {
    this.segments = []; // [{text, samples}]
    this.audio = audio;
    this.played = 0;
    this.interrupted = false;
    this.truncated = false; // the server was told how much was heard
    this.done = false;
    this.element = bubble(list, "agent", "Agent");
    this.textElement = this.element.querySelector(".text");
  }

  addText(text) {
    const last = this.segments[this.segments.length - 1];
    if (last && last.samples === 0) last.text += text;
    else this.segments.push({ text, samples: 0 });
    this.render();
  }

  addAudio(samples) {
    if (this.segments.length === 0) this.segments.push({ text: "", samples: 0 });
    this.segments[this.segments.length - 1].samples += samples;
  }

  setPlayed(samples) {
    this.played = Math.max(this.played, samples);
    this.render();
  }

  get samples() {
    return this.segments.reduce((sum, segment) => sum + segment.samples, 0);
  }

  get text() {
    return this.segments.map((segment) => segment.text).join("");
  }

  /** Characters of the text heard so far, cut back to a word boundary inside a segment. */
  heardChars() {
    if (!this.audio) return this.text.length;
    let chars = 0;
    let left = this.played;
    for (const { text, samples } of this.segments) {
      if (samples > 0 && left >= samples) {
        chars += text.length;
        left -= samples;
        continue;
      }
      const fraction = samples > 0 ? left / samples : 0;
      return chars + wordBoundary(text, Math.floor(text.length * fraction));
    }
    return chars;
  }

  /** Barge-in: keep what was heard, strike out the rest. */
  interrupt(playedSamples) {
    if (playedSamples !== undefined) this.played = playedSamples;
    this.interrupted = true;
    this.done = true;
    this.render();
  }

  finish({ cancelled = false } = {}) {
    this.done = true;
    if (cancelled) this.interrupted = true;
    this.render();
  }

  render() {
    const text = this.text;
    const heard = this.done && !this.interrupted ? text.length : this.heardChars();
    const children = [span("heard", text.slice(0, heard))];
    const rest = text.slice(heard);
    if (this.interrupted) {
      if (rest) children.push(span("cut", rest));
      children.push(marker());
    } else if (rest) {
      children.push(span("unheard", rest));
    }
    this.textElement.replaceChildren(...children);
    this.element.classList.toggle("interrupted", this.interrupted);
    this.element.classList.toggle("pending", !this.done);
  }
}

export class Conversation {
  constructor(list) {
    this.list = list;
    this.users = new Map(); // item id -> UserCaption
    this.agents = new Map(); // response id -> AgentCaption
  }

  user(itemId, options) {
    if (!this.users.has(itemId)) this.users.set(itemId, this.follow(() => new UserCaption(this.list, options)));
    return this.users.get(itemId);
  }

  dropUser(itemId) {
    const caption = this.users.get(itemId);
    if (caption) caption.element.remove();
    this.users.delete(itemId);
  }

  agent(responseId, options = { audio: true }) {
    if (!this.agents.has(responseId)) {
      this.agents.set(responseId, this.follow(() => new AgentCaption(this.list, options)));
    }
    return this.agents.get(responseId);
  }

  /** Build a caption and keep the newest line in view if the reader was already at the bottom. */
  follow(build) {
    const scroller = this.list.parentElement;
    const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 48;
    const caption = build();
    this.list.closest(".conversation").classList.add("started");
    if (atBottom) this.scrollToEnd();
    return caption;
  }

  scrollToEnd() {
    const scroller = this.list.parentElement;
    scroller.scrollTop = scroller.scrollHeight;
  }

  /** The transcripts, for the test hook. */
  snapshot() {
    return {
      user: [...this.users.values()].map((c) => ({ final: c.final, partial: c.partial })),
      agent: [...this.agents.values()].map((c) => ({
        text: c.text,
        heard: c.text.slice(0, c.heardChars()),
        interrupted: c.interrupted,
        done: c.done,
      })),
    };
  }
}

function bubble(list, role, label) {
  const item = document.createElement("li");
  item.className = `turn ${role} pending`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = label;
  const text = document.createElement("p");
  text.className = "text";
  item.append(who, text);
  list.append(item);
  return item;
}

function span(className, text) {
  const element = document.createElement("span");
  element.className = className;
  element.textContent = text;
  return element;
}

function marker() {
  const element = span("cut-marker", "interrupted");
  element.setAttribute("aria-label", "reply interrupted here");
  return element;
}

/** The last word boundary at or before `index` (0 when the first word is not finished). */
function wordBoundary(text, index) {
  if (index >= text.length) return text.length;
  const space = text.lastIndexOf(" ", index);
  return space < 0 ? 0 : space + 1;
}
