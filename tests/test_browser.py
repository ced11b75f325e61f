"""The web page in a real headless browser (Debian's chromium; skipped where it is not installed, required under CI) against a real gunicorn (the
offline voice behind the test gate, so that a stream can be held after its first chunk): playback starts with the
first chunk, progress and a waveform show, Stop cancels the request, clips are kept to replay and download, and an
error clears the last clip instead of leaving it on the page.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in, fd 4 out, JSON messages
ending in NUL), so the test needs no driver and no Python package beyond the standard library."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Gate, gunicorn, linked_model, require_program
from golden_data import GOLDEN_MODES

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required", "--remote-debugging-pipe", "about:blank"]


class Chromium:
    """Minimal DevTools client over chromium's debugging pipe."""

    def __init__(self, executable: str, profile: Path, log_path: Path, flags: tuple[str, ...] = ()):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds():  # in the child: the protocol wants fds 3 (commands) and 4 (replies), inheritable
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([executable, f"--user-data-dir={profile}", *flags, *FLAGS], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, close_fds=False,
                                         preexec_fn=wire_fds, start_new_session=True)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.session = None

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from chromium")
            ready, _, _ = select.select([self._from_browser], [], [], remaining)
            if ready:
                data = os.read(self._from_browser, 1 << 20)
                if not data:
                    raise RuntimeError("chromium closed the debugging pipe")
                self._buffer += data
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open_page(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str, timeout: float = 60.0):
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True, "timeout": timeout * 1000}, timeout + 5)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot")["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(5)
        os.close(self._to_browser)
        os.close(self._from_browser)


# In the page: helpers for the scripts below.
PAGE_HELPERS = r"""
const $ = (id) => document.getElementById(id);
const until = async (check, what, ms = 30000) => {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error("timed out waiting for " + what + "; status: " + $("status").textContent);
    await new Promise((r) => setTimeout(r, 50));
  }
};
const inkedColumns = () => {
  const c = $("wave"), data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  const columns = new Set();
  for (let i = 3; i < data.length; i += 4) if (data[i]) columns.add(((i - 3) / 4) % c.width);
  return columns.size;
};
const bytesOf = async (url) => new Uint8Array(await (await fetch(url)).arrayBuffer());
"""


def run_in_page(browser, body: str, **args):
    """``browser``: a Chromium (its current page), or a server fixture whose page is then the one evaluated;
    ``args``: values the script reads as ``args.name``."""
    if not isinstance(browser, Chromium):
        browser.browser.session = browser.session
        browser = browser.browser
    return browser.evaluate("(async () => {const args = " + json.dumps(args) + ";" + PAGE_HELPERS + body + "})()")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = require_program("chromium", "apt-get install chromium")
    tmp = tmp_path_factory.mktemp("chromium")
    chrome = Chromium(executable, tmp / "profile", tmp / "chromium.log")
    yield chrome
    chrome.close()


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    """A gunicorn with the offline voice behind a gate, MAX_TEXT_CHARS=300, and the page open in chromium."""
    tmp = tmp_path_factory.mktemp("page")
    gate = Gate(tmp / "gate")
    with gunicorn(tmp, {"MAX_TEXT_CHARS": "300"}, gate=gate) as server:
        browser.open_page(f"http://127.0.0.1:{server.port}/")
        server.gate, server.browser = gate, browser
        yield server


@pytest.fixture
def held(page):
    """The page's server with its engine held after the first chunk of every request until gate.open()."""
    page.gate.hold("after_first")
    yield page
    page.gate.release()
    page.wait_for(lambda: page.metric("cosyvoice_in_progress") == 0, 15, "idle server")


def test_page_defaults_to_text_in_the_engines_language_and_renders_the_hint(page):
    result = run_in_page(page.browser, r"""
      await until(() => $("speaker").options.length > 0, "speakers");
      return {text: $("text").value, speakers: [...$("speaker").options].map((o) => o.value),
              note: $("engine").textContent, code: [...$("engine").querySelectorAll("code")].map((c) => c.textContent),
              speedRange: [$("speed").min, $("speed").max], normalize: $("normalize").checked,
              formats: [...$("format").options].map((o) => o.value), downloadShown: $("download").offsetParent !== null,
              favicon: document.querySelector("link[rel=icon]").href};
    """)
    assert result["speakers"] == ["en_US-joe-medium"]
    assert result["text"].startswith("Hello!") and not any("\u4e00" <= ch <= "\u9fff" for ch in result["text"])
    assert "piper" in result["note"] and "`" not in result["note"] and "./run download" in result["code"]
    assert result["speedRange"] == ["0.25", "4"] and result["normalize"] is True
    assert result["formats"] == ["wav", "pcm"]
    assert result["downloadShown"] is False  # no audio yet: no Download button
    status, headers, body = page.request("GET", "/favicon.ico")
    assert status == 200 and headers["content-type"].startswith("image/svg+xml") and body.startswith(b"<svg")


