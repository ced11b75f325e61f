#!/usr/bin/env python3
"""Load test: N concurrent clients against a real gunicorn on this machine, for a bounded time.

    python scripts/load_test.py --engine tiny  --clients 12 --seconds 30     # starts gunicorn, tiny random model
    python scripts/load_test.py --engine piper --clients 12 --seconds 30     # starts gunicorn, offline Piper voice
    python scripts/load_test.py --model-dir models/CosyVoice-300M-SFT        # starts gunicorn on that model
    python scripts/load_test.py --url http://127.0.0.1:8080 --json           # a server that already runs

Each client sends POST /tts (varied texts) back to back on a keep-alive connection, pausing ``--backoff`` seconds
after a 503. A prober asks GET /health every ``--probe-interval`` seconds. The report gives requests/s, latency
p50/p95/p99 of the 200s and of the 503s, status counts, /health latency, and the worker pids before and after
(a worker that died and was replaced shows up as a changed pid). ``--check`` exits 1 unless the only answers were
200 and fast 503s with Retry-After, /health always answered within 1 s and no worker died.

Only loopback targets (127.0.0.0/8, ::1): this tool never sends traffic anywhere else.
"""
from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "Hello there.",
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back at five thirty tomorrow afternoon.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "Short one.",
    "We will meet at the station, then walk to the museum together.",
    "Numbers like 42 and 1999 are read out loud, too.",
    "Is this thing on? Good. Let us begin.",
]
TEXTS_ZH = ["你好。", "今天天气很好。", "我们一起去公园散步吧。", "希望你以后能够做得比我还好哟。"]


# ---- where traffic may go ---------------------------------------------------------------------------------------

def loopback_target(url: str) -> tuple[str, int]:
    """(host, port) of ``url`` if every address it resolves to is a loopback address; else ValueError."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"need an http:// URL with a host, got {url!r}")
    port = parts.port or 80
    addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"{parts.hostname} resolves to {sorted(addresses)}: only loopback targets are allowed")
    return parts.hostname, port


# ---- processes (Linux /proc) --------------------------------------------------------------------------------------

def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A = LISTEN
                inodes.add(fields[9])
    return inodes


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def server_pids(port: int) -> tuple[int | None, list[int]]:
    """(master pid, sorted worker pids) of the server listening on ``port``: the processes holding the listening
    socket; the one whose parent does not hold it is the master. (None, []) when they cannot be seen."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    holders = set()
    if wanted:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                for fd in (entry / "fd").iterdir():
                    if os.readlink(fd) in wanted:
                        holders.add(int(entry.name))
                        break
            except OSError:
                continue
    parents = {}
    for pid in holders:
        try:
            parents[pid] = _ppid(pid)
        except OSError:
            pass
    masters = [pid for pid, parent in parents.items() if parent not in parents]
    master = masters[0] if len(masters) == 1 else None
    return master, sorted(pid for pid, parent in parents.items() if parent == master)


