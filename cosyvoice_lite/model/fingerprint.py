"""What identifies a model directory's weights across machines: hashes of the checkpoint files' contents.

Caches of derived data (compiled graphs, synthesised audio) are keyed by these, not by paths or mtimes, so that a
copy of the same checkpoint on another machine or pod finds the same entries and a changed file never matches.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from .loader import MODEL_FILES


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@lru_cache(maxsize=8)
def _digests(model_dir: str, stamp: tuple) -> dict[str, str]:
    return {name: file_digest(Path(model_dir) / name) for name in MODEL_FILES}


def file_digests(model_dir: str | Path) -> dict[str, str]:
    """sha256 of each checkpoint file (``cosyvoice.yaml``, ``llm.pt``, ...); computed once per process while the
    files keep their size and mtime."""
    root = Path(model_dir).resolve()
    stamp = tuple((name, (root / name).stat().st_size, (root / name).stat().st_mtime_ns) for name in MODEL_FILES)
    return dict(_digests(str(root), stamp))


def model_fingerprint(model_dir: str | Path, files: tuple[str, ...] = MODEL_FILES) -> str:
    """One short hex id for the given checkpoint files of a model directory (all of them by default)."""
    digests = file_digests(model_dir)
    joined = "\n".join(f"{name}={digests[name]}" for name in sorted(files))
    return hashlib.sha256(joined.encode()).hexdigest()[:24]
