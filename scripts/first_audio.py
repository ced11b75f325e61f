#!/usr/bin/env python3
"""Time to first audio over Wyoming (Home Assistant) beside HTTP, for the same text, from one server.

    python scripts/first_audio.py --engine tiny --rounds 5              # starts gunicorn with WYOMING_URI set
    python scripts/first_audio.py --model-dir models/CosyVoice-300M-SFT
    python scripts/first_audio.py --url http://127.0.0.1:8080 --wyoming tcp://127.0.0.1:10200 --json

Each round sends the text once as a streamed POST /tts (first body byte after the WAV header) and once as a Wyoming
``synthesize`` (first audio-chunk), and as a Wyoming stream (synthesize-start, the text in 8-character deltas,
synthesize-stop: first audio-chunk, counted from the first delta). The audio cache is bypassed (HTTP: "cache":
false; Wyoming cannot ask, so start the server with CACHE=off, as this script does for its own server). One
client at a time: this measures latency, not capacity (scripts/load_test.py does that). Loopback targets only.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import OwnServer, free_port, loopback_target  # noqa: E402

from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. It was a bright cold day in April."


def http_first_audio(host: str, port: int, text: str) -> tuple[float, float]:
    """(seconds to the first audio byte, seconds to the last) of a streamed /tts."""
    conn = http.client.HTTPConnection(host, port, timeout=300)
    started = time.perf_counter()
    conn.request("POST", "/tts", json.dumps({"text": text, "stream": True, "cache": False}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()[:300]
    first, header = None, 44  # WAV header first, then audio
    while True:
        data = response.read1(65536)
        if not data:
            break
        header -= len(data)
        if first is None and header < 0:
            first = time.perf_counter() - started
    conn.close()
    return first, time.perf_counter() - started


async def wyoming_first_audio(host: str, port: int, text: str, stream: bool) -> tuple[float, float]:
    async with AsyncTcpClient(host, port) as client:
        started = time.perf_counter()
        if stream:
            await client.write_event(SynthesizeStart().event())
            for i in range(0, len(text), 8):  # deltas as an LLM sends them: anywhere, mid-word
                await client.write_event(SynthesizeChunk(text=text[i:i + 8]).event())
            await client.write_event(SynthesizeStop().event())
        else:
            await client.write_event(Synthesize(text=text).event())
        first, until = None, "synthesize-stopped" if stream else "audio-stop"
        while True:
            event = await asyncio.wait_for(client.read_event(), 300)
            assert event is not None and event.type != "error", event
            if event.type == "audio-chunk" and first is None:
                first = time.perf_counter() - started
            if event.type == until:
                return first, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("tiny", "piper"), default="tiny")
    parser.add_argument("--model-dir")
    parser.add_argument("--url", help="a running server (with --wyoming)")
    parser.add_argument("--wyoming", help="its Wyoming address, tcp://127.0.0.1:10200")
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    own = None
    if args.url:
        if not args.wyoming:
            parser.error("--url needs --wyoming")
        host, port = loopback_target(args.url)
        wy_host, wy_port = loopback_target("http://" + args.wyoming.split("://", 1)[-1])
    else:
        wy_port = free_port()
        own = OwnServer(args.engine, args.model_dir, 1, 8, args.threads,
                        {"WYOMING_URI": f"tcp://127.0.0.1:{wy_port}", "CACHE": "off"})
        host, port, wy_host = "127.0.0.1", own.port, "127.0.0.1"
    try:
        runs = {"http": [], "wyoming": [], "wyoming-stream": []}
        http_first_audio(host, port, "Warm up.")  # the first request of a process pays for lazy set-up
        for _ in range(args.rounds):
            runs["http"].append(http_first_audio(host, port, args.text))
            runs["wyoming"].append(asyncio.run(wyoming_first_audio(wy_host, wy_port, args.text, False)))
            runs["wyoming-stream"].append(asyncio.run(wyoming_first_audio(wy_host, wy_port, args.text, True)))
    finally:
        if own is not None:
            own.stop()
    report = {name: {"first_audio_median_s": round(statistics.median(r[0] for r in rs), 3),
                     "first_audio_min_s": round(min(r[0] for r in rs), 3),
                     "total_median_s": round(statistics.median(r[1] for r in rs), 3)} for name, rs in runs.items()}
    report["text_chars"], report["rounds"] = len(args.text), args.rounds
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{len(args.text)} characters, {args.rounds} rounds, one client at a time")
        print(f"{'transport':<16}{'first audio p50':>16}{'min':>8}{'total p50':>12}")
        for name in runs:
            r = report[name]
            print(f"{name:<16}{r['first_audio_median_s']:>15.3f}s{r['first_audio_min_s']:>7.3f}s"
                  f"{r['total_median_s']:>11.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
