#!/usr/bin/env python3
"""Download an official CosyVoice-300M model directory (only the files the service needs).

    python scripts/download_model.py                       # -SFT -> models/CosyVoice-300M-SFT, ModelScope then Hugging Face
    python scripts/download_model.py --model base          # the base model -> models/CosyVoice-300M (no built-in speakers)
    python scripts/download_model.py --model instruct      # -Instruct -> models/CosyVoice-300M-Instruct
    python scripts/download_model.py --source huggingface  # one source only
    python scripts/download_model.py --dir /data/cosyvoice  # elsewhere (then set MODEL_DIR to it)

Each model is its own repository on both hosts (``MODELS``). The base model has no spk2info.pt (no speakers of its
own: it speaks with voices made from a clip); every model gets the two ONNX networks that make those voices.
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

# --model -> the repository's name on ModelScope (iic/...) and Hugging Face (FunAudioLLM/...)
MODELS = {"sft": "CosyVoice-300M-SFT", "base": "CosyVoice-300M", "instruct": "CosyVoice-300M-Instruct"}
VOICE_FILES = ("campplus.onnx", "speech_tokenizer_v1.onnx")  # the speaker encoder and speech tokenizer: make voices
FILES = {  # what each model's directory needs; the base model ships no spk2info.pt (it has no built-in speakers)
    kind: ("cosyvoice.yaml", *(() if kind == "base" else ("spk2info.pt",)), "hift.pt", "flow.pt", "llm.pt",
           *VOICE_FILES) for kind in MODELS}
SOURCES = {
    "modelscope": "https://www.modelscope.cn/models/iic/{repo}/resolve/master/{name}",
    "huggingface": "https://huggingface.co/FunAudioLLM/{repo}/resolve/main/{name}",
}
HELP_OFFLINE = """\
Could not reach {sources}.
This machine seems to have no internet access (or the hosts are blocked). Options:
  1. Download on another machine:  python scripts/download_model.py --model {kind} --dir {repo}
     then copy that directory here, to models/{repo} (or set MODEL_DIR to where you put it).
  2. With git-lfs elsewhere:  git clone https://www.modelscope.cn/iic/{repo}.git
  3. Keep using the bundled offline English voice: the service starts without the model."""


def _progress(name: str, done: int, total: int | None, started: float) -> None:
    rate = done / max(time.monotonic() - started, 1e-6) / 1e6
    if total:
        width = 30
        filled = int(width * done / total)
        line = f"\r  {name:<25} [{'#' * filled}{'.' * (width - filled)}] {done / 1e6:8.1f}/{total / 1e6:.1f} MB {rate:6.1f} MB/s"
    else:
        line = f"\r  {name:<25} {done / 1e6:8.1f} MB {rate:6.1f} MB/s"
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


def download(model_dir: Path, sources: list[str], timeout: float, force: bool, kind: str = "sft") -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in FILES[kind]:
        dest = model_dir / name
        if dest.exists() and not force:
            print(f"  {name:<25} present, skipped")
            continue
        errors = []
        for source in sources:
            url = SOURCES[source].format(repo=MODELS[kind], name=name)
            try:
                print(f"  {name:<25} from {source}")
                fetch(url, dest, timeout)
                break
            except (urllib.error.URLError, socket.timeout, TimeoutError, OSError) as error:
                errors.append(f"{source}: {getattr(error, 'reason', error)}")
        else:
            raise ConnectionError("; ".join(errors))


def verify(model_dir: Path, kind: str = "sft") -> None:
    """Load the model strictly; the speakers an SFT or Instruct model must have, the voice files a base model must
    have (it has no other way to speak). Raises with what is wrong."""
    from .model import ModelLoadError, load_model

    model = load_model(model_dir)
    no_voices = [name for name in VOICE_FILES if not (model_dir / name).is_file()]
    if kind == "base" and no_voices:
        raise ModelLoadError(f"missing {', '.join(no_voices)}: the base model speaks only with voices made from a "
                             "clip, which these files make")
    if kind != "base" and not model.speakers:
        raise ModelLoadError(f"missing spk2info.pt, the speakers of {MODELS[kind]} (a directory without it is the "
                             "base model: --model base)")
    if model.speakers:
        voices = f"no {' or '.join(no_voices)}: no voices can be made from a clip (run this again without " \
                 "--verify-only to fetch them)" if no_voices else "voices can be made from a clip"
        print(f"verified {model_dir}: {len(model.speakers)} speakers ({', '.join(model.speakers)}); {voices}")
    else:
        print(f"verified {model_dir}: no built-in speakers (the base model); make a voice from a clip with POST "
              "/v1/audio/voices and speak with it")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="download_model.py",
                                     description="Download a CosyVoice-300M model for cosyvoice-lite.")
    parser.add_argument("--model", choices=list(MODELS), default="sft",
                        help="sft: CosyVoice-300M-SFT (built-in speakers, the default); base: CosyVoice-300M (no "
                             "built-in speakers: voices made from a clip); instruct: CosyVoice-300M-Instruct")
    parser.add_argument("--dir", type=Path, default=None,
                        help="target directory (default: models/<the model's name>, e.g. models/CosyVoice-300M-SFT)")
    parser.add_argument("--source", choices=["auto", *SOURCES], default="auto",
                        help="where to download from (auto: ModelScope, then Hugging Face)")
    parser.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    parser.add_argument("--force", action="store_true", help="download again even if files are present")
    parser.add_argument("--verify-only", action="store_true", help="only check an existing directory")
    args = parser.parse_args(argv)
    repo = MODELS[args.model]
    model_dir = args.dir or ROOT / "models" / repo

    sources = list(SOURCES) if args.source == "auto" else [args.source]
    if not args.verify_only:
        free = shutil.disk_usage(model_dir.parent if model_dir.parent.exists() else ROOT).free
        if free < 3e9:
            print(f"warning: only {free / 1e9:.1f} GB free; the model needs over 2 GB", file=sys.stderr)
        print(f"downloading {repo} into {model_dir}")
        try:
            download(model_dir, sources, args.timeout, args.force, args.model)
        except ConnectionError as error:
            print(f"\nerror: {error}\n\n" + HELP_OFFLINE.format(sources=" and ".join(sources), kind=args.model,
                                                                repo=repo), file=sys.stderr)
            return 2
    try:
        verify(model_dir, args.model)
    except Exception as error:  # the loader's message names the file and key at fault
        print(f"error: {model_dir} is not a usable {repo} directory: {error}\n"
              f"Delete the bad file(s) and run this script again (or pass --force).", file=sys.stderr)
        return 1
    note = ""
    if args.model == "instruct" and "instruct" not in model_dir.resolve().name.lower():
        note = " and MODEL_KIND=instruct (its directory's name does not say so)"
    default = " (the default)" if args.model == "sft" and args.dir is None else ""
    print(f"done. Start the service with MODEL_DIR={model_dir}{default}{note}.")
    return 0
