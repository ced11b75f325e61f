#!/usr/bin/env python3
"""Memory soak: many requests in a row with varied texts, formats and speeds; prints the worker's RSS curve.

    python scripts/soak_memory.py --engine tiny  --requests 500     # starts gunicorn (1 worker), tiny model
    python scripts/soak_memory.py --engine piper --requests 500     # starts gunicorn, offline Piper voice
    python scripts/soak_memory.py --model-dir models/CosyVoice-300M-SFT
    python scripts/soak_memory.py --url http://127.0.0.1:8080       # a running server on loopback (1 worker)

Every text is different (random sentence mixes with random numbers), so a cache keyed by text would show up as
growth. RSS is read from /proc for the worker process after each request. The summary gives RSS after the first
request, after the warm-up, at the end and at its peak, and the least-squares slope after the warm-up in MB per
100 requests: a leak shows as a steady positive slope, a settled process as a slope near 0.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_test import OwnServer, loopback_target, rss_mb, server_pids  # noqa: E402

WORDS = ("morning river station window garden music paper yellow quickly silent mountain ticket coffee "
         "because after before never always little family dinner evening answer question people").split()
SENTENCES = [
    "The meeting starts at {n} o'clock.", "Please read chapter {n} before Friday.", "We sold {n} tickets today.",
    "Turn left after {n} meters, then keep going.", "Is it really {n} degrees outside?",
    "My phone number ends in {n}.", "Wow! That is amazing.", "Well... I am not sure; maybe later.",
]
SENTENCES_ZH = ["今天是{n}号。", "我们卖了{n}张票。", "你好，欢迎光临。", "请在{n}点之前到达车站。"]
FORMATS = ["wav", "wav", "mp3", "pcm", "flac", "opus"]


def make_request(rng: random.Random, chinese: bool, max_sentences: int = 4, extra_words: float = 0.5) -> dict:
    """A random, practically unique request: 1..max_sentences sentences, random words and numbers, format, speed,
    stream."""
    pool = SENTENCES + (SENTENCES_ZH if chinese else [])
    parts = []
    for _ in range(rng.randint(1, max_sentences)):
        sentence = rng.choice(pool).format(n=rng.randint(0, 99999))
        if rng.random() < extra_words and not sentence.endswith("。"):
            sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))).capitalize() + ". " + sentence
        parts.append(sentence)
    fmt = rng.choice(FORMATS)
    return {"text": " ".join(parts), "format": fmt, "speed": rng.choice([0.8, 1.0, 1.0, 1.25]),
            "stream": fmt in ("wav", "pcm", "mp3") and rng.random() < 0.3}


def soak(url: str, requests: int, *, warmup: int = 50, seed: int = 0, chinese: bool = False, max_sentences: int = 4,
         extra_words: float = 0.5, settle: float = 0.05, headers=None, progress=None) -> dict:
    """Send ``requests`` requests one after the other; -> {'rss_mb': [...], 'statuses': {...}, summary...}."""
    host, port = loopback_target(url)
    _, workers = server_pids(port)
    if len(workers) != 1:
        raise RuntimeError(f"need a server with exactly one worker to follow its memory, found {workers}")
    pid = workers[0]
    rng = random.Random(seed)
    curve, statuses, audio_seconds = [], {}, 0.0
    started = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=120)
    for i in range(requests):
        body = json.dumps(make_request(rng, chinese, max_sentences, extra_words)).encode()
        conn.request("POST", "/tts", body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        response.read()
        statuses[response.status] = statuses.get(response.status, 0) + 1
        audio_seconds += float(response.getheader("X-Audio-Duration") or 0)
        time.sleep(settle)  # the synthesis thread hands freed memory back right after its last chunk
        curve.append(rss_mb(pid))
        if progress:
            progress(i + 1, curve[-1])
    conn.close()
    if server_pids(port)[1] != [pid]:
        raise RuntimeError("the worker was replaced during the soak: its memory curve is meaningless")
    return {"requests": requests, "seconds": time.monotonic() - started, "statuses": statuses,
            "audio_seconds": audio_seconds, "pid": pid, "rss_mb": curve, **summarize(curve, warmup)}


def slope_per_100(values: list[float]) -> float:
    """Least-squares slope of values against their index, times 100."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    sxx = sum((x - mean_x) ** 2 for x in range(n))
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    return 100 * sxy / sxx


def summarize(curve: list[float], warmup: int) -> dict:
    warmup = min(warmup, len(curve) - 2)
    after = curve[warmup:]
    return {"warmup": warmup, "rss_first_mb": curve[0], "rss_after_warmup_mb": curve[warmup],
            "rss_final_mb": curve[-1], "rss_max_mb": max(curve), "rss_min_after_warmup_mb": min(after),
            "growth_after_warmup_mb": curve[-1] - curve[warmup],
            "slope_mb_per_100_requests": slope_per_100(after)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running server on loopback with one worker (default: start one)")
    target.add_argument("--model-dir", help="start gunicorn on this CosyVoice model directory")
    target.add_argument("--engine", choices=["tiny", "piper"], default="tiny")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50, help="requests before the slope is measured")
    parser.add_argument("--every", type=int, default=25, help="print the curve every N requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object (with the whole curve)")
    args = parser.parse_args()
    if not 10 <= args.requests <= 100_000:
        parser.error("--requests must be 10..100000")

    server = None
    if args.url:
        try:
            loopback_target(args.url)
        except ValueError as e:
            parser.error(str(e))
        url = args.url
    else:
        server = OwnServer("cosyvoice" if args.model_dir else args.engine, args.model_dir, 1, 2, 0)
        url = server.url
    chinese = bool(args.model_dir) or (not args.url and args.engine == "tiny")

    def progress(i, rss):
        if not args.json and (i == 1 or i % args.every == 0):
            print(f"  request {i:5d}  RSS {rss:8.1f} MB", flush=True)

    try:
        result = soak(url, args.requests, warmup=args.warmup, seed=args.seed, chinese=chinese, progress=progress)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['requests']} requests in {result['seconds']:.0f} s ({result['audio_seconds']:.0f} s of audio), "
          f"statuses {result['statuses']}, worker pid {result['pid']}")
    print(f"  RSS after request 1: {result['rss_first_mb']:.1f} MB; after warm-up ({result['warmup']}): "
          f"{result['rss_after_warmup_mb']:.1f} MB; final: {result['rss_final_mb']:.1f} MB; "
          f"peak: {result['rss_max_mb']:.1f} MB")
    print(f"  after warm-up: growth {result['growth_after_warmup_mb']:+.1f} MB, "
          f"slope {result['slope_mb_per_100_requests']:+.2f} MB per 100 requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