def test_playback_starts_with_the_first_chunk_and_the_clip_is_kept_for_download(held):
    first = run_in_page(held.browser, r"""
      await until(() => $("speaker").options.length > 0, "speakers");
      $("text").value = "The first sentence plays at once. The second one waits for the gate. And a third.";
      $("text").dispatchEvent(new Event("input"));
      $("speed").value = "1.5";
      $("speed").dispatchEvent(new Event("input"));
      $("format").value = "wav";
      $("speak").click();
      await until(() => $("status").textContent.startsWith("Playing"), "the first chunk");
      const t0 = state.ctx.currentTime;
      await until(() => state.ctx.currentTime > t0 + 0.3, "playback to advance", 10000);
      return {status: $("status").textContent, progress: $("progress").textContent, stopShown: !$("stop").hidden,
              speakDisabled: $("speak").disabled, downloadHidden: $("download").hidden, inked: inkedColumns(),
              playing: state.sources.length, speed: $("speed-value").textContent};
    """)
    # the request is still held after its first chunk: everything above happened while synthesis was going on
    assert held.metric("cosyvoice_in_progress") == 1
    assert first["stopShown"] and first["speakDisabled"] and first["downloadHidden"]
    assert first["playing"] >= 1 and first["inked"] > 10 and first["speed"] == "1.50"
    assert " s of audio in " in first["progress"] and "RTF" in first["progress"] and "first audio" in first["progress"]
    held.gate.open()
    done = run_in_page(held.browser, r"""
      await until(() => $("status").textContent.startsWith("Done"), "the end of the stream");
      const link = $("download"), clip = state.clips[0];
      const wav = await bytesOf(link.href);
      const view = new DataView(wav.buffer);
      return {status: $("status").textContent, history: $("history").children.length, name: link.download,
              shown: link.offsetParent !== null, head: String.fromCharCode(...wav.slice(0, 4), ...wav.slice(8, 12)),
              rate: view.getUint32(24, true), dataBytes: view.getUint32(40, true), size: wav.length,
              samples: clip.samples.length, stopShown: !$("stop").hidden, inked: inkedColumns()};
    """)
    assert done["history"] >= 1 and done["shown"] and not done["stopShown"]
    assert done["name"].endswith(".wav") and done["head"] == "RIFFWAVE" and done["rate"] == 24000
    assert done["dataBytes"] == 2 * done["samples"] == done["size"] - 44 and done["samples"] > 24000
    assert done["inked"] > 300
    held.browser.screenshot(held.log_path.parent / "page.png")
    lines = [line for line in held.log().splitlines() if "POST /tts status=200" in line]
    assert lines and "format=pcm stream=true" in lines[-1]  # the page streams PCM whatever it offers to download


def test_stop_cancels_the_request_and_keeps_no_clip(held):
    result = run_in_page(held.browser, r"""
      await until(() => $("speaker").options.length > 0, "speakers");
      const before = $("history").children.length;
      $("text").value = "This one is cancelled. It never gets to the second sentence.";
      $("speak").click();
      await until(() => $("status").textContent.startsWith("Playing"), "the first chunk");
      $("stop").click();
      await until(() => $("status").textContent.startsWith("Cancelled"), "the cancellation");
      return {status: $("status").textContent, history: $("history").children.length, before,
              playing: state.sources.length, inked: inkedColumns(), downloadHidden: $("download").hidden,
              speakEnabled: !$("speak").disabled, stopHidden: $("stop").hidden};
    """)
    assert result["history"] == result["before"] and result["playing"] == 0 and result["inked"] == 0
    assert result["downloadHidden"] and result["speakEnabled"] and result["stopHidden"]
    # the server saw the client go and stopped synthesising (the gate is still closed)
    held.wait_for(lambda: held.metric("cosyvoice_in_progress") == 0, 10, "the cancelled synthesis to stop")
    held.wait_for(lambda: "client_gone" in held.log(), 10, "the log line of the cancelled request")


