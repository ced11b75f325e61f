// cosyvoice-lite web page: synthesise with POST /tts as a PCM stream (24 kHz s16le), play it with Web Audio as the
// chunks arrive, show progress and the waveform, and keep the last clips to replay and download (built here).
// Where the model offers it (GET /speakers: offers): make voices of your own from an uploaded or recorded clip
// (POST /v1/audio/voices), list and delete them, speak with them; and say how to speak (instructions).
"use strict";

const $ = (id) => document.getElementById(id);
const RATE = 24000;           // /tts always answers 24 kHz mono
const HISTORY = 5;            // clips kept for replay and download
const MAX_CLIP_SECONDS = 30;  // the server's limit for a reference clip (the speech tokenizer's)
const CLIP_RATE = 24000;      // recordings are sent as 16-bit WAV at this rate (the server wants >= 16 kHz)
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
  speakers: [],       // built-in speakers from /speakers, then saved voices ({saved: true})
  saved: [],          // saved voices as GET /v1/audio/voices lists them
  clip: null,         // the reference clip to make a voice from: {blob, name}
  recording: null,    // {recorder, stream, timer, started} while recording
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
  const language = (speaker && speaker.language) || "en";
  return SAMPLE_TEXT[language] || SAMPLE_TEXT[language.split("-")[0]] || SAMPLE_TEXT.en;
}

function followSpeakerLanguage() {
  if (!state.edited) $("text").value = sampleTextFor($("speaker").value);
}

function speakerOption(id, label, selected) {
  const option = document.createElement("option");
  option.value = id;
  option.textContent = label;
  option.selected = selected;
  return option;
}

// The speaker list: the model's own speakers, then the saved voices in a group of their own. The selection is
// kept across reloads (making or deleting a voice reloads it) while that speaker still exists.
function renderSpeakers(defaultId) {
  const select = $("speaker");
  const keep = select.value;
  const wanted = state.speakers.some((s) => s.id === keep) ? keep : defaultId;
  select.innerHTML = "";
  for (const s of state.speakers.filter((s) => !s.saved)) {
    const label = s.alias && s.alias !== s.id ? `${s.id} (${s.alias}, ${s.language})` : `${s.id} (${s.language})`;
    select.appendChild(speakerOption(s.id, label, s.id === wanted));
  }
  if (!state.speakers.length) {  // a model without built-in speakers (the base model), before a voice is made
    select.appendChild(speakerOption("", "No voice yet: make one below / 请先在下方创建声音", true));
  }
  const saved = state.speakers.filter((s) => s.saved);
  if (saved.length) {
    const group = document.createElement("optgroup");
    group.label = "Your voices / 你的声音";
    for (const s of saved) group.appendChild(speakerOption(s.id, `${s.alias || s.id} (${s.language}, saved)`, s.id === wanted));
    select.appendChild(group);
  }
}

// One line on why this server cannot make voices (the voice-making part is hidden then).
function whyNoCloning(info) {
  const needs = "making a voice needs a CosyVoice-300M model with its speech tokenizer files " +
    "(`campplus.onnx`, `speech_tokenizer_v1.onnx`)";
  if (info.engine === "piper") return `The offline voice cannot make voices of your own: ${needs}.`;
  return `This model (${info.model || info.engine}) cannot make voices of your own: ${needs}.`;
}

function showOffers(info) {
  const offers = info.offers || {};  // an older server says nothing: it offers nothing beyond its speakers
  $("instruct-box").hidden = !offers.instructions;
  $("voices").hidden = false;
  $("voice-tools").hidden = !offers.cloning;
  $("voices-why").hidden = Boolean(offers.cloning);
  if (!offers.cloning) setRichText($("voices-why"), whyNoCloning(info));
}

