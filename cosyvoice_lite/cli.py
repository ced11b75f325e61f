"""``cosyvoice-lite`` command: serve, say, wyoming, download.

    cosyvoice-lite serve                      # gunicorn with the settings from environment variables
    cosyvoice-lite say "你好，世界。" -o hello.wav [--speaker 中文女] [--speed 1.0] [--format wav]
    cosyvoice-lite wyoming [--uri tcp://0.0.0.0:10200] [--zeroconf NAME]   # Home Assistant's protocol
    cosyvoice-lite download [--model sft|base|instruct] [--dir models/CosyVoice-300M-SFT]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np


def serve(args: argparse.Namespace) -> int:
    gunicorn = shutil.which("gunicorn") or "gunicorn"
    config = Path(__file__).parent / "serve" / "gunicorn_conf.py"
    os.execvp(gunicorn, [gunicorn, "-c", str(config), *args.gunicorn_args, "cosyvoice_lite.serve.wsgi:app"])
    return 1  # not reached


def say(args: argparse.Namespace) -> int:
    from . import audio
    from .engines import StartupError, load_engine
    from .service import ServiceError, SynthesisRequest, SynthesisService
    from .settings import Settings
    from .voices import VoiceMapError

    try:
        settings = Settings.from_env()
        service = SynthesisService(settings, load_engine(settings))
    except (StartupError, VoiceMapError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    try:  # a saved voice too (from the same store as the server's: CACHE, CACHE_DIR)
        voice = service.find_voice(args.speaker) if args.speaker else service.default_voice()
    except ServiceError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    if voice is None:
        print(f"error: unknown speaker {args.speaker!r}; {service.voice_choices(saved=service.store is not None)}",
              file=sys.stderr)
        return 2
    if args.format not in audio.FORMATS:
        print(f"error: unknown format {args.format!r}; choose one of {', '.join(audio.FORMATS)}", file=sys.stderr)
        return 2
    request = SynthesisRequest(args.text, voice, speed=args.speed, format=args.format,
                               normalize=not args.no_normalize, id="cli")
    try:  # the same admission, budgets, cache and errors as an HTTP request
        synthesis = service.start(request)
        try:
            chunks = list(synthesis)
        finally:
            synthesis.close()
    except ServiceError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    Path(args.output).write_bytes(audio.encode(samples, args.format))
    print(f"wrote {args.output}: {len(samples) / audio.SAMPLE_RATE:.2f} s of audio ({service.engine.name}, "
          f"speaker {voice.id})")
    return 0


def wyoming(args: argparse.Namespace) -> int:
    from .wyoming import run

    return run(args.uri, args.zeroconf)


def download(args: argparse.Namespace) -> int:
    from .download import main as download_main

    return download_main(args.download_args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["download"]:  # its options are download.py's: argparse's REMAINDER refuses a leading --option
        return download(argparse.Namespace(download_args=argv[1:]))
    parser = argparse.ArgumentParser(prog="cosyvoice-lite", description="CPU text-to-speech with CosyVoice-300M-SFT.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("serve", help="start the HTTP service (gunicorn)")
    p.add_argument("gunicorn_args", nargs=argparse.REMAINDER, help="extra gunicorn arguments")
    p.set_defaults(run=serve)
    p = commands.add_parser("say", help="synthesise TEXT into an audio file")
    p.add_argument("text")
    p.add_argument("-o", "--output", default="out.wav")
    p.add_argument("--speaker", help="speaker id or alias, or a saved voice's id (default: the first speaker; "
                   "a base model has none)")
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--format", default="wav", help="wav, pcm, mp3, opus or flac")
    p.add_argument("--no-normalize", action="store_true", help="skip text normalisation")
    p.set_defaults(run=say)
    p = commands.add_parser("wyoming", help="serve the Wyoming protocol (Home Assistant) on its own")
    p.add_argument("--uri", help="tcp://HOST:PORT (default: WYOMING_URI, else tcp://0.0.0.0:10200, "
                   "tcp://127.0.0.1:10200 when API_KEY is set)")
    p.add_argument("--zeroconf", metavar="NAME", help="announce for Home Assistant's discovery under NAME "
                   "(default: WYOMING_ZEROCONF; needs the zeroconf package)")
    p.set_defaults(run=wyoming)
    p = commands.add_parser("download", help="download CosyVoice-300M-SFT, or --model base / instruct (see --help)",
                            add_help=False)
    p.add_argument("download_args", nargs=argparse.REMAINDER)
    p.set_defaults(run=download)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
