#!/usr/bin/env python3
"""Write a small random-weight model directory in the official CosyVoice-300M-SFT layout.

It has the real architecture and fixed sizes (text vocabulary, 4096 speech tokens, 80 mel bins, 192-dim speaker
embeddings, 22050 Hz) with every layer shrunk, so the service and its tests run the real code path in seconds.
It speaks noise, not words.

    python scripts/make_tiny_model.py models/tiny [--seed 0] [--preset tiny|full]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_model import PRESETS, write_random_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write (created if needed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="layer sizes: tiny (default) or the full CosyVoice-300M architecture")
    args = parser.parse_args()
    path = write_random_model(args.out_dir, args.preset, args.seed)
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in sorted(path.iterdir()))
    print(f"wrote {path}: {sizes}")


if __name__ == "__main__":
    main()