def test_history_replays_and_downloads_raw_pcm(page):
    result = run_in_page(page.browser, r"""
      await until(() => $("speaker").options.length > 0, "speakers");
      $("text").value = "Raw samples, please.";
      $("format").value = "pcm";
      $("speak").click();
      await until(() => $("status").textContent.startsWith("Done"), "synthesis");
      const item = $("history").children[0];
      const link = item.querySelector("a");
      const pcm = await bytesOf(link.href);
      item.querySelector("button.replay").click();
      const playing = state.sources.length;
      return {name: link.download, size: pcm.length, samples: state.clips[0].samples.length, playing,
              head: String.fromCharCode(...pcm.slice(0, 4)), items: $("history").children.length,
              status: $("status").textContent};
    """)
    assert result["name"].endswith(".pcm") and result["size"] == 2 * result["samples"] > 0
    assert result["head"] != "RIFF" and result["playing"] == 1 and result["status"].startswith("Playing clip")
    assert 1 <= result["items"] <= 5


def test_an_error_is_shown_and_clears_the_last_clip(page):
    result = run_in_page(page.browser, r"""
      await until(() => $("speaker").options.length > 0, "speakers");
      $("text").value = "A clip first.";
      $("speak").click();
      await until(() => $("status").textContent.startsWith("Done"), "synthesis");
      const inkedBefore = inkedColumns(), shownBefore = !$("download").hidden;
      $("text").value = "Too long. ".repeat(40);
      $("speak").click();
      await until(() => $("status").className === "error", "the error");
      return {status: $("status").textContent, inkedBefore, shownBefore, inked: inkedColumns(),
              downloadHidden: $("download").hidden, progress: $("progress").textContent,
              speakEnabled: !$("speak").disabled};
    """)
    assert result["shownBefore"] and result["inkedBefore"] > 0
    assert "300" in result["status"]  # the server's message names the limit
    assert result["downloadHidden"] and result["inked"] == 0 and result["progress"] == "" and result["speakEnabled"]


def test_recording_without_a_microphone_says_so(page):
    # headless chromium has no audio input device at all: the page says what to do instead of failing silently
    result = run_in_page(page.browser, r"""
      await until(() => !$("voices").hidden, "the offers from /speakers");
      $("record").click();
      await until(() => $("clip-info").classList.contains("error"), "the recording's error");
      return {status: $("clip-info").textContent, recordEnabled: !$("record").disabled,
              stopHidden: $("record-stop").hidden, clip: state.clip};
    """)
    assert result["status"].startswith("No microphone was found: connect one, or upload a clip instead")
    assert result["recordEnabled"] and result["stopHidden"] and result["clip"] is None


def test_without_cloning_the_voice_part_says_why_in_one_line_and_the_instruction_box_is_hidden(page):
    result = run_in_page(page.browser, r"""
      await until(() => !$("voices").hidden, "the offers from /speakers");
      const shown = (id) => $(id).offsetParent !== null;
      return {why: $("voices-why").textContent, code: [...$("voices-why").querySelectorAll("code")].map((c) => c.textContent),
              whyShown: shown("voices-why"), tools: shown("voice-tools"), record: shown("record"),
              instructions: shown("instruct-box"), groups: $("speaker").querySelectorAll("optgroup").length};
    """)
    # the offline voice offers its speaker and nothing else: no upload, no recording, no list, no instructions
    assert result["whyShown"] and not result["tools"] and not result["record"] and not result["instructions"]
    assert result["why"].startswith("The offline voice cannot make voices") and "\n" not in result["why"]
    assert result["code"] == ["campplus.onnx", "speech_tokenizer_v1.onnx"]
    assert result["groups"] == 0  # no saved voices in the speaker list



# ---- voices of your own: a tiny CosyVoice model with the two ONNX stand-ins, which can make voices --------------

KEY = "page-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def reference_clip() -> tuple[Path, str, float]:
    """A reference clip of the golden-modes set, its transcript and its length in seconds."""
    prompts = GOLDEN_MODES / "prompts"
    name, info = next(iter(json.loads((prompts / "prompts.json").read_text()).items()))
    return prompts / name, info["text"], round(info["frames"] / info["sample_rate"], 3)


