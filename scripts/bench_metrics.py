#!/usr/bin/env python3
"""Cost of the /metrics bookkeeping: one ``observe_request`` (done once per HTTP request) and one ``render`` (once per
scrape), as gunicorn runs them (the multiprocess store) and in-process (Flask test client, CLI).

    python scripts/bench_metrics.py                  # multiprocess store (PROMETHEUS_MULTIPROC_DIR in /dev/shm)
    python scripts/bench_metrics.py --in-process     # no PROMETHEUS_MULTIPROC_DIR: values in this process only
    python scripts/bench_metrics.py --workers 4      # render() with the files of 4 finished worker processes

Prints microseconds per call, the median of --repeats runs of --calls calls each.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CACHE = {"bytes": 123456, "evictions": 2}


def _import_metrics():
    from cosyvoice_lite.service.metrics import Metrics  # after PROMETHEUS_MULTIPROC_DIR is set

    return Metrics


def _traffic(metrics, n: int) -> None:
    for i in range(n):
        metrics.observe_request("tts", (200, 200, 200, 503, 400)[i % 5], 0.5 + i % 7, chars=40, audio_seconds=2.0,
                                synth_seconds=0.4)
        metrics.observe_request("health", 200)
        metrics.count_cache("hits", 1)
        metrics.set_queue(i % 3, 1)


def _per_call_us(fn, calls: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(runs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-process", action="store_true", help="no PROMETHEUS_MULTIPROC_DIR")
    p.add_argument("--workers", type=int, default=2, help="finished worker processes whose figures render() adds up")
    p.add_argument("--calls", type=int, default=20000, help="observe_request calls per run (render: calls/100)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    directory = None
    if not args.in_process:
        directory = tempfile.mkdtemp(prefix="bench-metrics-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # before prometheus_client is imported
    try:
        Metrics = _import_metrics()
        metrics = Metrics()
        for _ in range(args.workers if not args.in_process else 0):  # workers that served requests and exited
            pid = os.fork()
            if pid == 0:
                _traffic(metrics, 100)
                os._exit(0)
            os.waitpid(pid, 0)
        _traffic(metrics, 100)
        observe = _per_call_us(lambda: metrics.observe_request("tts", 200, 1.2, chars=40, audio_seconds=2.0,
                                                               synth_seconds=0.4), args.calls, args.repeats)
        render = _per_call_us(lambda: metrics.render("piper", True, 9, CACHE), max(1, args.calls // 100),
                              args.repeats)
        text = metrics.render("piper", True, 9, CACHE)
        mode = "in-process" if args.in_process else f"multiprocess, {args.workers} finished workers"
        print(f"{Metrics.__module__} ({mode}): observe_request {observe:.2f} us, render {render:.0f} us "
              f"({len(text.splitlines())} lines)")
    finally:
        if directory:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
