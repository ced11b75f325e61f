"""Which engine a worker serves: CosyVoice when MODEL_DIR holds its checkpoint, the offline voice when MODEL_DIR is
missing or empty, a StartupError for anything else."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .base import Engine
from .piper import GET_COSYVOICE_HINT

log = logging.getLogger("cosyvoice_lite")


class StartupError(RuntimeError):
    """The service cannot start (bad MODEL_DIR, broken checkpoint, ...). The message says what to fix."""


def load_engine(settings) -> Engine:
    """CosyVoice when MODEL_DIR holds a CosyVoice model (cosyvoice.yaml), the offline Piper voice when MODEL_DIR
    is missing or empty. Anything else (a file, a directory of something else, a broken checkpoint) is a
    StartupError: better no server than one that silently speaks with the wrong voice. ``settings``: the
    service's Settings (model_dir, engine, threads and max_batch are read)."""
    model_dir = Path(settings.model_dir)
    wants = settings.engine
    _check_usable(model_dir)
    has_model = (model_dir / "cosyvoice.yaml").is_file()
    if wants == "cosyvoice" or (wants == "auto" and has_model):
        if not has_model:
            raise StartupError(f"ENGINE=cosyvoice but MODEL_DIR={model_dir} has no cosyvoice.yaml; "
                               f"{GET_COSYVOICE_HINT}")
        try:
            from .cosyvoice import CosyVoiceEngine
        except ImportError as e:
            raise StartupError(f"this build has no CosyVoice engine ({e})") from e
        try:
            engine = CosyVoiceEngine(model_dir, mode=settings.mode, kind=settings.model_kind,
                                     keep_voice_models=settings.keep_voice_models, threads=settings.threads,
                                     max_batch=settings.max_batch, backend=settings.backend,
                                     cache_root=settings.cache_root, tiktoken_file=settings.tiktoken_file,
                                     wetext_fsts=settings.wetext_fsts,
                                     defer_backend=True)  # compiled in the worker, after gunicorn's fork
        except Exception as e:
            raise StartupError(f"cannot load the CosyVoice model in {model_dir}: {type(e).__name__}: {e}") from e
        log.info("engine: cosyvoice, model %s, %d speakers, %d threads per worker, %d requests decoded at once",
                 model_dir, len(engine.voices()), settings.threads, engine.max_batch)
        return engine

    if wants == "auto":
        if model_dir.exists() and not model_dir.is_dir():
            raise StartupError(f"MODEL_DIR={model_dir} is a file, not a model directory")
        found = sorted(p.name for p in model_dir.iterdir() if not p.name.startswith(".")) if model_dir.is_dir() else []
        found = [name for name in found if name.lower() != "readme.md"]
        if found:
            what = "a CosyVoice2/3 model, which this service does not run" if any(
                n.startswith(("cosyvoice2", "cosyvoice3")) for n in found) else "not a CosyVoice-300M model"
            raise StartupError(f"MODEL_DIR={model_dir} has no cosyvoice.yaml (found: {', '.join(found[:8])}): "
                               f"{what}. Point MODEL_DIR at a CosyVoice-300M-SFT directory, or at an empty or "
                               f"missing one to use the offline voice")
    from .piper import PiperEngine

    try:
        engine = PiperEngine(threads=settings.threads)
    except Exception as e:
        raise StartupError(f"cannot load the offline Piper voice: {e}") from e
    log.warning("engine: piper (offline English fallback voice) - no CosyVoice model in MODEL_DIR=%s; "
                "%s, then restart", model_dir, GET_COSYVOICE_HINT)
    return engine


def _check_usable(model_dir: Path) -> None:
    """Something is at MODEL_DIR but it cannot be looked into (a symlink loop or to nothing, no permission): a
    StartupError, not the offline voice. Only a MODEL_DIR that does not exist at all, or an empty one, means
    'no model'."""
    if not os.path.lexists(model_dir):
        return
    try:
        if model_dir.stat() and model_dir.is_dir():
            os.listdir(model_dir)
    except FileNotFoundError:
        raise StartupError(f"MODEL_DIR={model_dir} is a symbolic link to a path that does not exist") from None
    except OSError as e:
        raise StartupError(f"MODEL_DIR={model_dir} cannot be used: {e.strerror or e}") from None
