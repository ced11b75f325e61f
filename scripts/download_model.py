#!/usr/bin/env python3
"""Download an official CosyVoice-300M model: -SFT into models/CosyVoice-300M-SFT, or --model base / instruct (see
--help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cosyvoice_lite.download import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
