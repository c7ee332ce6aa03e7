// relay-voice.js — talk to an OpenAI Realtime model through relay, from a browser.
//
//   import { RelayVoice } from "./relay-voice.js";
//   const voice = new RelayVoice({
//     relayUrl: "wss://relay.example.com",           // relay's address
//     token: async () => (await (await fetch("/api/relay-token")).json()).token,
//   });
//   voice.addEventListener("transcript", (e) => console.log(e.detail.role, e.detail.text));
//   voice.addEventListener("close", (e) => console.log(e.detail.words));
//   await voice.start();   // inside a click handler: browsers start audio only on a gesture
//
// What it does, and why each part is the way it is:
// - Microphone: getUserMedia → an AudioWorklet that resamples to 24 kHz mono PCM16
//   (the Realtime default format) and hands ~40 ms blocks to the page, which sends
//   them as `input_audio_buffer.append`. The resampling is ours (the context keeps
//   the device's rate) because not every browser resamples a microphone into a
//   context of another rate.
// - Playback: each assistant audio delta becomes an AudioBuffer scheduled to start
//   exactly where the previous one ends, on the audio clock, so the answer plays
//   without gaps however the deltas arrive (they come faster than real time).
// - Barge-in: on `input_audio_buffer.speech_started` every scheduled buffer stops at
//   once and one `conversation.item.truncate` tells the model how much of its item
//   the listener actually heard (in ms, from the audio clock, never more than was
//   received), so the model does not believe it said what was cut off.
// - Close: a browser is told only 1006 when relay refuses the WebSocket upgrade
//   (the HTTP status of a refused upgrade is hidden from scripts). Pass
//   `explainRefusal` (your backend repeats the handshake and reports the status;
//   `relay demo` has one) to turn that into "refused (401): token expired".
// A new token is fetched for every session: relay lets one token hold one session.

const RATE = 24000;
const BLOCK_SAMPLES = 960; // 40 ms at 24 kHz per append
const LEAD_SECONDS = 0.05; // the first delta of an answer starts this far ahead

// The microphone worklet, loaded from a Blob so that this file is the only module.
const CAPTURE_WORKLET = `
class RelayCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.ratio = sampleRate / ${RATE};   // input samples per output sample
    this.pos = 0;                        // where the next output sample sits in the input
    this.prev = 0;                       // the last input sample of the previous block
    this.width = Math.max(1, Math.round(this.ratio)); // box filter against aliasing
    this.history = new Float32Array(this.width);
    this.hi = 0;
    this.acc = 0;
    this.out = new Int16Array(${BLOCK_SAMPLES});
    this.n = 0;
  }
  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    for (let i = 0; i < input.length; i++) {
      // A running mean over about one output sample's worth of input: a cheap low-pass.
      this.acc += input[i] - this.history[this.hi];
      this.history[this.hi] = input[i];
      this.hi = (this.hi + 1) % this.width;
      const filtered = this.acc / this.width;
      // Linear interpolation between the previous filtered sample and this one.
      while (this.pos <= 1) {
        const s = this.prev + (filtered - this.prev) * this.pos;
        const c = Math.max(-1, Math.min(1, s));
        this.out[this.n++] = c < 0 ? c * 0x8000 : c * 0x7fff;
        if (this.n === this.out.length) {
          this.port.postMessage(this.out.buffer, [this.out.buffer]);
          this.out = new Int16Array(${BLOCK_SAMPLES});
          this.n = 0;
        }
        this.pos += this.ratio;
      }
      this.pos -= 1;
      this.prev = filtered;
    }
    return true;
  }
}
registerProcessor("relay-capture", RelayCapture);
`;

/** A close code and reason in words, for people. `refusal` is {status, reason} or null. */
export function describeClose(code, reason, refusal) {
  if (refusal && refusal.status) {
    const why = {
      400: "the model or voice asked for is not allowed",
      401: "the token was refused",
      403: "this page's origin is not allowed by relay",
      429: "too many attempts; wait a minute",
      502: "relay could not reach OpenAI",
      503: "relay is busy or restarting",
    }[refusal.status] || "relay refused the connection";
    return `Refused (${refusal.status} ${refusal.reason || ""}): ${why}.`.replace(" )", ")");
  }
  if (refusal && refusal.reason) return `Could not connect: ${refusal.reason}.`;
  const said = reason ? ` "${reason}"` : "";
  if (code === 1000 && reason === "session time limit") {
    return `The session reached its time limit (close 1000${said}).`;
  }
  const words = {
    1000: "The session ended",
    1001: "relay is restarting (server shutting down); connect again in a moment",
    1006: "The connection was lost or refused before it opened",
    1008: "relay closed the session for a policy breach",
    1009: "A message was too large",
    1011: "The OpenAI side failed or stalled",
    4000: "OpenAI refused the request",
  }[code] || "The session closed";
  return `${words} (close ${code}${said}).`;
}

function toBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

