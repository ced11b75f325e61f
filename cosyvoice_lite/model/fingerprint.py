"""What identifies a model directory's weights across machines: hashes of the checkpoint files' contents.

Caches of derived data (compiled graphs, synthesised audio) are keyed by these, not by paths or mtimes, so that a
copy of the same checkpoint on another machine or pod finds the same entries and a changed file never matches.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from .loader import MODEL_FILES, REQUIRED_FILES


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@lru_cache(maxsize=8)
def _digests(model_dir: str, stamp: tuple) -> dict[str, str]:
    return {name: file_digest(Path(model_dir) / name) for name, *_ in stamp}


def file_digests(model_dir: str | Path) -> dict[str, str]:
    """sha256 of each checkpoint file there is (``cosyvoice.yaml``, ``llm.pt``, ...; ``spk2info.pt`` only where the
    model has speakers: the base model has none); computed once per process while the files keep their size and
    mtime."""
    root = Path(model_dir).resolve()
    present = [name for name in MODEL_FILES if name in REQUIRED_FILES or (root / name).exists()]
    stamp = tuple((name, (root / name).stat().st_size, (root / name).stat().st_mtime_ns) for name in present)
    return dict(_digests(str(root), stamp))


def model_fingerprint(model_dir: str | Path, files: tuple[str, ...] = MODEL_FILES) -> str:
    """One short hex id for the given checkpoint files of a model directory (all of them by default); a file the
    directory lacks (spk2info.pt of the base model) counts as absent, so adding it later gives another id."""
    digests = file_digests(model_dir)
    joined = "\n".join(f"{name}={digests.get(name, 'absent')}" for name in sorted(files))
    return hashlib.sha256(joined.encode()).hexdigest()[:24]
