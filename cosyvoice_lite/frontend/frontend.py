"""Text -> segments to speak -> token ids, as CosyVoice-300M-SFT's official frontend does it.

normalize=True: WeText TN (zh FSTs for text with a CJK ideograph, en FSTs otherwise), then the built-in rules
(zh clean-ups / English numbers spelled out with inflect), then sentence packing. normalize=False: the same
without WeText, i.e. the official frontend when no TN package is installed. Text holding '<|' and '|>'
(Whisper-style control tokens) is passed through untouched, as officially.
"""
from __future__ import annotations

import threading
from pathlib import Path

import inflect

from . import rules
from .tokenizer import Tokenizer
from .wetext_tn import WeTextNormalizer

TOKEN_MAX_N = 80   # segment packing, in characters (zh) or tokens (en)
TOKEN_MIN_N = 60
MERGE_LEN = 20


class NothingToSpeak(ValueError):
    """The text holds nothing that can be spoken (empty, blank, or only punctuation/symbols/emoji)."""


class TextFrontend:
    def __init__(self, use_wetext: bool = True, fst_dir: Path | None = None, vocab_path: Path | None = None):
        self.tokenizer = Tokenizer(num_languages=100, path=vocab_path)
        self.wetext = WeTextNormalizer(fst_dir) if use_wetext else None
        self.inflect = inflect.engine()
        self._lock = threading.Lock()  # inflect's engine keeps state while it spells a number

    def normalize(self, text: str, normalize: bool = True) -> str:
        """The whole text after normalisation (what the official text_normalize(split=False) returns)."""
        return self._run(text, normalize)[0]

    def split(self, text: str, normalize: bool = True) -> list[str]:
        """Normalised segments to synthesise one by one; empty if nothing is speakable."""
        return [s for s in self._run(text, normalize)[1] if rules.is_speakable(s)]

    def segments_or_raise(self, text: str, normalize: bool = True) -> list[str]:
        segments = self.split(text, normalize)
        if not segments:
            raise NothingToSpeak("the text has nothing to speak (no letters or digits after normalisation)")
        return segments

    def tokenize(self, segment: str) -> list[int]:
        return self.tokenizer.encode(segment)

    def _run(self, text: str, use_tn: bool) -> tuple[str, list[str]]:
        """(normalised text, segments before the speakability filter), following the official order of steps."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        if text == "":
            return "", []
        if "<|" in text and "|>" in text:  # control tokens: no TN, no splitting
            return text, [text]
        text = text.strip()
        with self._lock:
            if rules.contains_chinese(text):
                if use_tn and self.wetext is not None:
                    text = self.wetext.normalize(text, "zh")
                text = rules.zh_cleanup(text)
                lang = "zh"
            else:
                if use_tn and self.wetext is not None:
                    text = self.wetext.normalize(text, "en")
                text = rules.spell_out_number(text, self.inflect)
                lang = "en"
        segments = rules.split_paragraph(text, self.tokenizer.encode, lang, token_max_n=TOKEN_MAX_N,
                                         token_min_n=TOKEN_MIN_N, merge_len=MERGE_LEN, comma_split=False)
        return text, [s for s in segments if not rules.is_only_punctuation(s)]
