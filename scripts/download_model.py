#!/usr/bin/env python3
"""Download the official CosyVoice-300M-SFT model into models/CosyVoice-300M-SFT (see --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cosyvoice_lite.download import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
