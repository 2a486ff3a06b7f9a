// The page: one click starts a conversation over /v1/realtime (docs/protocol.md), hands-free with
// server VAD or push to talk, with live captions, the latency waterfall and the denoising view.
//
// window.voiceAgent.state() returns a plain snapshot of what the page shows, for the browser test.

import { createAudioContext, Microphone, MicrophoneError, Player } from "./audio.js";
import { Conversation } from "./captions.js";
import { DenoiseView } from "./denoise.js";
import { ConnectionError, errorKind, pcm16FromBase64, RealtimeConnection, realtimeUrl, toBase64 } from "./realtime.js";
import { Waterfall } from "./waterfall.js";

const SESSION_RATE_HZ = 24000;
const MIN_TALK_MS = 200; // a shorter push-to-talk press is a tap: nothing is committed
// Server errors that only mean a harmless race (the reply ended as the user cancelled it).
const QUIET_ERRORS = new Set(["response_cancel_not_active", "input_audio_buffer_commit_empty"]);

const $ = (id) => document.getElementById(id);

const ui = {
  start: $("start"),
  talk: $("talk"),
  composer: $("composer"),
  composerText: $("composer-text"),
  status: $("status-text"),
  models: $("models"),
  meter: $("meter-level"),
  traceToggle: $("trace-toggle"),
  notice: $("notice"),
  noticeTitle: $("notice-title"),
  noticeBody: $("notice-body"),
  tokenForm: $("token-form"),
  tokenInput: $("token-input"),
  announcer: $("announcer"),
};

const conversation = new Conversation($("transcript"));
const waterfall = new Waterfall($("latency"));
const denoise = new DenoiseView($("denoise"));

/** Everything the page knows about the call in progress. */
const call = {
  phase: "idle", // idle | connecting | listening | hearing | thinking | speaking
  connection: null,
  context: null,
  microphone: null,
  player: null,
  mode: "vad", // "vad" (server VAD, hands-free) or "ptt" (push to talk)
  talking: false, // push-to-talk held
  talkedMs: 0, // audio sent during this push-to-talk press
  sentMs: 0, // microphone audio sent in this page's life
  token: new URLSearchParams(window.location.search).get("token") || sessionStorage.getItem("voice-agent-token") || "",
  itemResponse: new Map(), // output item id -> response id
  firstAudioAt: new Map(), // response id -> performance.now() of its first audio delta
  playStartedAt: new Map(), // response id -> performance.now() its first sample was heard
  serverMetrics: new Map(), // response id -> metrics values
  activeResponse: null, // between response.created and response.done
  speakingResponse: null, // the response whose audio is playing or queued
  silenced: new Set(), // responses interrupted here: late audio deltas for them are dropped
  lastDoneResponse: null, // the response of the latest response.done
  playedSamples: new Map(), // output item id -> samples of it played
  errors: [],
  eventCounts: {},
  models: {},
};

// Phases and status ----------------------------------------------------------------------------

const PHASE_TEXT = {
  idle: "Not connected",
  connecting: "Connecting…",
  listening: "Listening",
  hearing: "Hearing you",
  thinking: "Thinking",
  speaking: "Speaking",
};

function setPhase(phase) {
  call.phase = phase;
  document.body.dataset.state = phase;
  let text = PHASE_TEXT[phase];
  if (phase === "listening" && call.mode === "ptt") text = "Hold to talk";
  if (phase === "listening" && !call.microphone) text = "Connected · type to talk";
  ui.status.textContent = text;
  renderStartButton();
}

/** "Start" opens the microphone (connecting first if needed); "Stop" ends the call. */
function renderStartButton() {
  const listening = Boolean(call.microphone);
  ui.start.querySelector(".start-label").textContent = listening ? "Stop" : "Start";
  ui.start.setAttribute("aria-pressed", String(listening));
}

function onStartClick() {
  if (call.phase === "connecting") return;
  if (call.phase === "idle") start();
  else if (!call.microphone) openMicrophone().then(() => setPhase(call.phase));
  else stop();
}

function announce(text) {
  ui.announcer.textContent = text;
}

// Notices --------------------------------------------------------------------------------------

