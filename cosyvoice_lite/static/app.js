// cosyvoice-lite web page: synthesise with POST /tts as a PCM stream (24 kHz s16le), play it with Web Audio as the
// chunks arrive, show progress and the waveform, and keep the last clips to replay and download (built here).
"use strict";

const $ = (id) => document.getElementById(id);
const RATE = 24000;           // /tts always answers 24 kHz mono
const HISTORY = 5;            // clips kept for replay and download
const LEAD = 0.08;            // seconds between scheduling a chunk and its playback
const SAMPLE_TEXT = {
  en: "Hello! This is cosyvoice-lite, a text to speech service running on your own CPU.",
  zh: "你好，欢迎使用 CosyVoice 语音合成。今天天气很好。",
  yue: "你好，歡迎使用 CosyVoice 語音合成。",
  ja: "こんにちは、CosyVoice の音声合成へようこそ。",
  ko: "안녕하세요, CosyVoice 음성 합성입니다.",
};

const state = {
  ctx: null,          // AudioContext, created on the first click (browsers want a user gesture)
  sources: [],        // AudioBufferSourceNodes scheduled and not yet ended
  playhead: 0,        // AudioContext time at which the next chunk starts
  controller: null,   // AbortController of the request in progress
  speakers: [],
  edited: false,      // the user typed their own text: never replace it
  clips: [],          // {id, text, speaker, samples (Float32Array), pcm (Int16Array), url, format}
  nextId: 1,
};

// ---- small helpers ------------------------------------------------------------------------------------------

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + response.status;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// Text with `code` spans rendered as <code> elements (never as HTML).
function setRichText(element, text) {
  element.textContent = "";
  text.split("`").forEach((part, i) => {
    if (!part) return;
    if (i % 2) {
      const code = document.createElement("code");
      code.textContent = part;
      element.appendChild(code);
    } else {
      element.appendChild(document.createTextNode(part));
    }
  });
}

// ---- speakers and the default text --------------------------------------------------------------------------

function sampleTextFor(speakerId) {
  const speaker = state.speakers.find((s) => s.id === speakerId);
  const language = speaker ? speaker.language : "en";
  return SAMPLE_TEXT[language] || SAMPLE_TEXT[language.split("-")[0]] || SAMPLE_TEXT.en;
}

function followSpeakerLanguage() {
  if (!state.edited) $("text").value = sampleTextFor($("speaker").value);
}

async function loadSpeakers() {
  const response = await fetch("/speakers", { headers: headers(false) });
  if (response.status === 401) {
    $("auth").open = true;
    $("engine").textContent = "This server needs an API key / 需要密钥";
    return;
  }
  if (!response.ok) {
    $("engine").textContent = await errorText(response);
    return;
  }
  const info = await response.json();
  state.speakers = info.speakers;
  const select = $("speaker");
  select.innerHTML = "";
  for (const s of info.speakers) {
    const option = document.createElement("option");
    option.value = s.id;
    option.textContent = s.alias && s.alias !== s.id ? `${s.id} (${s.alias}, ${s.language})` : `${s.id} (${s.language})`;
    option.selected = s.id === info.default;
    select.appendChild(option);
  }
  setRichText($("engine"), "Engine / 引擎: " + info.engine + (info.hint ? " — " + info.hint : ""));
  $("engine").className = info.hint ? "note warn" : "note";
  followSpeakerLanguage();
}

// ---- playback -----------------------------------------------------------------------------------------------

function audioContext() {
  if (!state.ctx) state.ctx = new AudioContext({ sampleRate: RATE });
  if (state.ctx.state === "suspended") state.ctx.resume();
  return state.ctx;
}

function schedule(samples) {
  const ctx = audioContext();
  const buffer = ctx.createBuffer(1, samples.length, RATE);
  buffer.copyToChannel(samples, 0);
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(ctx.destination);
  const at = Math.max(state.playhead, ctx.currentTime + LEAD);
  source.start(at);
  state.playhead = at + buffer.duration;
  state.sources.push(source);
  source.onended = () => { state.sources = state.sources.filter((s) => s !== source); };
}

