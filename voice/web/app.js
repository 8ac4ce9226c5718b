// The reference client of /v1/realtime: microphone in, answer text and audio out.
"use strict";

const RATE = 24000;
const KEY = "mlx-harmony-key";
const $ = (id) => document.getElementById(id);

// What the page has done, for people (the footer) and for tests (window.harmony).
const harmony = { opened: false, turns: [], playedMs: 0, answers: [], errors: [] };
window.harmony = harmony;

let ws = null;
let ctx = null;
let talking = false; // push to talk: the key or button is held
let playhead = 0; // when the audio scheduled so far ends, in the context's clock
let sources = [];
let answer = null; // the answer being spoken: {itemId, startedAt, scheduledMs, element}
let turn = null; // timings of the turn being answered
let userLine = null;
let responding = false; // a response is being made (created, not yet done)

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function status(text, state) {
  const el = $("status");
  el.textContent = text;
  el.dataset.state = state || text;
}

function line(cls, text) {
  const p = document.createElement("p");
  p.className = cls;
  p.textContent = text;
  $("log").append(p);
  p.scrollIntoView({ block: "end" });
  return p;
}

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

function b64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

function pcm(base64) {
  const raw = atob(base64);
  const out = new Float32Array(raw.length / 2);
  for (let i = 0; i < out.length; i++) {
    let v = raw.charCodeAt(2 * i) | (raw.charCodeAt(2 * i + 1) << 8);
    if (v >= 0x8000) v -= 0x10000;
    out[i] = v / 32768;
  }
  return out;
}

function sessionSettings() {
  const detection = mode() === "hands-free" ? { type: "server_vad" } : null;
  return {
    type: "session.update",
    session: { type: "realtime", audio: { input: { turn_detection: detection } } },
  };
}

// ------------------------------------------------------------------ audio out
function play(samples) {
  const buffer = ctx.createBuffer(1, samples.length, RATE);
  buffer.copyToChannel(samples, 0);
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(ctx.destination);
  const at = Math.max(ctx.currentTime + 0.02, playhead);
  source.start(at);
  playhead = at + buffer.duration;
  sources.push(source);
  source.onended = () => {
    sources = sources.filter((s) => s !== source);
    harmony.playedMs += buffer.duration * 1000;
    if (!sources.length && answer && answer.done) finishAnswer();
  };
  return at;
}

function playedOfAnswer() {
  if (!answer || answer.startedAt === null) return 0;
  const ms = (ctx.currentTime - answer.startedAt) * 1000;
  return Math.max(0, Math.min(Math.round(ms), Math.round(answer.scheduledMs)));
}

// The user spoke over the answer: stop the sound now, and tell the server how much was
// heard, so that the conversation keeps only that.
function bargeIn() {
  if (!answer || !sources.length) return;
  const heard = playedOfAnswer();
  for (const s of sources) {
    s.onended = null;
    try { s.stop(); } catch (e) { /* already stopped */ }
  }
  sources = [];
  playhead = 0;
  send({ type: "conversation.item.truncate", item_id: answer.itemId, content_index: 0,
         audio_end_ms: heard });
  answer.element.classList.add("cut");
  answer = null;
}

function finishAnswer() {
  if (answer) harmony.answers.push(answer.element.textContent);
  answer = null;
  status(mode() === "hands-free" ? "listening" : "hold to talk", "listening");
}

// ------------------------------------------------------------------ events in
function handle(event) {
  const now = performance.now();
  switch (event.type) {
    case "session.created":
      harmony.opened = true;
      send(sessionSettings());
      status(mode() === "hands-free" ? "listening" : "hold to talk", "listening");
      break;
    case "input_audio_buffer.speech_started":
      bargeIn();
      status("hearing you", "hearing");
      userLine = line("user", "");
      break;
    case "input_audio_buffer.speech_stopped":
      turn = { stoppedAt: now };
      status("thinking", "thinking");
      break;
    case "input_audio_buffer.committed":
      if (!turn) turn = { stoppedAt: now };
      if (!userLine) userLine = line("user", "");
      break;
    case "conversation.item.input_audio_transcription.delta":
      if (!userLine) userLine = line("user", "");
      userLine.textContent += event.delta;
      break;
    case "conversation.item.input_audio_transcription.completed":
      if (userLine) userLine.textContent = event.transcript;
      userLine = null;
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      if (!answer || answer.itemId !== event.item_id) {
        answer = { itemId: event.item_id, startedAt: null, scheduledMs: 0, done: false,
                   element: line("assistant", "") };
      }
      answer.element.textContent += event.delta;
      if (turn && turn.firstWordMs === undefined) turn.firstWordMs = now - turn.stoppedAt;
      break;
    case "response.output_audio.delta": {
      if (!answer) {
        answer = { itemId: event.item_id, startedAt: null, scheduledMs: 0, done: false,
                   element: line("assistant", "") };
      }
      const samples = pcm(event.delta);
      const at = play(samples);
      if (answer.startedAt === null) answer.startedAt = at;
      answer.scheduledMs += (samples.length / RATE) * 1000;
      if (turn && turn.firstSoundMs === undefined) {
        turn.firstAudioMs = now - turn.stoppedAt;
        turn.firstSoundMs = turn.firstAudioMs + (at - ctx.currentTime) * 1000;
      }
      status("speaking", "speaking");
      break;
    }
    case "response.created":
      responding = true;
      break;
    case "response.done":
      responding = false;
      if (event.response.status === "failed") {
        const why = event.response.status_details && event.response.status_details.error;
        line("error", "the answer failed: " + (why ? why.message : "unknown error"));
      }
      if (turn) {
        harmony.turns.push(turn);
        showTimings(turn, event.response);
        turn = null;
      }
      if (answer) {
        answer.done = true;
        if (!sources.length) finishAnswer();
      } else {
        status(mode() === "hands-free" ? "listening" : "hold to talk", "listening");
      }
      break;
    case "error":
      harmony.errors.push(event.error);
      line("error", event.error.message);
      break;
  }
}