async function loadSaved() {
  const response = await fetch("/v1/audio/voices", { headers: headers(false) });
  if (!response.ok) {
    voiceStatus("Saved voices could not be listed: " + await errorText(response), true);
    return [];
  }
  return (await response.json()).voices.filter((v) => v.object === "voice");  // built-in entries have none
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
  const cloning = Boolean(info.offers && info.offers.cloning);
  state.saved = cloning ? await loadSaved() : [];
  const savedIds = new Set(state.saved.map((v) => v.id));
  // /speakers may list saved voices too: each is shown once, in the saved group
  state.speakers = info.speakers.filter((s) => !savedIds.has(s.id))
    .concat(state.saved.map((v) => ({ id: v.id, alias: v.name, language: v.language, saved: true })));
  renderSpeakers(info.default);
  renderVoices();
  setRichText($("engine"), "Engine / 引擎: " + info.engine + (info.hint ? " — " + info.hint : ""));
  $("engine").className = info.hint ? "note warn" : "note";
  showOffers(info);
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

function wavBlob(pcm, rate = RATE) {
  const header = new DataView(new ArrayBuffer(44));
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) header.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); header.setUint32(4, 36 + pcm.byteLength, true); text(8, "WAVE");
  text(12, "fmt "); header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 1, true);
  header.setUint32(24, rate, true); header.setUint32(28, rate * 2, true); header.setUint16(32, 2, true);
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
  const instructions = $("instructions").value.trim();
  if (!$("instruct-box").hidden && instructions) body.instructions = instructions;
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

// ---- voices of your own: the reference clip (uploaded or recorded), making, listing, deleting ---------------

function voiceStatus(text, isError) {
  $("voice-status").textContent = text;
  $("voice-status").className = isError ? "error" : "";
}

function clipStatus(text, isError) {
  $("clip-info").textContent = text;
  $("clip-info").className = isError ? "note error" : "note";
}

function setClip(blob, name, info) {
  state.clip = { blob, name };
  const preview = $("clip-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  preview.hidden = false;
  clipStatus(info, false);
}

function chooseFile() {
  const file = $("clip-file").files[0];
  if (!file) return;
  // sent as it is: the server decodes it and says what is wrong with it (rate, length, format)
  setClip(file, file.name, `${file.name}, ${(file.size / 1024).toFixed(0)} KiB`);
  voiceStatus("", false);
}

// Why recording cannot start, in words a user can act on (getUserMedia's DOMException names).
function microphoneProblem(error) {
  const name = error && error.name;
  if (name === "NotAllowedError" || name === "SecurityError")
    return "Microphone permission was denied: allow the microphone for this site, or upload a clip instead. / 麦克风权限被拒绝";
  if (name === "NotFoundError" || name === "OverconstrainedError")
    return "No microphone was found: connect one, or upload a clip instead. / 未找到麦克风";
  if (name === "NotReadableError")
    return "The microphone is busy or failed to start: close other programs using it, or upload a clip instead. / 麦克风无法使用";
  return `Recording is not possible here (${name || "error"}: ${error && error.message}): upload a clip instead.`;
}

// A recording (webm/ogg from MediaRecorder, which the server does not read) as a mono 16-bit WAV at CLIP_RATE.
async function recordingToWav(blob) {
  const decoder = new OfflineAudioContext(1, 1, CLIP_RATE);  // decodeAudioData resamples to the context's rate
  const audio = await decoder.decodeAudioData(await blob.arrayBuffer());
  const mono = new Float32Array(audio.length);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    const channel = audio.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / audio.numberOfChannels;
  }
  const pcm = Int16Array.from(mono, (v) => Math.max(-32768, Math.min(32767, Math.round(v * 32768))));
  return { wav: wavBlob(pcm, CLIP_RATE), seconds: mono.length / CLIP_RATE };
}

async function startRecording() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || typeof MediaRecorder === "undefined") {
    clipStatus("This browser cannot record here (recording needs https or localhost, and MediaRecorder): " +
      "upload a clip instead. / 此浏览器无法录音", true);
    return;
  }
  $("record").disabled = true;
  clipStatus("Asking for the microphone… / 请求麦克风…", false);
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    $("record").disabled = false;
    clipStatus(microphoneProblem(e), true);
    return;
  }
  const recorder = new MediaRecorder(stream);
  const parts = [];
  const started = performance.now();
  recorder.ondataavailable = (event) => { if (event.data.size) parts.push(event.data); };
  recorder.onstop = async () => {
    for (const track of stream.getTracks()) track.stop();
    clearInterval(state.recording.timer);
    state.recording = null;
    $("record-stop").hidden = true;
    try {
      const { wav, seconds } = await recordingToWav(new Blob(parts, { type: recorder.mimeType }));
      setClip(wav, "recording.wav", `Recorded ${seconds.toFixed(1)} s / 已录音`);
    } catch (e) {
      clipStatus("The recording could not be read: " + (e.message || e), true);
    } finally {
      $("record").disabled = false;  // only now: the clip (or the error) is on the page
    }
  };
  const timer = setInterval(() => {
    const seconds = (performance.now() - started) / 1000;
    clipStatus(`Recording… ${seconds.toFixed(0)} s (up to ${MAX_CLIP_SECONDS} s) / 录音中…`, false);
    if (seconds >= MAX_CLIP_SECONDS - 0.5) stopRecording();  // the server refuses longer clips
  }, 250);
  state.recording = { recorder, stream, timer };
  recorder.start(250);
  $("record-stop").hidden = false;
  clipStatus("Recording… / 录音中…", false);
}

