// cosyvoice-lite web page: pick a speaker, synthesise with POST /tts, play and download the result.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { url: null };

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
  const select = $("speaker");
  select.innerHTML = "";
  for (const s of info.speakers) {
    const option = document.createElement("option");
    option.value = s.id;
    option.textContent = s.alias && s.alias !== s.id ? `${s.id} (${s.alias}, ${s.language})` : `${s.id} (${s.language})`;
    select.appendChild(option);
  }
  $("engine").textContent = "Engine / 引擎: " + info.engine + (info.hint ? " — " + info.hint : "");
  $("engine").className = info.hint ? "note warn" : "note";
}

async function speak() {
  const text = $("text").value;
  if (!text.trim()) { setStatus("Type some text first / 请输入文本", true); return; }
  const format = $("format").value;
  const body = { text, speaker: $("speaker").value || undefined, speed: Number($("speed").value), format };
  $("speak").disabled = true;
  setStatus("Synthesising… / 合成中…", false);
  const started = performance.now();
  try {
    const response = await fetch("/tts", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    if (!response.ok) { setStatus(await errorText(response), true); return; }
    const blob = await response.blob();
    if (state.url) URL.revokeObjectURL(state.url);
    state.url = URL.createObjectURL(blob);
    const player = $("player");
    player.src = state.url;
    const link = $("download");
    link.href = state.url;
    link.download = "speech." + format;
    link.hidden = false;
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    const audioSeconds = response.headers.get("X-Audio-Duration");
    setStatus(`Done in ${seconds} s` + (audioSeconds ? `, ${Number(audioSeconds).toFixed(2)} s of audio` : ""), false);
    player.play().catch(() => { /* autoplay may be blocked; the controls are there */ });
  } catch (e) {
    setStatus("Request failed: " + e, true);
  } finally {
    $("speak").disabled = false;
  }
}

$("speed").addEventListener("input", () => { $("speed-value").textContent = Number($("speed").value).toFixed(2); });
$("speak").addEventListener("click", speak);
$("apikey").value = localStorage.getItem("cosyvoice-lite-key") || "";
$("apikey").addEventListener("change", () => { localStorage.setItem("cosyvoice-lite-key", $("apikey").value); loadSpeakers(); });
loadSpeakers();