function stopPlayback() {
  for (const source of state.sources) {
    try { source.stop(); } catch (e) { /* not started yet */ }
  }
  state.sources = [];
  state.playhead = 0;
}

// ---- waveform -----------------------------------------------------------------------------------------------

function drawWave(samples, count) {
  const canvas = $("wave");
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.clearRect(0, 0, width, height);
  if (!count) return;
  g.fillStyle = "#2f5bd3";
  const perPixel = Math.max(1, count / width);
  const columns = Math.min(width, count);
  for (let x = 0; x < columns; x++) {
    const start = Math.floor(x * perPixel), end = Math.min(count, Math.floor((x + 1) * perPixel));
    let lo = 0, hi = 0;
    for (let i = start; i < end; i++) {
      const v = samples[i];
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    const top = (1 - hi) * height / 2, bottom = (1 - lo) * height / 2;
    g.fillRect(x, top, 1, Math.max(1, bottom - top));
  }
}

// ---- clips: history, WAV built from the PCM -----------------------------------------------------------------

function wavBlob(pcm) {
  const header = new DataView(new ArrayBuffer(44));
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) header.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); header.setUint32(4, 36 + pcm.byteLength, true); text(8, "WAVE");
  text(12, "fmt "); header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 1, true);
  header.setUint32(24, RATE, true); header.setUint32(28, RATE * 2, true); header.setUint16(32, 2, true);
  header.setUint16(34, 16, true); text(36, "data"); header.setUint32(40, pcm.byteLength, true);
  return new Blob([header.buffer, pcm.buffer], { type: "audio/wav" });
}

function fileOf(clip) {
  const blob = clip.format === "pcm" ? new Blob([clip.pcm.buffer], { type: "audio/L16;rate=24000;channels=1" })
    : wavBlob(clip.pcm);
  return { url: URL.createObjectURL(blob), name: `speech-${clip.id}.${clip.format}` };
}

function addClip(clip) {
  const file = fileOf(clip);
  clip.url = file.url;
  state.clips.unshift(clip);
  for (const old of state.clips.splice(HISTORY)) URL.revokeObjectURL(old.url);
  const link = $("download");
  link.href = file.url;
  link.download = file.name;
  link.hidden = false;
  renderHistory();
}

function renderHistory() {
  const list = $("history");
  list.innerHTML = "";
  for (const clip of state.clips) {
    const item = document.createElement("li");
    const seconds = (clip.samples.length / RATE).toFixed(2);
    const snippet = clip.text.length > 40 ? clip.text.slice(0, 40) + "…" : clip.text;
    item.appendChild(document.createTextNode(`${snippet} (${clip.speaker}, ${seconds} s)`));
    const play = document.createElement("button");
    play.type = "button";
    play.className = "replay";
    play.textContent = "Play / 播放";
    play.addEventListener("click", () => replay(clip));
    const link = document.createElement("a");
    link.className = "button";
    link.href = clip.url;
    link.download = `speech-${clip.id}.${clip.format}`;
    link.textContent = clip.format;
    item.append(play, link);
    list.appendChild(item);
  }
}

function replay(clip) {
  stopPlayback();
  schedule(clip.samples);
  drawWave(clip.samples, clip.samples.length);
  setStatus(`Playing clip ${clip.id} / 播放中`, false);
}

// ---- synthesis ----------------------------------------------------------------------------------------------

function concat(parts, length, Type) {
  const out = new Type(length);
  let offset = 0;
  for (const p of parts) { out.set(p, offset); offset += p.length; }
  return out;
}

function busy(on) {
  $("speak").disabled = on;
  $("stop").hidden = !on;
}

