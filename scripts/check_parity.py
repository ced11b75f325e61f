#!/usr/bin/env python3
"""Check our implementation against official outputs in a golden directory.

    .venv/bin/python scripts/check_parity.py                   # the golden set in tests/golden (or $GOLDEN_DIR)
    .venv/bin/python scripts/check_parity.py GOLDEN_DIR        # any golden set in the same layout
    .venv/bin/python scripts/check_parity.py tests/golden-modes --only model
                          # a golden-modes set (zero-shot, cross-lingual, instruct, VC, prompt-audio frontend)
    .venv/bin/python scripts/check_parity.py --only model      # or: --only frontend

Prints one line per case and stage (max-abs error, or mismatch count for exact stages), then a summary.
Exit status 1 if any stage is over its tolerance or any case could not run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from parity import TOLERANCE, Golden, frontend_checks, model_checks  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("golden_dir", type=Path, nargs="?",
                        default=Path(os.environ.get("GOLDEN_DIR") or ROOT / "tests" / "golden"),
                        help="golden directory (default: $GOLDEN_DIR, else tests/golden)")
    parser.add_argument("--only", choices=["model", "frontend"], help="run one part only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the golden sets used 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        golden = Golden(args.golden_dir)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    started = time.monotonic()
    checks = []
    parts = [args.only] if args.only else ["model", "frontend"]
    for part in parts:
        for check in (model_checks(golden) if part == "model" else frontend_checks(golden)):
            checks.append(check)
            print(check.line(), flush=True)
    failed = [c for c in checks if not c.ok]
    worst = max((c.error for c in checks if c.tolerance and c.ok), default=0.0)
    print(f"summary: {len(checks)} checks, {len(checks) - len(failed)} ok, {len(failed)} failed; "
          f"largest passing max-abs {worst:.3g} (tolerance {TOLERANCE:g}); {time.monotonic() - started:.1f}s")
    return 1 if failed or not checks else 0


if __name__ == "__main__":
    sys.exit(main())
