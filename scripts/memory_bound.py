#!/usr/bin/env python3
"""Worst-case memory of one worker: the hostile texts of issue 17 (each as long as MAX_TEXT_CHARS allows and cut
into the longest segments the frontend makes), streamed MAX_BATCH at once, on a real gunicorn worker.

    python scripts/memory_bound.py --model-dir models/full-random      # full-size random weights (make_tiny_model.py
                                                                        #   --preset full writes them)
    python scripts/memory_bound.py --engine tiny --seconds 20          # quick check on the tiny model

Each client streams its text for --seconds (or to its end) and hangs up; the worker's VmRSS is sampled every
0.1 s and its VmHWM (peak resident size) read at the end. Prints the CPU, the RSS after warm-up, the peak and
the difference, per phase and as one JSON line.
"""
from __future__ import annotations

import argparse
import http.client
import json
import platform
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from load_test import OwnServer, proc_status, rss_mb, server_pids  # noqa: E402

from cosyvoice_lite.frontend import TextFrontend  # noqa: E402

TEXTS = {
    "presentation_form": "\ufdfa" * 4096,
    "hanzi_then_digits": "数" + "1" * 4095,
    "combining_marks": ("a" + "\u0301\u0302\u0303\u0304\u0305\u0306\u0307") * 512,
    "money": ("$1,234,567.89 " * 300)[:4096],
    "digits": "1" * 4096,
    "long_word": "a" * 4096,
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def stream(port: int, text: str, seconds: float, out: dict) -> None:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=seconds + 60)
    try:
        conn.request("POST", "/tts", body=json.dumps({"text": text, "stream": True, "format": "pcm"}).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        out["status"] = response.status
        received = 0
        while time.monotonic() - started < seconds:
            data = response.read1(65536)
            if not data:
                break
            if "first_audio_s" not in out:
                out["first_audio_s"] = round(time.monotonic() - started, 2)
            received += len(data)
        out["audio_s"] = round(received / 48000, 1)
    except (OSError, http.client.HTTPException) as e:
        out["error"] = type(e).__name__
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["tiny"], default=None)
    parser.add_argument("--model-dir")
    parser.add_argument("--mode", default="default")
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long each client listens")
    args = parser.parse_args()
    if not args.model_dir and not args.engine:
        parser.error("give --model-dir or --engine tiny")

    frontend = TextFrontend()
    for name, text in TEXTS.items():
        tokens = [len(frontend.tokenize(s)) for s in frontend.split(text)]
        print(f"{name:18s} {len(text)} chars -> {len(tokens)} segments, longest {max(tokens)} tokens")

    server = OwnServer(args.engine or "cosyvoice", args.model_dir, workers=1, queue_size=8, threads=2,
                       # the audio cache off: a text whose segments are cached would be served, not synthesised
                       extra_env={"COSYVOICE_MODE": args.mode, "MAX_BATCH": str(args.concurrent), "CACHE": "off",
                                  "REQUEST_TIMEOUT": str(int(args.seconds + 120))})
    try:
        worker = server_pids(server.port)[1][0]
        loaded = rss_mb(worker)
        print(f"CPU: {cpu_model()}; mode {args.mode}; worker RSS after warm-up {loaded:.0f} MB")
        peak_sampled, results = loaded, {}
        names = list(TEXTS)
        for start in range(0, len(names), args.concurrent):
            group = names[start:start + args.concurrent]
            threads = []
            for name in group:
                results[name] = {}
                threads.append(threading.Thread(target=stream, args=(server.port, TEXTS[name], args.seconds,
                                                                     results[name]), daemon=True))
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                peak_sampled = max(peak_sampled, rss_mb(worker))
                time.sleep(0.1)
            print(f"  {', '.join(group)}: " + "; ".join(f"{n} {results[n]}" for n in group)
                  + f"; RSS now {rss_mb(worker):.0f} MB")
        hwm = proc_status(worker, "VmHWM") / 1024
        summary = {"cpu": cpu_model(), "mode": args.mode, "concurrent": args.concurrent,
                   "rss_loaded_mb": round(loaded), "rss_peak_sampled_mb": round(peak_sampled),
                   "vmhwm_mb": round(hwm), "above_loaded_mb": round(max(hwm, peak_sampled) - loaded)}
        print(f"peak RSS {max(hwm, peak_sampled):.0f} MB = loaded + {summary['above_loaded_mb']} MB")
        print(json.dumps(summary))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
