"""Where the tests read the golden parity data: the directory in GOLDEN_DIR if that is set (any golden set in the
layout of tests/golden/README.md), else the copy kept in the repository, tests/golden."""
import os
from pathlib import Path

GOLDEN = Path(os.environ.get("GOLDEN_DIR") or Path(__file__).resolve().parent / "golden").resolve()
GOLDEN_MODEL = GOLDEN / "model"
