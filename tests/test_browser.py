"""The web page in a real headless browser (Debian's chromium, /usr/bin/chromium) against a real gunicorn:
speakers load, typing text and clicking Speak plays synthesised audio in the page and offers a download.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in, fd 4 out, JSON messages
ending in NUL), so the test needs no driver and no Python package beyond the standard library."""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import gunicorn

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required", "--remote-debugging-pipe", "about:blank"]


class Chromium:
    """Minimal DevTools client over chromium's debugging pipe."""

    def __init__(self, profile: Path, log_path: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds():  # in the child: the protocol wants fds 3 (commands) and 4 (replies), inheritable
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([CHROMIUM, f"--user-data-dir={profile}", *FLAGS], stdin=subprocess.DEVNULL,
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


# Runs in the page: wait for the speaker list, type, click Speak, wait for the result, play it, check the download.
SPEAK_IN_PAGE = r"""
(async () => {
  const $ = (id) => document.getElementById(id);
  const until = async (check, what, ms = 30000) => {
    const end = Date.now() + ms;
    while (!check()) {
      if (Date.now() > end) throw new Error("timed out waiting for " + what + "; status: " + $("status").textContent);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  await until(() => $("speaker").options.length > 0, "speakers");
  const speakers = [...$("speaker").options].map((o) => o.value);
  $("text").value = "Hello from the browser test. This page speaks.";
  $("speed").value = "1.25";
  $("speed").dispatchEvent(new Event("input"));
  $("speak").click();
  await until(() => $("status").textContent.startsWith("Done") || $("status").className === "error", "synthesis");
  const player = $("player");
  await until(() => player.readyState >= 1 && player.duration > 0, "audio metadata");
  await until(() => player.currentTime > 0.2, "playback to advance", 15000);
  const link = $("download");
  const blob = await (await fetch(link.href)).blob();
  const head = new Uint8Array(await blob.slice(0, 12).arrayBuffer());
  return {
    speakers, engineNote: $("engine").textContent, status: $("status").textContent,
    statusClass: $("status").className, duration: player.duration, playing: !player.paused,
    src: player.src, downloadName: link.download, downloadHidden: link.hidden, blobSize: blob.size,
    blobType: blob.type, head: String.fromCharCode(...head), speedLabel: $("speed-value").textContent,
  };
})()
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed: apt-get install -y chromium")
    tmp = tmp_path_factory.mktemp("chromium")
    chrome = Chromium(tmp / "profile", tmp / "chromium.log")
    yield chrome
    chrome.close()


def test_web_page_speaks_plays_and_offers_download(browser, tmp_path):
    with gunicorn(tmp_path) as server:
        browser.open_page(f"http://127.0.0.1:{server.port}/")
        result = browser.evaluate(SPEAK_IN_PAGE)
        browser.screenshot(tmp_path / "page.png")
        log = server.log()
    assert result["speakers"] == ["en_US-joe-medium"]
    assert "piper" in result["engineNote"] and "download_model.py" in result["engineNote"]
    assert result["status"].startswith("Done") and result["statusClass"] == ""
    assert result["src"].startswith("blob:") and 1.0 < result["duration"] < 10
    assert result["downloadName"] == "speech.wav" and not result["downloadHidden"]
    assert result["head"][:4] == "RIFF" and result["head"][8:12] == "WAVE" and result["blobSize"] > 24000
    assert result["blobType"] == "audio/wav" and result["speedLabel"] == "1.25"
    assert "POST /tts status=200" in log and "chars=46" in log