const NOTICES = {
  denied: ["Microphone blocked", "The browser was not allowed to use the microphone. Allow it in the site settings (the icon left of the address) and press Start again, or type below."],
  missing: ["No microphone", "No microphone was found. Plug one in and press Start again, or type below."],
  unsupported: ["No microphone access", "This page cannot use the microphone here (it needs http://localhost or https). You can still type below."],
  failed: ["Microphone problem", ""],
  unreachable: ["Server unreachable", "The voice-agent server did not answer. Check that voice-agent serve is running, then press Start again."],
  token: ["Access token required", "This server asks for an access token. Enter it below."],
  full: ["Server busy", "The server is handling as many calls as it allows. Please try again in a minute."],
  closed: ["Connection lost", "The connection to the server closed. Press Start to reconnect."],
  audio: ["Audio unavailable", "The browser could not start audio playback on this page."],
  server: ["The server reported a problem", ""],
};

function showNotice(kind, detail = "") {
  const [title, body] = NOTICES[kind] || ["Something went wrong", ""];
  ui.noticeTitle.textContent = title;
  const details = document.createElement("span");
  details.className = "notice-detail";
  details.textContent = detail;
  ui.noticeBody.replaceChildren(body, details);
  ui.tokenForm.hidden = kind !== "token";
  ui.notice.hidden = false;
  ui.notice.dataset.kind = kind;
  call.errors.push({ kind, detail });
  if (kind === "token") ui.tokenInput.focus();
}

function hideNotice() {
  ui.notice.hidden = true;
  delete ui.notice.dataset.kind;
}

// Starting and stopping ------------------------------------------------------------------------

/** Connect (and open the microphone unless `withMicrophone` is false). Returns true on success. */
async function start({ withMicrophone = true } = {}) {
  if (call.phase === "connecting") return false;
  if (call.phase !== "idle") return true;
  hideNotice();
  setPhase("connecting");
  try {
    call.context = call.context || (await createAudioContext());
    if (call.context.state === "suspended") await call.context.resume(); // suspended by stop()
  } catch (error) {
    return fail("audio", error.message);
  }
  try {
    await connect();
  } catch (error) {
    const kind = error instanceof ConnectionError ? error.kind : "unreachable";
    const detail = kind === "token" && call.token ? "The token given was not accepted." : error.message;
    return fail(kind, detail);
  }
  if (withMicrophone) await openMicrophone();
  if (!call.connection) return false; // closed while the microphone prompt was open
  configureSession();
  setPhase("listening");
  return true;
}

function fail(kind, detail) {
  showNotice(kind, detail);
  stop();
  return false;
}

async function connect() {
  const connection = new RealtimeConnection();
  registerHandlers(connection);
  connection.onclose = (error) => {
    if (call.connection !== connection) return;
    showNotice(error.kind, error.message);
    stop();
  };
  call.connection = connection;
  await connection.connect(realtimeUrl(call.token));
  call.player = new Player(call.context, {
    rateHz: SESSION_RATE_HZ,
    onStarted: onPlaybackStarted,
    onProgress: onPlaybackProgress,
    onDrained: onPlaybackDrained,
  });
}

async function openMicrophone() {
  const microphone = new Microphone(call.context, {
    rateHz: SESSION_RATE_HZ,
    onChunk: sendAudio,
    onLevel: showLevel,
  });
  try {
    await microphone.open();
  } catch (error) {
    const kind = error instanceof MicrophoneError ? error.kind : "failed";
    showNotice(kind, kind === "failed" ? error.message : "");
    return;
  }
  hideNotice();
  call.microphone = microphone;
  microphone.setSending(call.mode === "vad");
}

function stop() {
  const connection = call.connection;
  call.connection = null;
  if (connection) connection.close();
  if (call.microphone) call.microphone.close();
  if (call.player) call.player.close();
  call.microphone = null;
  call.player = null;
  call.talking = false;
  if (call.context && call.context.state === "running") call.context.suspend(); // no audio thread while idle
  showLevel(0);
  setPhase("idle");
}

/** The session settings: PCM16 at the session rate both ways, the turn-taking mode, the trace. */
function configureSession() {
  call.connection?.send("session.update", {
    session: {
      type: "realtime",
      output_modalities: ["audio"],
      audio: {
        input: {
          format: { type: "audio/pcm", rate: SESSION_RATE_HZ },
          turn_detection: call.mode === "vad" ? { type: "server_vad" } : null,
        },
        output: { format: { type: "audio/pcm", rate: SESSION_RATE_HZ } },
      },
      // Vendor extension (docs/protocol.md): per-turn metrics, and the opt-in denoising trace.
      voice_agent: { metrics: true, denoise_steps: ui.traceToggle.checked },
    },
  });
}