function showTimings(t, response) {
  const parts = [];
  if (t.firstSoundMs !== undefined) parts.push(`first sound ${Math.round(t.firstSoundMs)} ms`);
  if (t.firstWordMs !== undefined) parts.push(`first word ${Math.round(t.firstWordMs)} ms`);
  if (response.usage) parts.push(`${response.usage.output_tokens} tokens`);
  if (response.status !== "completed") parts.push(response.status);
  $("timings").textContent = parts.length ? "after you stopped: " + parts.join(" · ") : "";
}

// ------------------------------------------------------------------ connection
function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const protocols = ["realtime"];
  const key = localStorage.getItem(KEY);
  if (key) protocols.push("openai-insecure-api-key." + key);
  ws = new WebSocket(`${scheme}://${location.host}/v1/realtime`, protocols);
  let opened = false;
  ws.onopen = () => { opened = true; };
  ws.onmessage = (m) => handle(JSON.parse(m.data));
  ws.onclose = (e) => {
    ws = null;
    if (!opened) {
      status("the server refused the connection: is the API key right?", "error");
      askKey();
    } else {
      status(`disconnected (${e.code}${e.reason ? ": " + e.reason : ""})`, "error");
    }
    $("start").disabled = false;
    $("start").textContent = "Start";
  };
}

function askKey() {
  $("key-input").value = localStorage.getItem(KEY) || "";
  $("key-dialog").showModal();
}

async function start() {
  $("start").disabled = true;
  if (!ctx) {
    ctx = new AudioContext({ sampleRate: RATE });
    await ctx.audioWorklet.addModule("/web/capture.js");
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true,
               channelCount: 1 },
    });
    const capture = new AudioWorkletNode(ctx, "capture");
    ctx.createMediaStreamSource(stream).connect(capture);
    capture.port.onmessage = (m) => {
      if (mode() === "hands-free" || talking) {
        send({ type: "input_audio_buffer.append", audio: b64(m.data) });
      }
    };
  }
  await ctx.resume();
  status("connecting", "connecting");
  connect();
  $("start").textContent = "Connected";
}

function press() {
  if (mode() !== "push-to-talk" || talking) return;
  talking = true;
  bargeIn();
  if (responding) send({ type: "response.cancel" });
  $("talk").classList.add("down");
  status("hearing you", "hearing");
}

function release() {
  if (!talking) return;
  talking = false;
  $("talk").classList.remove("down");
  turn = { stoppedAt: performance.now() };
  send({ type: "input_audio_buffer.commit" });
  send({ type: "response.create" });
  status("thinking", "thinking");
}

$("start").onclick = start;
$("key").onclick = askKey;
$("key-save").onclick = () => {
  localStorage.setItem(KEY, $("key-input").value.trim());
  if (!ws && ctx) connect();
};
for (const radio of document.querySelectorAll('input[name="mode"]')) {
  radio.onchange = () => {
    $("talk").disabled = mode() !== "push-to-talk";
    send(sessionSettings());
  };
}
$("talk").onpointerdown = press;
$("talk").onpointerup = release;
$("talk").onpointerleave = release;
document.addEventListener("keydown", (e) => { if (e.code === "Space" && !e.repeat) press(); });
document.addEventListener("keyup", (e) => { if (e.code === "Space") release(); });

// ?start=1 starts at once (a kiosk, or a test with a fake microphone).
if (new URLSearchParams(location.search).get("start")) start();