export class RelayVoice extends EventTarget {
  /**
   * options.relayUrl        ws:// or wss:// base of relay (no path)
   * options.token           async () => token string (a fresh one per session)
   * options.voice, .model   optional: sent as ?voice= / ?model=
   * options.dialect         "ga" (default) or "beta": the shape of our session.update
   * options.session         extra session fields (e.g. { instructions: "..." })
   * options.transcribe      input transcription model, or null for none
   * options.explainRefusal  optional async ({token, query}) => {status, reason}
   * options.microphone      getUserMedia audio constraints
   */
  constructor(options) {
    super();
    this.options = { dialect: "ga", transcribe: "gpt-4o-mini-transcribe", ...options };
    this.ws = null;
    this.ctx = null;
    this.stream = null;
    this.capture = null;
    this._muted = false;
    this.opened = false;
    this.playhead = 0;          // audio-clock time the next delta starts at
    this.output = null;         // GainNode every answer plays through (set by start)
    this.sources = [];          // scheduled AudioBufferSourceNodes not yet ended
    this.item = null;           // the assistant item playing: {id, receivedSamples, chunks}
    // Everything scheduled and sent, for tests and curious developers.
    this.debug = { scheduled: [], stops: [], truncates: [], appends: 0, appendedSamples: 0 };
  }

  get muted() { return this._muted; }
  set muted(value) {
    this._muted = Boolean(value);
    // A disabled track gives silence, which still goes up: server VAD then sees a
    // turn end instead of audio that stops mid-word.
    if (this.stream) for (const t of this.stream.getAudioTracks()) t.enabled = !this._muted;
    this._emit("mute", { muted: this._muted });
  }

  /** Open the session; resolves once the WebSocket is open and the microphone runs.
   *  One session per RelayVoice: make a new one to talk again. */
  async start() {
    this.ctx = new AudioContext();
    await this.ctx.resume();
    // Every answer plays through this node: turn it down, or tap it (a meter, a recorder).
    this.output = this.ctx.createGain();
    this.output.connect(this.ctx.destination);
    this.playhead = 0;
    const token = await this.options.token();
    const query = new URLSearchParams();
    if (this.options.voice) query.set("voice", this.options.voice);
    if (this.options.model) query.set("model", this.options.model);
    const qs = query.toString() ? `?${query}` : "";
    const base = this.options.relayUrl.replace(/\/+$/, "");
    this._emit("status", { state: "connecting" });
    const ws = new WebSocket(`${base}/token/${encodeURIComponent(token)}${qs}`);
    this.ws = ws;
    ws.onmessage = (e) => this._onMessage(e.data);
    ws.onclose = (e) => this._onClose(e, token, qs);
    await new Promise((resolve, reject) => {
      ws.addEventListener("open", resolve, { once: true });
      ws.addEventListener("close", () => reject(new Error("closed before it opened")), { once: true });
    });
    this.opened = true;
    this._emit("status", { state: "open" });
    this.send({ type: "session.update", session: this._sessionUpdate() });
    await this._startMicrophone();
  }