def proc_status(pid: int, key: str) -> int:
    """A number from /proc/<pid>/status, e.g. 'VmRSS' (kB) or 'Threads'; -1 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def rss_mb(pid: int) -> float:
    kb = proc_status(pid, "VmRSS")
    return kb / 1024 if kb >= 0 else float("nan")


# ---- a server of our own ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnServer:
    """gunicorn (gunicorn.conf.py, app:app) on 127.0.0.1 with the chosen model; stopped by ``stop``."""

    def __init__(self, engine: str, model_dir: str | None, workers: int, queue_size: int, threads: int,
                 extra_env: dict | None = None, ready_timeout: float = 180.0):
        self.tmp = tempfile.TemporaryDirectory(prefix="cosyvoice-load-")
        tmp = Path(self.tmp.name)
        if model_dir:
            model = str(model_dir)
        elif engine == "tiny":
            model = str(tmp / "tiny")
            subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), model], check=True,
                           capture_output=True, timeout=300)
        else:
            model = str(tmp / "no-model")  # empty: the offline Piper voice
            os.mkdir(model)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "MODEL_DIR": model,
               "WORKERS": str(workers), "QUEUE_SIZE": str(queue_size), "TORCH_THREADS": str(threads),
               "PYTHONPATH": str(ROOT), **(extra_env or {})}
        self.log_path = tmp / "server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
                                          "app:app"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if get("127.0.0.1", self.port, "/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gunicorn not ready after {ready_timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        # every worker warmed up, not just the one that answered
        while len(server_pids(self.port)[1]) < workers and time.monotonic() < deadline:
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group only
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)
        self.tmp.cleanup()


# ---- clients ----------------------------------------------------------------------------------------------------

def get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def _summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99), "max": max(values) if values else None}


class Client(threading.Thread):
    """One user: POST /tts back to back until the deadline, on one keep-alive connection."""

    def __init__(self, index: int, host: str, port: int, deadline: float, texts: list[str], body_extra: dict,
                 headers: dict, backoff: float, timeout: float, record):
        super().__init__(name=f"client-{index}", daemon=True)
        self.index = index
        self.host, self.port, self.deadline = host, port, deadline
        self.rng = random.Random(index)
        self.texts, self.body_extra, self.headers = texts, body_extra, headers
        self.backoff, self.timeout, self.record = backoff, timeout, record

    def run(self):
        conn = None
        while time.monotonic() < self.deadline:
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            body = json.dumps({"text": self.rng.choice(self.texts), **self.body_extra}).encode()
            started = time.monotonic()
            try:
                conn.request("POST", "/tts", body=body, headers={"Content-Type": "application/json", **self.headers})
                response = conn.getresponse()
                first = response.read(1)
                ttfb = time.monotonic() - started
                data = first + response.read()
                elapsed = time.monotonic() - started
                status = response.status
                retry_after = response.getheader("Retry-After")
                duration = response.getheader("X-Audio-Duration")
                error_json = None
                if status != 200:
                    try:
                        error_json = json.loads(data)["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        error_json = None
                self.record(client=self.index, started=started, status=status, seconds=elapsed, ttfb=ttfb,
                            retry_after=retry_after,
                            audio=float(duration) if duration else 0.0, json_message=bool(error_json))
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                self.record(client=self.index, started=started, status=f"error:{type(e).__name__}",
                            seconds=time.monotonic() - started, ttfb=None, retry_after=None, audio=0.0,
                            json_message=False)
                conn.close()
                conn = None
                status = None
            if status != 200:
                time.sleep(self.backoff)
        if conn is not None:
            conn.close()


class Prober(threading.Thread):
    """GET /health on a new connection every ``interval`` seconds (like a load balancer's probe)."""

    def __init__(self, host: str, port: int, stop: threading.Event, interval: float):
        super().__init__(name="prober", daemon=True)
        self.host, self.port, self.stop_event, self.interval = host, port, stop, interval
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def run(self):
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                status, _ = get(self.host, self.port, "/health", timeout=5)
                if status != 200:
                    self.failures.append(f"status {status}")
            except (OSError, http.client.HTTPException) as e:
                self.failures.append(type(e).__name__)
            self.latencies.append(time.monotonic() - started)
            self.stop_event.wait(self.interval)


def run_load(url: str, clients: int, seconds: float, *, texts: list[str] | None = None, body_extra: dict | None = None,
             headers: dict | None = None, backoff: float = 0.1, timeout: float = 120.0,
             probe_interval: float = 0.2) -> dict:
    """Drive the server at ``url`` (loopback only) and return the report as a dict."""
    host, port = loopback_target(url)
    master, workers_before = server_pids(port)
    records: list[dict] = []
    lock = threading.Lock()

    def record(**item):
        with lock:
            records.append(item)

    stop = threading.Event()
    prober = Prober(host, port, stop, probe_interval)
    started = time.monotonic()
    deadline = started + seconds
    threads = [Client(i, host, port, deadline, texts or TEXTS, body_extra or {}, headers or {}, backoff, timeout,
                      record) for i in range(clients)]
    prober.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + timeout + 10)
    wall = time.monotonic() - started
    stop.set()
    prober.join(10)
    _, workers_after = server_pids(port)

    statuses: dict[str, int] = {}
    for item in records:
        statuses[str(item["status"])] = statuses.get(str(item["status"]), 0) + 1
    ok = [r for r in records if r["status"] == 200]
    busy = [r for r in records if r["status"] == 503]
    audio = sum(r["audio"] for r in ok)
    return {
        "url": url, "clients": clients, "seconds": round(wall, 2), "requests": len(records),
        "requests_per_s": len(records) / wall, "ok_per_s": len(ok) / wall, "statuses": dict(sorted(statuses.items())),
        "latency_200": _summary([r["seconds"] for r in ok]),
        "ttfb_200": _summary([r["ttfb"] for r in ok]),
        "latency_503": _summary([r["seconds"] for r in busy]),
        "503_without_retry_after": sum(1 for r in busy if not r["retry_after"]),
        "errors_without_json_message": sum(1 for r in records if r["status"] != 200 and isinstance(r["status"], int)
                                           and not r["json_message"]),
        "audio_seconds": audio, "audio_seconds_per_s": audio / wall,
        "health": {**_summary(prober.latencies), "failures": len(prober.failures)},
        "master_pid": master, "workers_before": workers_before, "workers_after": workers_after,
        "worker_rss_mb": {pid: round(rss_mb(pid), 1) for pid in workers_after},
        # per client: its first answer's time to first byte (from the start of the run: all clients start
        # together, so served side by side means similar values, served in turn means a staircase)
        "first_audio_per_client": {i: round(first["started"] - started + first["ttfb"], 3)
                                   for i in range(clients)
                                   for first in [next((r for r in records if r["client"] == i and r["status"] == 200),
                                                      None)] if first is not None},
    }


