"""Cutting a stream of text deltas (an LLM's, cut anywhere, even inside a word) into sentences to speak as soon as
each is complete.

The frontend's splitter (frontend/rules.split_paragraph) needs the whole text and packs sentences into ~80-token
segments, which is right for one request and wrong here: the first sentence must be spoken before the rest exists.
So this cuts at sentence ends only, and the service plans each sentence as a request of its own.
"""
from __future__ import annotations

from ..frontend.rules import CLOSING_QUOTES

FULL_WIDTH_ENDS = "。！？"    # Chinese and Japanese: the sentence ends here, spaces or not
ASCII_ENDS = ".!?"           # only before whitespace: "3.14", "e.g" and "www.x.org" go on
TRAILERS = CLOSING_QUOTES + ("’", "'", ")", "）", "」", "』")
MAX_PENDING = 400            # characters without a sentence end: cut at the last space or comma, to bound memory


class SentenceCutter:
    def __init__(self):
        self.pending = ""

    def feed(self, delta: str) -> list[str]:
        """The sentences that ``delta`` completes (possibly none)."""
        self.pending += delta
        out = []
        while True:
            end = self._end()
            if end is None:
                break
            out.append(self.pending[:end])
            self.pending = self.pending[end:]
        while len(self.pending) > MAX_PENDING:  # no end in sight: a clause boundary, else a hard cut
            cut = max(self.pending.rfind(c, 0, MAX_PENDING) for c in " ,，、;；:：") + 1 or MAX_PENDING
            out.append(self.pending[:cut])
            self.pending = self.pending[cut:]
        return [s for s in out if s.strip()]

    def finish(self) -> list[str]:
        """What remains at the end of the stream."""
        rest, self.pending = self.pending, ""
        return [rest] if rest.strip() else []

    def _end(self) -> int | None:
        """Index just past the first complete sentence in ``pending`` (with its closing quotes), or None."""
        text = self.pending
        for i, ch in enumerate(text):
            if ch not in FULL_WIDTH_ENDS and ch not in ASCII_ENDS:
                continue
            j = i + 1
            while j < len(text) and (text[j] in TRAILERS or text[j] in FULL_WIDTH_ENDS or text[j] in ASCII_ENDS):
                j += 1
            if ch in FULL_WIDTH_ENDS:
                return j  # at once: a closing quote in the next delta only leads the next sentence
            if j == len(text):
                return None  # whitespace (or '14' of '3.14') may follow in the next delta
            if text[j].isspace():
                return j
        return None
