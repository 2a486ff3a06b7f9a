// The /v1/realtime client: JSON events over one WebSocket, the same protocol as every other client
// (docs/protocol.md). It knows framing and connection errors, nothing about audio or the page.

/** Why a connection failed or ended, in words a person can act on. */
export class ConnectionError extends Error {
  /** kind: "unreachable" | "token" | "full" | "closed" */
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

const TOKEN_CODES = new Set(["unauthorized", "invalid_token", "token_required", "forbidden"]);
const FULL_CODES = new Set(["server_full", "too_many_calls", "busy", "capacity"]);

/** Classify a server `error` event or a close reason into a ConnectionError kind, or null. */
export function errorKind(code, closeCode) {
  const text = String(code || "").toLowerCase();
  if (TOKEN_CODES.has(text) || closeCode === 4001 || closeCode === 4401) return "token";
  if (FULL_CODES.has(text) || closeCode === 1013 || closeCode === 4503) return "full";
  return null;
}

export function realtimeUrl(token, location = window.location) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = new URL(`${scheme}//${location.host}/v1/realtime`);
  if (token) url.searchParams.set("token", token);
  return url.toString();
}

export class RealtimeConnection {
  constructor() {
    this.socket = null;
    this.handlers = new Map();
    this.onclose = () => {};
    this.nextEventId = 1;
  }

  /** Register `handler(event)` for one server event type; "*" receives every event. */
  on(type, handler) {
    if (!this.handlers.has(type)) this.handlers.set(type, []);
    this.handlers.get(type).push(handler);
    return this;
  }

  /** Open the socket and wait for the server's first event (session.created) or a refusal. */
  connect(url) {
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(url);
      this.socket = socket;
      let settled = false;
      const settle = (error) => {
        if (settled) return;
        settled = true;
        if (error) reject(error);
        else resolve();
      };
      socket.onmessage = (message) => {
        const event = parseEvent(message.data);
        if (!event) return;
        const kind = event.type === "error" ? errorKind(event.error && event.error.code) : null;
        if (kind) settle(new ConnectionError(kind, event.error.message || ""));
        else if (event.type === "session.created") settle();
        this.dispatch(event);
      };
      socket.onclose = async (close) => {
        this.socket = null;
        const kind = errorKind(close.reason, close.code);
        if (settled) this.onclose(new ConnectionError(kind || "closed", close.reason || ""));
        else settle(kind ? new ConnectionError(kind, close.reason || "") : await probeRefusal(url));
      };
    });
  }

  dispatch(event) {
    for (const handler of this.handlers.get(event.type) || []) handler(event);
    for (const handler of this.handlers.get("*") || []) handler(event);
  }

  get open() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  /** Send one client event; returns its event_id, or null when the socket is not open. */
  send(type, fields = {}) {
    if (!this.open) return null;
    const eventId = `evt_web_${this.nextEventId++}`;
    this.socket.send(JSON.stringify({ type, event_id: eventId, ...fields }));
    return eventId;
  }

  close() {
    if (this.socket) this.socket.close(1000, "bye");
    this.socket = null;
  }
}

/**
 * A browser cannot read the HTTP status of a refused WebSocket handshake, so ask the same URL
 * over plain HTTP: the server runs the same checks before the upgrade and answers 401 (token),
 * 503 / 429 (full), or 426 (the checks passed: the WebSocket itself failed). A server that
 * accepts and then closes with 1013 ("try again later") is recognized in `errorKind`.
 */
async function probeRefusal(url) {
  let response;
  try {
    response = await fetch(url.replace(/^ws/, "http"), { cache: "no-store" });
  } catch {
    return new ConnectionError("unreachable", "");
  }
  const detail = await response.text().catch(() => "");
  const message = `HTTP ${response.status}${detail ? `: ${detail.slice(0, 200)}` : ""}`;
  if (response.status === 401) return new ConnectionError("token", "");
  if (response.status === 503 || response.status === 429) return new ConnectionError("full", "");
  return new ConnectionError("unreachable", message);
}

function parseEvent(data) {
  try {
    const event = JSON.parse(data);
    return event && typeof event.type === "string" ? event : null;
  } catch {
    return null;
  }
}

/** Base64 of the bytes of a typed array; chunked so large buffers do not overflow the stack. */
export function toBase64(typedArray) {
  const bytes = new Uint8Array(typedArray.buffer, typedArray.byteOffset, typedArray.byteLength);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

/** PCM16 little-endian samples from base64. */
export function pcm16FromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length - (binary.length % 2));
  for (let i = 0; i < bytes.length; i++) bytes[i] = binary.charCodeAt(i);
  return new Int16Array(bytes.buffer);
}