async function speak() {
  const text = $("text").value;
  if (!text.trim()) { setStatus("Type some text first / 请输入文本", true); return; }
  const format = $("format").value;
  const body = { text, speaker: $("speaker").value || undefined, speed: Number($("speed").value),
                 normalize: $("normalize").checked, format: "pcm", stream: true };
  audioContext();  // inside the click: allowed to start sound
  stopPlayback();
  $("download").hidden = true;     // nothing to download until this clip is complete
  drawWave(null, 0);
  $("progress").textContent = "";
  setStatus("Synthesising… / 合成中…", false);
  busy(true);
  const controller = new AbortController();
  state.controller = controller;
  const started = performance.now();
  let firstAudio = null;
  const pcmParts = [], floatParts = [];
  let count = 0, carry = null, lastDraw = 0;
  let waveBuffer = new Float32Array(RATE * 10);
  const progress = (final) => {
    const elapsed = (performance.now() - started) / 1000, audio = count / RATE;
    const rtf = audio > 0 ? ` · RTF ${(elapsed / audio).toFixed(2)}` : "";
    const first = firstAudio !== null ? ` · first audio after ${firstAudio.toFixed(2)} s` : "";
    $("progress").textContent = `${audio.toFixed(2)} s of audio in ${elapsed.toFixed(2)} s${rtf}${first}`;
    if (final || performance.now() - lastDraw > 200) {
      drawWave(waveBuffer, count);
      lastDraw = performance.now();
    }
  };
  try {
    const response = await fetch("/tts", { method: "POST", headers: headers(true), body: JSON.stringify(body),
                                           signal: controller.signal });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      let bytes = value;
      if (carry) {
        bytes = new Uint8Array(carry.length + value.length);
        bytes.set(carry);
        bytes.set(value, carry.length);
        carry = null;
      }
      const even = bytes.length - (bytes.length % 2);
      if (even < bytes.length) carry = bytes.slice(even);
      if (!even) continue;
      const pcm = new Int16Array(bytes.slice(0, even).buffer);  // a copy: aligned, little-endian s16
      const samples = Float32Array.from(pcm, (v) => v / 32768);
      if (firstAudio === null) {
        firstAudio = (performance.now() - started) / 1000;
        setStatus("Playing while synthesising… / 边合成边播放…", false);
      }
      schedule(samples);
      pcmParts.push(pcm);
      floatParts.push(samples);
      if (count + samples.length > waveBuffer.length) {
        const grown = new Float32Array(Math.max(waveBuffer.length * 2, count + samples.length));
        grown.set(waveBuffer.subarray(0, count));
        waveBuffer = grown;
      }
      waveBuffer.set(samples, count);
      count += samples.length;
      progress(false);
    }
    progress(true);
    const clip = { id: state.nextId++, text, speaker: $("speaker").value, format,
                   pcm: concat(pcmParts, count, Int16Array), samples: concat(floatParts, count, Float32Array) };
    addClip(clip);
    const elapsed = (performance.now() - started) / 1000;
    setStatus(`Done: ${(count / RATE).toFixed(2)} s of audio in ${elapsed.toFixed(2)} s / 完成`, false);
  } catch (e) {
    stopPlayback();
    drawWave(null, 0);
    if (controller.signal.aborted) {
      setStatus(`Cancelled after ${(count / RATE).toFixed(2)} s of audio / 已取消`, false);
    } else {
      $("progress").textContent = "";
      setStatus(count ? `The stream broke off after ${(count / RATE).toFixed(2)} s of audio: ${e.message}`
        : e.message || String(e), true);
    }
  } finally {
    state.controller = null;
    busy(false);
  }
}

function cancel() {
  if (state.controller) state.controller.abort();
}

$("speed").addEventListener("input", () => { $("speed-value").textContent = Number($("speed").value).toFixed(2); });
$("speaker").addEventListener("change", followSpeakerLanguage);
$("text").addEventListener("input", () => { state.edited = true; });
$("speak").addEventListener("click", speak);
$("stop").addEventListener("click", cancel);
$("apikey").value = localStorage.getItem("cosyvoice-lite-key") || "";
$("apikey").addEventListener("change", () => { localStorage.setItem("cosyvoice-lite-key", $("apikey").value); loadSpeakers(); });
loadSpeakers();