// Microphone -----------------------------------------------------------------------------------

function sendAudio(pcm) {
  if (!call.connection) return;
  call.connection.send("input_audio_buffer.append", { audio: toBase64(pcm) });
  const ms = (1000 * pcm.length) / SESSION_RATE_HZ;
  call.sentMs += ms;
  if (call.talking) call.talkedMs += ms;
}

function showLevel(rms) {
  // About -60 dBFS to 0 dBFS mapped onto the meter's width.
  const db = 20 * Math.log10(Math.max(rms, 1e-6));
  ui.meter.style.transform = `scaleX(${Math.max(0, Math.min(1, (db + 60) / 60)).toFixed(3)})`;
}

// Push to talk ---------------------------------------------------------------------------------

async function pressTalk() {
  if (call.mode !== "ptt" || call.talking || !call.microphone) return;
  call.talking = true;
  call.talkedMs = 0;
  ui.talk.setAttribute("aria-pressed", "true");
  await bargeIn({ cancel: true }); // without server VAD the server does not know the user speaks
  call.connection.send("input_audio_buffer.clear");
  call.microphone.setSending(true);
  setPhase("hearing");
}

function releaseTalk() {
  if (!call.talking) return;
  call.talking = false;
  ui.talk.setAttribute("aria-pressed", "false");
  call.microphone.setSending(false);
  if (call.talkedMs < MIN_TALK_MS) {
    call.connection.send("input_audio_buffer.clear"); // a tap, not a turn
    setPhase("listening");
    return;
  }
  call.connection.send("input_audio_buffer.commit");
  call.connection.send("response.create");
  setPhase("thinking");
}

function setMode(mode) {
  call.mode = mode;
  ui.talk.hidden = mode !== "ptt";
  if (call.microphone) call.microphone.setSending(mode === "vad");
  if (call.connection) configureSession();
  if (call.phase === "listening") setPhase("listening");
}

// Typing ---------------------------------------------------------------------------------------

/** Returns false where the message could not be sent (not connected). */
async function sendText(text) {
  if (!(await start({ withMicrophone: false }))) return false;
  await bargeIn({ cancel: false }); // a typed message interrupts the reply on the server too
  const itemId = `item_web_${Date.now()}`;
  conversation.user(itemId, { typed: true }).setFinal(text);
  call.connection.send("conversation.item.create", {
    item: { id: itemId, type: "message", role: "user", content: [{ type: "input_text", text }] },
  });
  call.connection.send("response.create");
  setPhase("thinking");
  return true;
}

// Playback and barge-in ------------------------------------------------------------------------

/**
 * The user interrupts: the reply in progress goes quiet here at once (late audio deltas for it are
 * dropped); `cancel` also asks the server to stop it, where the server cannot know by itself.
 */
async function bargeIn({ cancel, responseId = call.activeResponse }) {
  if (responseId) {
    call.silenced.add(responseId);
    if (cancel) call.connection?.send("response.cancel", { response_id: responseId });
  }
  if (call.speakingResponse) call.silenced.add(call.speakingResponse);
  await interruptPlayback();
}

/**
 * Stop reply audio at once and tell the server how much of it was heard
 * (conversation.item.truncate), so the conversation history holds what the user really heard.
 */
async function interruptPlayback() {
  const responseId = call.speakingResponse;
  if (!call.player || !responseId) return;
  call.speakingResponse = null;
  const played = await call.player.flush();
  onPlaybackProgress(played);
  for (const [itemId, samples] of Object.entries(played)) acknowledgePlayed(itemId, samples);
}

/** Cut the item's caption where playback stopped and send conversation.item.truncate, once. */
function acknowledgePlayed(itemId, samples) {
  const caption = conversation.agents.get(call.itemResponse.get(itemId));
  if (!caption || caption.truncated || samples >= caption.samples) return; // fully heard: nothing to cut
  caption.truncated = true;
  caption.interrupt(samples);
  call.connection?.send("conversation.item.truncate", {
    item_id: itemId,
    content_index: 0,
    audio_end_ms: call.player.samplesToMs(samples),
  });
}

function onPlaybackStarted(itemId, atMs) {
  const responseId = call.itemResponse.get(itemId);
  if (!responseId || call.playStartedAt.has(responseId)) return;
  call.playStartedAt.set(responseId, atMs);
  updateWaterfall(responseId);
}