  /** End the session: close the socket (1000), stop the microphone and playback. */
  stop() {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "bye");
    this._teardown();
  }

  /** Send one client event (an object) if the socket is open. */
  send(event) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(event));
  }

  _sessionUpdate() {
    const extra = this.options.session || {};
    const model = this.options.transcribe;
    if (this.options.dialect === "beta") {
      return {
        modalities: ["text", "audio"],
        input_audio_format: "pcm16",
        output_audio_format: "pcm16",
        turn_detection: { type: "server_vad" },
        ...(model ? { input_audio_transcription: { model } } : {}),
        ...extra,
      };
    }
    const pcm = { type: "audio/pcm", rate: RATE };
    return {
      type: "realtime",
      audio: {
        input: {
          format: pcm,
          turn_detection: { type: "server_vad" },
          ...(model ? { transcription: { model } } : {}),
        },
        output: { format: pcm },
      },
      ...extra,
    };
  }

  async _startMicrophone() {
    const constraints = this.options.microphone || {
      channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true,
    };
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: constraints });
    this.muted = this._muted;
    const url = URL.createObjectURL(new Blob([CAPTURE_WORKLET], { type: "text/javascript" }));
    try {
      await this.ctx.audioWorklet.addModule(url);
    } finally {
      URL.revokeObjectURL(url);
    }
    const source = this.ctx.createMediaStreamSource(this.stream);
    this.capture = new AudioWorkletNode(this.ctx, "relay-capture", {
      numberOfInputs: 1, numberOfOutputs: 1, channelCount: 1, channelCountMode: "explicit",
    });
    this.capture.port.onmessage = (e) => this._onMicBlock(new Uint8Array(e.data));
    source.connect(this.capture);
    // Its output is silent; connected only so that every browser keeps pulling it.
    this.capture.connect(this.ctx.destination);
  }

  _onMicBlock(bytes) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    this.send({ type: "input_audio_buffer.append", audio: toBase64(bytes) });
    this.debug.appends += 1;
    this.debug.appendedSamples += bytes.length / 2;
  }

  _onMessage(data) {
    if (typeof data !== "string") return;
    let event;
    try { event = JSON.parse(data); } catch { return; }
    this._emit("event", event);
    switch (event.type) {
      case "response.output_audio.delta":
      case "response.audio.delta":
        this._play(event);
        break;
      case "input_audio_buffer.speech_started":
        this._bargeIn(event);
        break;
      case "conversation.item.input_audio_transcription.delta":
        this._emit("transcript", { role: "user", itemId: event.item_id, text: event.delta, final: false });
        break;
      case "conversation.item.input_audio_transcription.completed":
        this._emit("transcript", { role: "user", itemId: event.item_id, text: event.transcript, final: true });
        break;
      case "response.output_audio_transcript.delta":
      case "response.audio_transcript.delta":
      case "response.output_text.delta":
      case "response.text.delta":
        this._emit("transcript", { role: "assistant", itemId: event.item_id, text: event.delta, final: false });
        break;
      case "response.output_audio_transcript.done":
      case "response.audio_transcript.done":
        this._emit("transcript", { role: "assistant", itemId: event.item_id, text: event.transcript, final: true });
        break;
      case "error":
        this._emit("error", event.error || {});
        break;
    }
  }

  _play(event) {
    const bytes = fromBase64(event.delta);
    const n = bytes.length >> 1;
    if (n === 0) return;
    const view = new DataView(bytes.buffer, bytes.byteOffset, n * 2);
    const buffer = this.ctx.createBuffer(1, n, RATE);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < n; i++) channel[i] = view.getInt16(2 * i, true) / 0x8000;
    if (!this.item || this.item.id !== event.item_id) {
      this.item = { id: event.item_id, receivedSamples: 0, chunks: [], truncated: false };
    } else if (this.item.truncated) {
      return; // sent before the model heard the barge-in: the listener cut it off
    }
    const now = this.ctx.currentTime;
    const start = Math.max(this.playhead, now + (this.playhead > now ? 0 : LEAD_SECONDS));
    const node = this.ctx.createBufferSource();
    node.buffer = buffer;
    node.connect(this.output);
    node.onended = () => { this.sources = this.sources.filter((s) => s !== node); };
    node.start(start);
    this.sources.push(node);
    this.playhead = start + n / RATE;
    this.item.receivedSamples += n;
    this.item.chunks.push({ start, samples: n });
    this.debug.scheduled.push({
      eventId: event.event_id, itemId: event.item_id, start, seconds: n / RATE, samples: n,
    });
  }

  /** The audio-clock time the listener is hearing now (output latency allowed for). */
  _heardTime() {
    const now = this.ctx.currentTime;
    const stamp = this.ctx.getOutputTimestamp ? this.ctx.getOutputTimestamp() : null;
    if (stamp && stamp.contextTime > 0 && stamp.contextTime <= now) return stamp.contextTime;
    return Math.max(0, now - (this.ctx.outputLatency || 0));
  }

  _playedSamples(item, at) {
    let played = 0;
    for (const c of item.chunks) {
      played += Math.max(0, Math.min(c.samples, Math.floor((at - c.start) * RATE)));
    }
    return Math.min(played, item.receivedSamples);
  }

  _bargeIn(event) {
    const item = this.item;
    const at = this._heardTime();
    const now = this.ctx ? this.ctx.currentTime : 0;
    const unplayed = item && !item.truncated && this.playhead > now;
    for (const node of this.sources) {
      try { node.stop(); } catch { /* never started */ }
    }
    this.sources = [];
    this.playhead = 0;
    if (!unplayed) return; // nothing of the assistant's was cut off: nothing to tell
    const playedMs = Math.floor((this._playedSamples(item, at) * 1000) / RATE);
    item.truncated = true;
    const receivedMs = Math.floor((item.receivedSamples * 1000) / RATE);
    this.debug.stops.push({ itemId: item.id, contextTime: now, heardTime: at, speechEventId: event.event_id });
    this.debug.truncates.push({ itemId: item.id, audioEndMs: playedMs, receivedMs });
    this.send({ type: "conversation.item.truncate", item_id: item.id, content_index: 0, audio_end_ms: playedMs });
    this._emit("bargein", { itemId: item.id, playedMs, receivedMs });
  }

  async _onClose(e, token, qs) {
    let refusal = null;
    if (!this.opened && this.options.explainRefusal) {
      try {
        refusal = await this.options.explainRefusal({ token, query: qs });
      } catch (err) {
        refusal = { status: 0, reason: String(err) };
      }
    }
    this._teardown();
    const detail = { code: e.code, reason: e.reason, refusal, words: describeClose(e.code, e.reason, refusal) };
    this.lastClose = detail;
    this._emit("status", { state: "closed" });
    this._emit("close", detail);
  }

  _teardown() {
    for (const node of this.sources) {
      try { node.stop(); } catch { /* never started */ }
    }
    this.sources = [];
    if (this.capture) {
      this.capture.port.onmessage = null;
      this.capture.disconnect();
    }
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    this.stream = null;
    this.capture = null;
    // Browsers allow only a few live AudioContexts per page.
    if (this.ctx && this.ctx.state !== "closed") this.ctx.close();
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