function stopRecording() {
  if (state.recording && state.recording.recorder.state !== "inactive") state.recording.recorder.stop();
}

async function makeVoice() {
  if (state.recording) { voiceStatus("Stop the recording first / 请先停止录音", true); return; }
  if (!state.clip) { voiceStatus("Choose or record a reference clip first / 请先选择或录制参考音频", true); return; }
  const form = new FormData();
  form.append("file", state.clip.blob, state.clip.name);
  const transcript = $("clip-text").value.trim(), name = $("voice-name").value.trim();
  if (transcript) form.append("text", transcript);
  if (name) form.append("name", name);
  $("make-voice").disabled = true;
  voiceStatus("Making the voice… / 创建中…", false);
  try {
    // no Content-Type: the browser writes the multipart boundary itself
    const response = await fetch("/v1/audio/voices", { method: "POST", headers: headers(false), body: form });
    if (response.status === 401) $("auth").open = true;
    if (!response.ok) throw new Error(await errorText(response));
    const voice = await response.json();
    await loadSpeakers();
    $("speaker").value = voice.id;  // the new voice speaks next
    followSpeakerLanguage();
    const mode = voice.mode === "zero_shot" ? "zero-shot" : "cross-lingual";
    voiceStatus(`Made ${voice.name || voice.id} (${mode}, ${voice.prompt_seconds} s of audio); it is now the ` +
      "speaker above. / 已创建", false);
  } catch (e) {
    voiceStatus(e.message || String(e), true);
  } finally {
    $("make-voice").disabled = false;
  }
}

async function deleteVoice(voice) {
  const response = await fetch("/v1/audio/voices/" + encodeURIComponent(voice.id),
                               { method: "DELETE", headers: headers(false) });
  if (response.status === 401) $("auth").open = true;
  if (!response.ok) { voiceStatus(await errorText(response), true); return; }
  await loadSpeakers();
  voiceStatus(`Deleted ${voice.name || voice.id} / 已删除`, false);
}

function renderVoices() {
  const list = $("voice-list");
  list.innerHTML = "";
  if (!state.saved.length) {
    const item = document.createElement("li");
    item.className = "note";
    item.textContent = "None yet. / 暂无";
    list.appendChild(item);
  }
  for (const voice of state.saved) {
    const item = document.createElement("li");
    item.dataset.id = voice.id;
    const title = document.createElement("strong");
    title.textContent = voice.name || voice.id;
    const mode = voice.mode === "zero_shot" ? "zero-shot" : "cross-lingual";
    const details = document.createElement("span");
    details.className = "note";
    details.textContent = ` ${voice.language}, ${mode}, ${voice.prompt_seconds} s · `;
    const id = document.createElement("code");
    id.textContent = voice.id;
    details.appendChild(id);
    const use = document.createElement("button");
    use.type = "button";
    use.className = "use";
    use.textContent = "Use / 使用";
    use.setAttribute("aria-label", `Use ${title.textContent} as the speaker`);
    use.addEventListener("click", () => { $("speaker").value = voice.id; followSpeakerLanguage(); $("text").focus(); });
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "delete secondary";
    remove.textContent = "Delete / 删除";
    remove.setAttribute("aria-label", `Delete ${title.textContent}`);
    remove.addEventListener("click", () => deleteVoice(voice));
    item.append(title, details, use, remove);
    list.appendChild(item);
  }
}

$("speed").addEventListener("input", () => { $("speed-value").textContent = Number($("speed").value).toFixed(2); });
$("speaker").addEventListener("change", followSpeakerLanguage);
$("text").addEventListener("input", () => { state.edited = true; });
$("speak").addEventListener("click", speak);
$("stop").addEventListener("click", cancel);
$("clip-file").addEventListener("change", chooseFile);
$("record").addEventListener("click", startRecording);
$("record-stop").addEventListener("click", stopRecording);
$("make-voice").addEventListener("click", makeVoice);
$("apikey").value = localStorage.getItem("cosyvoice-lite-key") || "";
$("apikey").addEventListener("change", () => { localStorage.setItem("cosyvoice-lite-key", $("apikey").value); loadSpeakers(); });
loadSpeakers();