@pytest.fixture(scope="module")
def cloning_model_dir(tmp_path_factory):
    """The golden-modes model (the tiny model with the two stand-in ONNX networks): one that can make voices. Linked
    file by file, as tests/test_voices.py does, into a directory whose name says SFT."""
    return linked_model(tmp_path_factory.mktemp("models"), "tiny-sft", GOLDEN_MODES / "model")


@pytest.fixture(scope="module")
def mic_browser(tmp_path_factory):
    """Chromium with a fake microphone (a beep). Headless, it has no permission prompt: the microphone is denied
    until the test grants it (Browser.grantPermissions), as a user would in the prompt."""
    executable = require_program("chromium", "apt-get install chromium")
    tmp = tmp_path_factory.mktemp("chromium-mic")
    chrome = Chromium(executable, tmp / "profile", tmp / "chromium.log", flags=("--use-fake-device-for-media-stream",))
    yield chrome
    chrome.close()


@contextlib.contextmanager
def served_page(browser, tmp, env):
    """A gunicorn with ``env``, its page open in ``browser`` (the server knows the browser and its session)."""
    with gunicorn(tmp, env) as server:
        browser.open_page(f"http://127.0.0.1:{server.port}/")
        server.browser, server.session = browser, browser.session
        yield server


@pytest.fixture(scope="module")
def voice_page(mic_browser, cloning_model_dir, tmp_path_factory):
    """A gunicorn on the model that can make voices, with API_KEY set, and the page open in the fake-mic browser."""
    tmp = tmp_path_factory.mktemp("voices")
    env = {"MODEL_DIR": str(cloning_model_dir), "API_KEY": KEY, "MAX_TEXT_CHARS": "300"}
    with served_page(mic_browser, tmp, env) as server:
        server.origin = f"http://127.0.0.1:{server.port}"
        yield server


def choose_file(server, selector: str, path: Path) -> None:
    """Pick ``path`` in the page's file input as a user would (DevTools: DOM.setFileInputFiles fires 'change')."""
    browser = server.browser
    browser.session = server.session
    root = browser.send("DOM.getDocument")["root"]["nodeId"]
    node = browser.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
    browser.send("DOM.setFileInputFiles", {"files": [str(path)], "nodeId": node})


def saved_voices(server) -> list[dict]:
    status, _, body = server.request("GET", "/v1/audio/voices", headers=AUTH)
    assert status == 200
    return [v for v in json.loads(body)["voices"] if v.get("object") == "voice"]


def test_with_an_api_key_the_page_asks_for_it_then_offers_to_make_voices(voice_page):
    result = run_in_page(voice_page, r"""
      await until(() => $("auth").open, "the key prompt");
      const before = {engine: $("engine").textContent, voices: !$("voices").hidden};
      $("apikey").value = args.key;
      $("apikey").dispatchEvent(new Event("change"));
      await until(() => !$("voices").hidden, "the offers from /speakers");
      const shown = (id) => $(id).offsetParent !== null;
      return {before, tools: shown("voice-tools"), why: shown("voices-why"), record: shown("record"),
              upload: shown("clip-file"), list: [...$("voice-list").children].map((li) => li.textContent),
              instructions: shown("instruct-box")};
    """, key=KEY)
    status, _, body = voice_page.request("GET", "/speakers", headers=AUTH)
    offers = json.loads(body)["offers"]
    assert status == 200 and offers["cloning"]
    assert result["before"] == {"engine": "This server needs an API key / 需要密钥", "voices": False}
    assert result["tools"] and result["upload"] and result["record"] and not result["why"]
    assert result["list"] == ["None yet. / 暂无"]
    assert result["instructions"] == offers["instructions"]  # the box follows what the model takes