function onPlaybackProgress(played) {
  for (const [itemId, samples] of Object.entries(played)) {
    const caption = conversation.agents.get(call.itemResponse.get(itemId));
    if (caption) caption.setPlayed(samples);
    call.playedSamples.set(itemId, Math.max(samples, call.playedSamples.get(itemId) || 0));
  }
}

function onPlaybackDrained(played) {
  onPlaybackProgress(played);
  if (call.phase === "speaking") setPhase("listening");
}

function playedMs() {
  const samples = [...call.playedSamples.values()].reduce((sum, n) => sum + n, 0);
  return Math.round((1000 * samples) / SESSION_RATE_HZ);
}

/** Server metrics plus the browser's own delay from receiving the first audio to playing it. */
function updateWaterfall(responseId) {
  const values = { ...(call.serverMetrics.get(responseId) || {}) };
  const playedAt = call.playStartedAt.get(responseId);
  const receivedAt = call.firstAudioAt.get(responseId);
  const sentMs = values.voice_to_voice_ms ?? values.tts_first_audio_ms;
  if (playedAt !== undefined && receivedAt !== undefined && typeof sentMs === "number") {
    values.played_first_audio_ms = sentMs + Math.max(0, playedAt - receivedAt);
  }
  if (Object.keys(values).length > 0) waterfall.update(responseId, values);
}

// Server events --------------------------------------------------------------------------------

function registerHandlers(connection) {
  connection
    .on("*", countEvent)
    .on("session.created", (e) => showModels(e.session))
    .on("session.updated", (e) => showModels(e.session))
    .on("input_audio_buffer.speech_started", onSpeechStarted)
    .on("input_audio_buffer.speech_stopped", () => setPhase("thinking"))
    .on("conversation.item.input_audio_transcription.delta", onTranscriptDelta)
    .on("conversation.item.input_audio_transcription.completed", onTranscriptCompleted)
    .on("response.created", onResponseCreated)
    .on("response.output_audio.delta", onAudioDelta)
    .on("response.output_audio_transcript.delta", (e) => onReplyText(e, true))
    .on("response.output_text.delta", (e) => onReplyText(e, false))
    .on("response.output_audio.done", () => call.player?.end())
    .on("output_audio_buffer.cleared", (e) => bargeIn({ cancel: false, responseId: e.response_id }))
    .on("response.done", onResponseDone)
    .on("voice_agent.metrics", onMetrics)
    .on("voice_agent.denoise_step", onDenoiseStep)
    .on("error", onServerError);
}

function countEvent(event) {
  call.eventCounts[event.type] = (call.eventCounts[event.type] || 0) + 1;
}

/** The models in use: `session.voice_agent.models` ({asr, llm, tts}) where the server sends it,
 * else the session's `model` (the LLM). */
function showModels(session) {
  if (!session) return;
  const vendor = session.voice_agent || {};
  const models = vendor.models || (session.model ? { llm: session.model } : null);
  if (!models) return;
  call.models = models;
  const parts = Object.entries(models).map(([role, name]) => `${role.toUpperCase()} ${name}`);
  ui.models.textContent = parts.join(" · ");
  ui.models.hidden = parts.length === 0;
}

async function onSpeechStarted(event) {
  setPhase("hearing");
  conversation.user(event.item_id).setPartial("…");
  await bargeIn({ cancel: false }); // server VAD: the server has cancelled the reply itself
}

function onTranscriptDelta(event) {
  const caption = conversation.user(event.item_id);
  const partial = caption.partial === "…" ? "" : caption.partial;
  caption.setPartial(partial + event.delta);
}

function onTranscriptCompleted(event) {
  const text = (event.transcript || "").trim();
  if (!text) {
    conversation.dropUser(event.item_id); // nothing recognizable was said: no reply follows
    if (call.phase === "thinking" || call.phase === "hearing") setPhase("listening");
    return;
  }
  conversation.user(event.item_id).setFinal(text);
  announce(`You said: ${text}`);
}

function onResponseCreated(event) {
  const responseId = event.response.id;
  call.activeResponse = responseId;
  denoise.reset();
  conversation.agent(responseId, { audio: true });
  setPhase("thinking");
}

function onAudioDelta(event) {
  const responseId = event.response_id;
  if (call.silenced.has(responseId)) return;
  call.itemResponse.set(event.item_id, responseId);
  if (!call.firstAudioAt.has(responseId)) call.firstAudioAt.set(responseId, performance.now());
  const pcm = pcm16FromBase64(event.delta);
  conversation.agent(responseId).addAudio(pcm.length);
  call.speakingResponse = responseId;
  call.player.enqueue(event.item_id, pcm);
  if (call.phase === "thinking" || call.phase === "listening") setPhase("speaking");
}

