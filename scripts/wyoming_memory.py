#!/usr/bin/env python3
"""Memory of the ways to serve Wyoming: gunicorn with HTTP only, gunicorn with HTTP and Wyoming in the worker
(WYOMING_URI), and the standalone `python -m cosyvoice_lite wyoming`; each after one HTTP and/or one Wyoming
synthesis, RSS and PSS summed over the server's processes (PSS counts the pages master and worker share once).

    python scripts/wyoming_memory.py models/tiny          # a model directory; an empty one = the offline voice

Starts and stops its own servers on 127.0.0.1 (BACKEND=torch, CACHE=off, WORKERS=1, TORCH_THREADS=1).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from wyoming.client import AsyncTcpClient
from wyoming.tts import Synthesize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import free_port  # noqa: E402

TEXT = "Hello there, this is a test."


def memory_mb(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("Rss", "Pss"):
                out[key] = int(value.split()[0]) // 1024
    return out


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(") ", 1)[1].split()[1]) == pid:
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


async def wyoming_synthesis(port: int) -> None:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Synthesize(text=TEXT).event())
        while True:
            event = await asyncio.wait_for(client.read_event(), 120)
            assert event is not None and event.type != "error", event
            if event.type == "audio-stop":
                return


def http_synthesis(port: int) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/tts", json.dumps({"text": TEXT}).encode(),
                                     {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=120).read()


def retry(call, seconds: float = 180.0):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> int:
    model = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "models" / "CosyVoice-300M-SFT")
    env = {**os.environ, "MODEL_DIR": model, "BACKEND": "torch", "TORCH_THREADS": "1", "CACHE": "off",
           "WORKERS": "1", "HOST": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "app:app"]
    http_port, wy_port, alone_port = free_port(), free_port(), free_port()
    runs = [("HTTP only", {"PORT": str(http_port)}, gunicorn, http_port, None),
            ("HTTP + Wyoming in the worker", {"PORT": str(http_port), "WYOMING_URI": f"tcp://127.0.0.1:{wy_port}"},
             gunicorn, http_port, wy_port),
            ("Wyoming alone", {}, [sys.executable, "-m", "cosyvoice_lite", "wyoming", "--uri",
                                   f"tcp://127.0.0.1:{alone_port}"], None, alone_port)]
    print(f"{'deployment':<30}{'processes':>10}{'PSS MB':>8}{'RSS MB':>8}")
    for name, extra, command, http, wyoming in runs:
        proc = subprocess.Popen(command, cwd=ROOT, env={**env, **extra}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            if http:
                retry(lambda port=http: urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2))
                http_synthesis(http)
            if wyoming:
                retry(lambda port=wyoming: asyncio.run(wyoming_synthesis(port)))
            time.sleep(1)
            figures = [memory_mb(pid) for pid in process_tree(proc.pid)]
            print(f"{name:<30}{len(figures):>10}{sum(f['Pss'] for f in figures):>8}"
                  f"{sum(f['Rss'] for f in figures):>8}", flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the process group this script started
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