def test_a_voice_made_from_an_uploaded_clip_is_listed_speaks_and_is_deleted(voice_page):
    prompt, transcript, seconds = reference_clip()
    choose_file(voice_page, "#clip-file", prompt)
    made = run_in_page(voice_page, r"""
      await until(() => state.clip, "the chosen file");
      $("clip-text").value = args.transcript;
      $("voice-name").value = "Fox reader";
      $("make-voice").click();
      await until(() => $("voice-status").textContent.startsWith("Made") || $("voice-status").className === "error",
                  "the new voice", 120000);
      const item = $("voice-list").querySelector("li[data-id]");
      return {status: $("voice-status").textContent, info: $("clip-info").textContent,
              preview: !$("clip-preview").hidden, id: item && item.dataset.id, item: item && item.textContent,
              selected: $("speaker").value, group: [...$("speaker").querySelectorAll("optgroup option")].map((o) => o.value)};
    """, transcript=transcript)
    assert made["status"].startswith(f"Made Fox reader (zero-shot, {seconds:g} s of audio)"), made["status"]
    assert made["info"].startswith(prompt.name) and made["preview"]
    voice_id = made["id"]
    assert voice_id.startswith("voice_") and "Fox reader" in made["item"] and "zero-shot" in made["item"]
    assert made["selected"] == voice_id and made["group"] == [voice_id]  # the new voice is the speaker now
    [saved] = saved_voices(voice_page)
    assert saved["id"] == voice_id and saved["mode"] == "zero_shot" and saved["transcript"] == transcript

    spoken = run_in_page(voice_page, r"""
      $("text").value = "Hello from a voice of my own.";
      $("text").dispatchEvent(new Event("input"));
      $("speak").click();
      await until(() => $("status").textContent.startsWith("Done") || $("status").className === "error",
                  "the synthesis", 120000);
      return {status: $("status").textContent, clip: state.clips[0] && state.clips[0].speaker,
              samples: state.clips[0] ? state.clips[0].samples.length : 0, inked: inkedColumns()};
    """)
    assert spoken["status"].startswith("Done") and spoken["clip"] == voice_id
    assert spoken["samples"] > 0 and spoken["inked"] > 0
    assert "POST /tts status=200 speaker=Fox reader " in voice_page.log()  # the server spoke with the saved voice
    voice_page.browser.screenshot(voice_page.log_path.parent / "voices.png")

    deleted = run_in_page(voice_page, r"""
      $("voice-list").querySelector(`li[data-id="${args.id}"] button.delete`).click();
      await until(() => !$("voice-list").querySelector("li[data-id]"), "the deletion");
      return {status: $("voice-status").textContent, options: [...$("speaker").options].map((o) => o.value),
              selected: $("speaker").value};
    """, id=voice_id)
    assert deleted["status"] == "Deleted Fox reader / 已删除"
    assert voice_id not in deleted["options"] and deleted["selected"] == deleted["options"][0]
    assert saved_voices(voice_page) == []
    assert voice_page.request("GET", f"/v1/audio/voices/{voice_id}", headers=AUTH)[0] == 404


def test_the_servers_refusals_are_shown_and_making_a_voice_needs_the_key(voice_page):
    choose_file(voice_page, "#clip-file", GOLDEN_MODES / "prompts" / "prompts.json")  # not audio
    result = run_in_page(voice_page, r"""
      const errorOf = async () => {
        $("voice-status").textContent = "";
        $("make-voice").click();
        await until(() => $("voice-status").className === "error", "the error", 60000);
        return $("voice-status").textContent;
      };
      await until(() => state.clip && state.clip.name === "prompts.json", "the chosen file");
      const notAudio = await errorOf();
      $("apikey").value = "wrong";  // read at every request, like a user's edit before a click
      const wrongKey = await errorOf();
      const askedForKey = $("auth").open;
      $("apikey").value = args.key;
      return {notAudio, wrongKey, askedForKey, makeEnabled: !$("make-voice").disabled};
    """, key=KEY)
    assert "could not be decoded" in result["notAudio"] and "send WAV, FLAC or OGG" in result["notAudio"]
    assert result["wrongKey"].startswith("missing or wrong API key") and result["askedForKey"]
    assert result["makeEnabled"] and saved_voices(voice_page) == []


