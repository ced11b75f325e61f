#!/usr/bin/env python3
"""Convert and compile the execution backend's models for a model directory into CACHE_DIR, so that the service's
first start on this machine (or an image built with the model baked in) does not pay for it.

    python scripts/warm_cache.py --model-dir models/CosyVoice-300M-SFT [--mode default]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from cosyvoice_lite.backends import accelerate, external_paths, runtime_plan
    from cosyvoice_lite.model import load_model
    from cosyvoice_lite.model.modes import mode_settings
    from cosyvoice_lite.settings import Settings

    service = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=service.model_dir)
    parser.add_argument("--mode", default="default", help="speed mode whose stages are compiled (default, fast)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mode = mode_settings(args.mode)
    stages = runtime_plan(mode, service.backend)  # as the engine does: what OpenVINO runs is not converted here
    model = load_model(args.model_dir, mode=mode.name, external=external_paths(stages))
    info = accelerate(model, mode, args.model_dir, backend=service.backend, cache_root=service.cache_root,
                      threads=service.threads, stages=stages)
    print(f"{service.cache_root}: {info['stages']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
