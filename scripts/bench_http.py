#!/usr/bin/env python3
"""Throughput over HTTP: the same non-streaming requests one after another, then all at once, against a real
gunicorn with one worker on this machine (loopback only).

    python scripts/bench_http.py                          # full-size random weights, default mode, 4 requests
    python scripts/bench_http.py --model-dir models/CosyVoice-300M-SFT --mode fast --json

The figure to compare is ``concurrent_speedup`` (audio seconds per wall second, concurrent over sequential):
scripts/bench.py measures the same requests (scripts/workload.py: text, speakers, seeds) in-process, its
"4 concurrent / sequential"; here they go through admission, the request threads and the scheduler as a user's
would.

``--interleave K`` also loads the same model in this process and alternates K HTTP rounds with K in-process
rounds (bench.py's ``bench_concurrency``), so that both figures see the same machine load; it prints every
round's gain and the medians.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from load_test import OwnServer  # noqa: E402
from workload import CONCURRENT_TEXT, concurrent_request  # noqa: E402

FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def machine_info() -> dict:
    """CPU model and the vector features that matter for inference, from /proc/cpuinfo (Linux)."""
    info = {"cpu": "?", "cpu_features": []}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and info["cpu"] == "?":
                info["cpu"] = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                info["cpu_features"] = [f for f in FEATURES if f in flags]
                break
    except OSError:
        pass
    return info

def post(port: int, body: dict, timeout: float = 900.0) -> float:
    """One non-streaming /tts; -> seconds of audio it returned."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/tts", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}: {data[:300]!r}")
        return float(response.getheader("X-Audio-Duration"))
    finally:
        conn.close()


def run(port: int, n: int, speakers: list[str], rounds: int = 1, text: str = CONCURRENT_TEXT) -> dict:
    """``rounds`` times: n requests one after another, then n at once (scripts/workload.py's requests)."""
    bodies = [{**concurrent_request(i, speakers), "text": text} for i in range(n)]
    sequential_s = concurrent_s = sequential_audio = concurrent_audio = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        sequential_audio += sum(post(port, body) for body in bodies)
        sequential_s += time.perf_counter() - started
        audio: list[float] = [0.0] * n

        def one(i):
            audio[i] = post(port, bodies[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent_s += time.perf_counter() - started
        concurrent_audio += sum(audio)
    seq_rate, con_rate = sequential_audio / sequential_s, concurrent_audio / concurrent_s
    return {"requests": n, "rounds": rounds, "sequential_s": sequential_s, "concurrent_s": concurrent_s,
            "sequential_audio_s": sequential_audio, "concurrent_audio_s": concurrent_audio,
            "sequential_audio_per_s": seq_rate, "concurrent_audio_per_s": con_rate,
            "concurrent_speedup": con_rate / seq_rate}


def interleaved(port: int, model_dir: str, speakers: list[str], args) -> dict:
    """HTTP and in-process rounds of the same requests, alternated (ABBA...), so that a change in the machine's load
    hits both; -> each path's gains per round and medians."""
    import torch

    from bench import bench_concurrency

    from cosyvoice_lite.engines.cosyvoice import CosyVoiceEngine
    from cosyvoice_lite.settings import Settings

    torch.set_num_threads(args.threads)
    engine = CosyVoiceEngine(model_dir, mode=args.mode, threads=args.threads, cache_root=Settings.from_env().cache_root)
    for _ in engine.speak("你好。"):  # warm-up, as the server's
        pass
    rounds = {"http": [], "in_process": []}
    try:
        for k in range(args.interleave):
            order = ("http", "in_process") if k % 2 == 0 else ("in_process", "http")
            for name in order:
                if name == "http":
                    rounds[name].append(run(port, args.requests, speakers, 1, args.text))
                else:
                    rounds[name].append(bench_concurrency(engine, args.requests, args.text))
                print(f"  round {k + 1} {name}: {rounds[name][-1]['concurrent_speedup']:.2f}x", file=sys.stderr)
    finally:
        engine.scheduler.close()

    def summary(runs):
        return {"gains": [r["concurrent_speedup"] for r in runs],
                "median_gain": statistics.median(r["concurrent_speedup"] for r in runs),
                "median_sequential_audio_per_s": statistics.median(r["sequential_audio_per_s"] for r in runs),
                "median_concurrent_audio_per_s": statistics.median(r["concurrent_audio_per_s"] for r in runs)}

    return {"machine": machine_info(), "mode": args.mode, "requests": args.requests,
            "http": summary(rounds["http"]), "in_process": summary(rounds["in_process"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="a model directory (default: random full-size weights in a temp dir)")
    parser.add_argument("--mode", default="default", help="COSYVOICE_MODE of the server")
    parser.add_argument("--requests", type=int, default=4, help="requests (and MAX_BATCH)")
    parser.add_argument("--threads", type=int, default=2, help="TORCH_THREADS")
    parser.add_argument("--rounds", type=int, default=2, help="sequential + concurrent rounds to sum")
    parser.add_argument("--text", default=CONCURRENT_TEXT, help="the text of every request")
    parser.add_argument("--interleave", type=int, default=0, metavar="K",
                        help="alternate K HTTP rounds with K in-process rounds of the same requests (medians)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cosyvoice-bench-http-") as tmp:
        model_dir = args.model_dir
        if not model_dir:
            from random_model import write_random_model

            model_dir = str(write_random_model(Path(tmp) / "full", preset="full"))
        server = OwnServer("cosyvoice", model_dir, workers=1, queue_size=args.requests, threads=args.threads,
                           extra_env={"MAX_BATCH": str(args.requests), "COSYVOICE_MODE": args.mode, "CACHE": "off"},
                           ready_timeout=900)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.request("GET", "/speakers")
            speakers = [s["id"] for s in json.loads(conn.getresponse().read())["speakers"]]
            conn.close()
            post(server.port, {"text": "你好。", "speaker": speakers[0]})  # warm-up
            if args.interleave:
                result = interleaved(server.port, model_dir, speakers, args)
            else:
                measured = run(server.port, args.requests, speakers, args.rounds, args.text)
                result = {"machine": machine_info(), "mode": args.mode, **measured}
        finally:
            server.stop()
    if args.interleave:
        print(f"{args.requests} requests, HTTP and in-process rounds alternated x {args.interleave}, {args.mode} "
              f"mode, on {result['machine']['cpu']} ({', '.join(result['machine']['cpu_features'])})")
        for name in ("http", "in_process"):
            gains = ", ".join(f"{g:.2f}x" for g in result[name]["gains"])
            print(f"  {name:10s}  gains {gains}; median {result[name]['median_gain']:.2f}x "
                  f"(sequential {result[name]['median_sequential_audio_per_s']:.3f}, concurrent "
                  f"{result[name]['median_concurrent_audio_per_s']:.3f} audio s/s)")
        if args.json:
            print(json.dumps(result))
        return 0
    machine = result["machine"]
    print(f"{result['requests']} requests over HTTP x {result['rounds']} rounds, {args.mode} mode, on {machine['cpu']} "
          f"({', '.join(machine['cpu_features'])})")
    print(f"  sequential  {result['sequential_s']:.1f} s for {result['sequential_audio_s']:.1f} s of audio "
          f"({result['sequential_audio_per_s']:.3f} audio s/s)")
    print(f"  concurrent  {result['concurrent_s']:.1f} s for {result['concurrent_audio_s']:.1f} s of audio "
          f"({result['concurrent_audio_per_s']:.3f} audio s/s)")
    print(f"  speedup     {result['concurrent_speedup']:.2f}x")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