def test_a_recorded_clip_makes_a_cross_lingual_voice_once_the_microphone_is_allowed(voice_page):
    browser = voice_page.browser
    browser.session = voice_page.session
    browser.send("Browser.resetPermissions")
    denied = run_in_page(voice_page, r"""
      $("record").click();
      await until(() => $("clip-info").classList.contains("error"), "the recording's error");
      return $("clip-info").textContent;
    """)
    assert denied.startswith("Microphone permission was denied: allow the microphone for this site")
    browser.send("Browser.grantPermissions", {"permissions": ["audioCapture"], "origin": voice_page.origin})
    made = run_in_page(voice_page, r"""
      $("record").click();
      await until(() => !$("record-stop").hidden, "the recording to start");
      const recording = $("clip-info").textContent;
      await new Promise((r) => setTimeout(r, 2000));
      $("record-stop").click();
      await until(() => state.clip && state.clip.name === "recording.wav", "the recorded clip");
      const wav = new Uint8Array(await state.clip.blob.arrayBuffer()), view = new DataView(wav.buffer);
      $("clip-text").value = "";  // no transcript: a cross-lingual voice
      $("voice-name").value = "Beeper";
      $("make-voice").click();
      await until(() => $("voice-status").textContent.startsWith("Made") || $("voice-status").className === "error",
                  "the new voice", 120000);
      return {recording, info: $("clip-info").textContent, head: String.fromCharCode(...wav.slice(0, 4)),
              rate: view.getUint32(24, true), channels: view.getUint16(22, true), status: $("voice-status").textContent,
              id: ($("voice-list").querySelector("li[data-id]") || {dataset: {}}).dataset.id};
    """)
    assert made["recording"].startswith("Recording…")
    assert made["info"].startswith("Recorded ") and made["head"] == "RIFF"
    assert made["rate"] == 24000 and made["channels"] == 1  # decoded in the page: the server does not read webm
    assert made["status"].startswith("Made Beeper (cross-lingual, "), made["status"]
    [saved] = saved_voices(voice_page)
    assert saved["id"] == made["id"] and saved["mode"] == "cross_lingual" and 1.5 < saved["prompt_seconds"] < 3
    assert voice_page.request("DELETE", f"/v1/audio/voices/{made['id']}", headers=AUTH)[0] == 200


@pytest.fixture(scope="module")
def instruct_page(mic_browser, tiny_model_dir, tmp_path_factory):
    """A gunicorn on the tiny model taken as CosyVoice-300M-Instruct (MODEL_KIND), the page open beside the others."""
    tmp = tmp_path_factory.mktemp("instruct")
    with served_page(mic_browser, tmp, {"MODEL_DIR": str(tiny_model_dir), "MODEL_KIND": "instruct"}) as server:
        yield server


def test_the_instruction_box_shows_when_the_model_takes_instructions_and_its_words_are_sent(instruct_page):
    result = run_in_page(instruct_page, r"""
      await until(() => !$("voices").hidden, "the offers from /speakers");
      const sent = [], realFetch = window.fetch;
      window.fetch = (url, init) => { if (url === "/tts") sent.push(JSON.parse(init.body)); return realFetch(url, init); };
      const shown = $("instruct-box").offsetParent !== null, label = document.querySelector("label[for=instructions]");
      $("instructions").value = "Speak slowly and calmly.";
      $("text").value = "An instructed sentence.";
      $("speak").click();
      await until(() => $("status").textContent.startsWith("Done") || $("status").className === "error",
                  "the synthesis", 120000);
      window.fetch = realFetch;
      return {shown, label: label && label.textContent, status: $("status").textContent, sent};
    """)
    _, _, body = instruct_page.request("GET", "/speakers")
    assert json.loads(body)["offers"]["instructions"]
    assert result["shown"] and result["label"].startswith("Instructions")
    assert result["status"].startswith("Done"), result["status"]
    assert [b.get("instructions") for b in result["sent"]] == ["Speak slowly and calmly."]


@pytest.fixture(scope="module")
def base_page(mic_browser, base_model_dir, tmp_path_factory):
    """A gunicorn on a base model (no spk2info.pt: no speaker of its own), the page open beside the others."""
    tmp = tmp_path_factory.mktemp("base")
    with served_page(mic_browser, tmp, {"MODEL_DIR": str(base_model_dir)}) as server:
        yield server


def test_without_built_in_speakers_the_page_says_to_make_a_voice_and_shows_the_servers_refusal(base_page):
    result = run_in_page(base_page, r"""
      await until(() => !$("voices").hidden, "the offers from /speakers");
      const options = [...$("speaker").options].map((o) => [o.value, o.textContent]);
      $("speak").click();
      await until(() => $("status").className === "error", "the refusal");
      return {options, engine: $("engine").textContent, tools: $("voice-tools").offsetParent !== null,
              status: $("status").textContent, clips: state.clips.length};
    """)
    assert result["options"] == [["", "No voice yet: make one below / 请先在下方创建声音"]]
    assert "no built-in speakers" in result["engine"] and result["tools"]
    assert result["status"].startswith("no speaker given; this model (cosyvoice-300m) has no built-in speakers")
    assert result["clips"] == 0
