"""Where the tests read the golden parity data.

GOLDEN: the directory in GOLDEN_DIR if that is set (any golden set in the layout of tests/golden/README.md), else the
copy kept in the repository, tests/golden.
GOLDEN_MODES: the zero-shot / cross-lingual / instruct / VC set (layout of tests/golden-modes/README.md): the directory
in GOLDEN_MODES_DIR if that is set, else ../shared/golden-modes next to the repository when it exists, else the copy
kept in the repository, tests/golden-modes (whose model weights are links to tests/golden/model)."""
import os
from pathlib import Path

_TESTS = Path(__file__).resolve().parent

GOLDEN = Path(os.environ.get("GOLDEN_DIR") or _TESTS / "golden").resolve()
GOLDEN_MODEL = GOLDEN / "model"

_SHARED_MODES = _TESTS.parents[1] / "shared" / "golden-modes"
GOLDEN_MODES = Path(os.environ.get("GOLDEN_MODES_DIR")
                    or (_SHARED_MODES if (_SHARED_MODES / "manifest.json").is_file() else _TESTS / "golden-modes")
                    ).resolve()


def assert_matches_checksums(root: Path) -> None:
    """Every file under ``root`` is listed in its SHA256SUMS with the digest it has, and nothing listed is missing."""
    import hashlib

    listed = {}
    for line in (root / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.removeprefix("./")] = digest
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert present == set(listed)
    assert {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in present} == listed