function onReplyText(event, spoken) {
  call.itemResponse.set(event.item_id, event.response_id);
  const caption = conversation.agent(event.response_id, { audio: spoken });
  if (!spoken) caption.audio = false;
  caption.addText(event.delta);
}

function onResponseDone(event) {
  const response = event.response;
  call.lastDoneResponse = response.id;
  const current = call.activeResponse === response.id;
  if (current) call.activeResponse = null;
  const caption = conversation.agents.get(response.id);
  if (!caption) return;
  caption.finish({ cancelled: response.status === "cancelled" });
  call.player?.end();
  if (response.status === "cancelled") bargeIn({ cancel: false, responseId: response.id });
  if (caption.text) announce(`Agent: ${caption.text}`);
  if (current && call.phase === "thinking") setPhase("listening"); // a reply without audio
}

/** Metrics follow their turn's response.done; `response_id` is used where the server sends it. */
function onMetrics(event) {
  const responseId = event.response_id || call.lastDoneResponse;
  if (!responseId) return;
  call.serverMetrics.set(responseId, { ...(call.serverMetrics.get(responseId) || {}), ...event.metrics });
  updateWaterfall(responseId);
}

/** The denoising view shows the reply in progress: a step naming another response (a late step of
 * a reply already done or replaced) is dropped. Without `response_id`, steps are taken in order. */
function onDenoiseStep(event) {
  if (event.response_id && event.response_id !== call.activeResponse) return;
  denoise.push(event);
}

function onServerError(event) {
  const error = event.error || {};
  if (QUIET_ERRORS.has(error.code)) return;
  const kind = errorKind(error.code);
  if (kind) showNotice(kind, error.message);
  else showNotice("server", error.message || error.code || "");
}

// Wiring ---------------------------------------------------------------------------------------

function wire() {
  ui.start.addEventListener("click", onStartClick);
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => setMode(radio.value));
  }
  wireTalkButton();
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.composerText.value.trim();
    if (!text) return;
    ui.composerText.value = "";
    sendText(text).then((sent) => {
      if (!sent && !ui.composerText.value) ui.composerText.value = text; // keep it for a retry
    });
  });
  ui.traceToggle.addEventListener("change", () => {
    document.body.classList.toggle("trace-on", ui.traceToggle.checked);
    if (call.connection) configureSession();
  });
  ui.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    call.token = ui.tokenInput.value.trim();
    sessionStorage.setItem("voice-agent-token", call.token);
    start();
  });
  $("notice-close").addEventListener("click", hideNotice);
}

/** Hold the button (mouse, touch, Enter or Space on it) or the space bar anywhere outside a field. */
function wireTalkButton() {
  ui.talk.addEventListener("pointerdown", (event) => {
    ui.talk.setPointerCapture(event.pointerId);
    pressTalk();
  });
  ui.talk.addEventListener("pointerup", releaseTalk);
  ui.talk.addEventListener("pointercancel", releaseTalk);
  document.addEventListener("keydown", (event) => {
    if (event.repeat || !isTalkKey(event)) return;
    event.preventDefault();
    pressTalk();
  });
  document.addEventListener("keyup", (event) => {
    if (!isTalkKey(event)) return;
    event.preventDefault();
    releaseTalk();
  });
}

function isTalkKey(event) {
  if (call.mode !== "ptt" || !call.microphone) return false;
  const onButton = event.target === ui.talk && (event.key === " " || event.key === "Enter");
  const typing = event.target.closest("input, textarea, select, button, [contenteditable]");
  return onButton || (event.key === " " && !typing);
}

window.voiceAgent = {
  state: () => ({
    phase: call.phase,
    connected: Boolean(call.connection && call.connection.open),
    microphone: call.microphone ? call.microphone.label || "on" : null,
    sentMs: Math.round(call.sentMs),
    mode: call.mode,
    transcripts: conversation.snapshot(),
    playback: { startedResponses: call.playStartedAt.size, playedMs: playedMs() },
    waterfall: waterfall.snapshot(),
    denoise: denoise.snapshot(),
    errors: call.errors,
    notice: ui.notice.hidden ? null : ui.notice.dataset.kind,
    models: call.models,
    events: call.eventCounts,
  }),
};

wire();
setPhase("idle");
