#!/usr/bin/env python3
"""Download the official CosyVoice-300M-SFT model directory (only the files the service needs).

    python scripts/download_model.py                       # -> models/CosyVoice-300M-SFT, ModelScope then Hugging Face
    python scripts/download_model.py --source huggingface  # one source only
    python scripts/download_model.py --dir /data/cosyvoice  # elsewhere (then set MODEL_DIR to it)

Files are fetched over HTTPS with resume, then verified by loading them with the service's own strict loader
(every key of every network present, every shape as the yaml says). Nothing but the standard library and the
project's requirements is needed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FILES = ("cosyvoice.yaml", "spk2info.pt", "hift.pt", "flow.pt", "llm.pt")
SOURCES = {
    "modelscope": "https://www.modelscope.cn/models/iic/CosyVoice-300M-SFT/resolve/master/{name}",
    "huggingface": "https://huggingface.co/FunAudioLLM/CosyVoice-300M-SFT/resolve/main/{name}",
}
HELP_OFFLINE = """\
Could not reach {sources}.
This machine seems to have no internet access (or the hosts are blocked). Options:
  1. Download on another machine:  python scripts/download_model.py --dir CosyVoice-300M-SFT
     then copy that directory here, to models/CosyVoice-300M-SFT (or set MODEL_DIR to where you put it).
  2. With git-lfs elsewhere:  git clone https://www.modelscope.cn/iic/CosyVoice-300M-SFT.git
  3. Keep using the bundled offline English voice: the service starts without the model."""


def _progress(name: str, done: int, total: int | None, started: float) -> None:
    rate = done / max(time.monotonic() - started, 1e-6) / 1e6
    if total:
        width = 30
        filled = int(width * done / total)
        line = f"\r  {name:<15} [{'#' * filled}{'.' * (width - filled)}] {done / 1e6:8.1f}/{total / 1e6:.1f} MB {rate:6.1f} MB/s"
    else:
        line = f"\r  {name:<15} {done / 1e6:8.1f} MB {rate:6.1f} MB/s"
    sys.stderr.write(line)
    sys.stderr.flush()


def fetch(url: str, dest: Path, timeout: float) -> None:
    """Download url to dest, resuming a partial ``dest.part``."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "cosyvoice-lite-download"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if have and response.status != 206:  # server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else None
        started = time.monotonic()
        with open(part, "ab" if have else "wb") as out:
            done = have
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                _progress(dest.name, done, total, started)
    sys.stderr.write("\n")
    if total is not None and part.stat().st_size != total:
        raise OSError(f"{dest.name}: got {part.stat().st_size} of {total} bytes")
    os.replace(part, dest)


def download(model_dir: Path, sources: list[str], timeout: float, force: bool) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        dest = model_dir / name
        if dest.exists() and not force:
            print(f"  {name:<15} present, skipped")
            continue
        errors = []
        for source in sources:
            url = SOURCES[source].format(name=name)
            try:
                print(f"  {name:<15} from {source}")
                fetch(url, dest, timeout)
                break
            except (urllib.error.URLError, socket.timeout, TimeoutError, OSError) as error:
                errors.append(f"{source}: {getattr(error, 'reason', error)}")
        else:
            raise ConnectionError("; ".join(errors))


def verify(model_dir: Path) -> None:
    from .model import load_model

    model = load_model(model_dir)
    speakers = ", ".join(model.speakers)
    print(f"verified {model_dir}: {len(model.speakers)} speakers ({speakers})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="download_model.py", description="Download CosyVoice-300M-SFT for cosyvoice-lite.")
    parser.add_argument("--dir", type=Path, default=ROOT / "models" / "CosyVoice-300M-SFT",
                        help="target directory (default: models/CosyVoice-300M-SFT)")
    parser.add_argument("--source", choices=["auto", *SOURCES], default="auto",
                        help="where to download from (auto: ModelScope, then Hugging Face)")
    parser.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    parser.add_argument("--force", action="store_true", help="download again even if files are present")
    parser.add_argument("--verify-only", action="store_true", help="only check an existing directory")
    args = parser.parse_args(argv)

    sources = list(SOURCES) if args.source == "auto" else [args.source]
    if not args.verify_only:
        free = shutil.disk_usage(args.dir.parent if args.dir.parent.exists() else ROOT).free
        if free < 3e9:
            print(f"warning: only {free / 1e9:.1f} GB free; the model needs about 2 GB", file=sys.stderr)
        print(f"downloading CosyVoice-300M-SFT into {args.dir}")
        try:
            download(args.dir, sources, args.timeout, args.force)
        except ConnectionError as error:
            print(f"\nerror: {error}\n\n" + HELP_OFFLINE.format(sources=" and ".join(sources)), file=sys.stderr)
            return 2
    try:
        verify(args.dir)
    except Exception as error:  # the loader's message names the file and key at fault
        print(f"error: {args.dir} is not a usable CosyVoice-300M-SFT directory: {error}\n"
              f"Delete the bad file(s) and run this script again (or pass --force).", file=sys.stderr)
        return 1
    print(f"done. Start the service with MODEL_DIR={args.dir} (the default when it is models/CosyVoice-300M-SFT).")
    return 0