def check(report: dict, max_503_seconds: float = 0.5, max_health_seconds: float = 1.0) -> list[str]:
    """The invariants under overload; -> the list of violations (empty when all hold)."""
    problems = []
    other = {k: v for k, v in report["statuses"].items() if k not in ("200", "503")}
    if other:
        problems.append(f"answers other than 200/503: {other}")
    if report["503_without_retry_after"]:
        problems.append(f"{report['503_without_retry_after']} 503s without Retry-After")
    if report["latency_503"]["max"] is not None and report["latency_503"]["max"] > max_503_seconds:
        problems.append(f"slowest 503 took {report['latency_503']['max']:.3f} s")
    if report["errors_without_json_message"]:
        problems.append(f"{report['errors_without_json_message']} errors without a JSON message")
    health = report["health"]
    if health["failures"] or health["max"] is None or health["max"] > max_health_seconds:
        problems.append(f"/health: {health['failures']} failures, slowest {health['max']}")
    if report["workers_before"] != report["workers_after"]:
        problems.append(f"worker pids changed: {report['workers_before']} -> {report['workers_after']}")
    if not report["statuses"].get("200"):
        problems.append("no request succeeded")
    return problems


def _fmt(value, unit: str = "s") -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if unit == "s" and value < 1 else f"{value:.2f} {unit}"


def print_table(report: dict, label: str = "") -> None:
    print(f"load test {label}against {report['url']}: {report['clients']} clients for {report['seconds']} s")
    rows = [
        ("requests", f"{report['requests']} ({report['requests_per_s']:.2f}/s; 200s {report['ok_per_s']:.2f}/s)"),
        ("statuses", ", ".join(f"{k}: {v}" for k, v in report["statuses"].items())),
    ]
    for key, name in (("latency_200", "latency 200"), ("ttfb_200", "first byte 200"), ("latency_503", "latency 503"),
                      ("health", "/health latency")):
        s = report[key]
        rows.append((name, f"p50 {_fmt(s['p50'])}, p95 {_fmt(s['p95'])}, p99 {_fmt(s['p99'])}, "
                           f"max {_fmt(s['max'])} (n={s['n']})"))
    per_client = report.get("first_audio_per_client") or {}
    if per_client:
        rows.append(("first audio per client", ", ".join(f"{i}: {_fmt(v)}" for i, v in sorted(per_client.items()))))
    rows += [
        ("/health failures", str(report["health"]["failures"])),
        ("503 w/o Retry-After", str(report["503_without_retry_after"])),
        ("audio produced", f"{report['audio_seconds']:.1f} s ({report['audio_seconds_per_s']:.2f} s of audio per s)"),
        ("workers", f"{report['workers_before']} -> {report['workers_after']} "
                    f"(RSS MB {report['worker_rss_mb']})"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running server on loopback (default: start one)")
    target.add_argument("--model-dir", help="start gunicorn on this CosyVoice model directory")
    target.add_argument("--engine", choices=["tiny", "piper"], default="tiny",
                        help="start gunicorn on a tiny random CosyVoice model or the offline Piper voice")
    parser.add_argument("--clients", type=int, default=12, help="concurrent clients (default 12)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to send requests (max 3600)")
    parser.add_argument("--workers", type=int, default=1, help="WORKERS of a server this tool starts")
    parser.add_argument("--queue-size", type=int, default=2, help="QUEUE_SIZE of a server this tool starts")
    parser.add_argument("--max-batch", type=int, default=4, help="MAX_BATCH of a server this tool starts")
    parser.add_argument("--threads", type=int, default=0, help="TORCH_THREADS of a server this tool starts")
    parser.add_argument("--stream", action="store_true", help="ask for streamed audio")
    parser.add_argument("--format", default="wav", help="audio format to ask for (default wav)")
    parser.add_argument("--speaker", help="speaker id or alias (default: the server's default)")
    parser.add_argument("--api-key", default=os.environ.get("API_KEY", ""), help="bearer token (default $API_KEY)")
    parser.add_argument("--backoff", type=float, default=0.1, help="pause after a non-200 answer (s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request client timeout (s)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the overload invariants hold")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    if not 1 <= args.clients <= 1000 or not 0 < args.seconds <= 3600:
        parser.error("--clients must be 1..1000 and --seconds 0..3600")

    server = None
    if args.url:
        try:
            loopback_target(args.url)
        except ValueError as e:
            parser.error(str(e))
        url, label = args.url, ""
    else:
        engine = "cosyvoice" if args.model_dir else args.engine
        server = OwnServer(engine, args.model_dir, args.workers, args.queue_size, args.threads,
                           extra_env={"MAX_BATCH": str(args.max_batch)})
        url = server.url
        label = (f"({args.model_dir or args.engine}, WORKERS={args.workers}, QUEUE_SIZE={args.queue_size}, "
                 f"MAX_BATCH={args.max_batch}) ")
    body = {"format": args.format, "stream": args.stream}
    if args.speaker:
        body["speaker"] = args.speaker
    texts = TEXTS + TEXTS_ZH if (args.model_dir or (not args.url and args.engine == "tiny")) else TEXTS
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        report = run_load(url, args.clients, args.seconds, texts=texts, body_extra=body, headers=headers,
                          backoff=args.backoff, timeout=args.timeout)
    finally:
        if server is not None:
            server.stop()
    problems = check(report)
    report["problems"] = problems
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report, label)
        print("  invariants        " + ("all hold" if not problems else "; ".join(problems)))
    return 1 if (args.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
