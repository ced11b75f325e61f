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
# Bounds on what the LLM sees: a sentence (text between stops) longer than TOKEN_MAX_N tokens is cut into pieces
# of at most TOKEN_MAX_N before packing, and no packed segment exceeds SEGMENT_MAX_TOKENS (the official packing
# may join whole sentences past TOKEN_MAX_N; it never goes past twice that). The text encoder's and the LLM
# prefix's attention grow with the square of a segment's length, so this bounds a request's memory and step time.
SEGMENT_MAX_TOKENS = 2 * TOKEN_MAX_N


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
        """Normalised segments to synthesise one by one, each at most SEGMENT_MAX_TOKENS tokens; empty if nothing
        is speakable (control tokens such as '<|endoftext|>' are not speech)."""
        segments = []
        for segment in self._run(text, normalize)[1]:
            if not rules.is_speakable(rules.without_control_tokens(segment)):
                continue
            if len(self.tokenizer.encode(segment)) > SEGMENT_MAX_TOKENS:
                segments += [p for p in rules.cut_to_tokens(segment, self.tokenizer.encode, TOKEN_MAX_N)
                             if rules.is_speakable(rules.without_control_tokens(p))]
            else:
                segments.append(segment)
        return segments

    def segments_or_raise(self, text: str, normalize: bool = True) -> list[str]:
        segments = self.split(text, normalize)
        if not segments:
            raise NothingToSpeak("the text has nothing to speak (no letters or digits after normalisation and "
                                 "without control tokens)")
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
                                         token_min_n=TOKEN_MIN_N, merge_len=MERGE_LEN, comma_split=False,
                                         sentence_max_tokens=TOKEN_MAX_N)
        return text, [s for s in segments if not rules.is_only_punctuation(s)]
