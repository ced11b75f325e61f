"""Test helper (not a test): a real engine behind a gate, so that queue, timeout, streaming and disconnect tests
are deterministic instead of racing against synthesis speed. It never fakes audio: every chunk comes from the real
engine it wraps.

The gate is a directory: synthesis may proceed while ``<gate_dir>/open`` exists. ``<gate_dir>/mode`` says where
the engine waits:
  start        before synthesising anything (holds the synthesis thread: fills the queue, runs into timeouts)
  after_first  after the first chunk (the first audio is out, the rest is not synthesised yet)
  fail         raise an unexpected error instead of synthesising (a bug inside an engine)
  (absent)     no waiting
While waiting it watches the request's cancel event and stops (Cancelled) when it is set.

gunicorn uses it through the factory ``make_app()`` (env GATE_DIR), e.g. ``gunicorn 'gated_engine:make_app()'``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from cosyvoice_lite.cancel import Cancelled
from cosyvoice_lite.engines import Engine

MAX_WAIT = 60.0


class GatedEngine(Engine):
    def __init__(self, inner: Engine, gate_dir: str | Path):
        self.inner = inner
        self.gate_dir = Path(gate_dir)
        self.name = inner.name
        self.max_batch = inner.max_batch
        self.description = inner.description
        self.model_id, self.hint = inner.model_id, inner.hint

    def voices(self):
        return self.inner.voices()

    def identity(self):
        return self.inner.identity()

    def plan(self, text, normalize=True):
        return self.inner.plan(text, normalize)

    def unreadable(self, text):
        return self.inner.unreadable(text)

    def warmup(self):
        if self._mode() == "warmup":
            self._wait(None)
        return self.inner.warmup()

    def _mode(self) -> str:
        try:
            return (self.gate_dir / "mode").read_text().strip()
        except FileNotFoundError:
            return ""

    def _wait(self, cancel) -> None:
        deadline = time.monotonic() + MAX_WAIT
        while not (self.gate_dir / "open").exists():
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            if time.monotonic() > deadline:
                raise RuntimeError("gate never opened")
            time.sleep(0.01)

    def _synthesize(self, segments, voice, speed, cancel, seed):
        mode = self._mode()
        if mode == "fail":
            raise RuntimeError("injected engine failure")
        if mode == "start":
            self._wait(cancel)
        for i, chunk in enumerate(self.inner.synthesize(segments, voice, speed, cancel, seed)):
            yield chunk
            if i == 0 and mode == "after_first":
                self._wait(cancel)


def make_app():
    from cosyvoice_lite.engines import load_engine
    from cosyvoice_lite.serve import create_app
    from cosyvoice_lite.settings import Settings

    return create_app({"engine": GatedEngine(load_engine(Settings.from_env()), os.environ["GATE_DIR"])})
