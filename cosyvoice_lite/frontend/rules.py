"""The official frontend's built-in text rules (what runs with or without a TN package), re-implemented.

Behaviour follows CosyVoice's frontend_utils exactly on every input it handles; where it would raise
(IndexError on an edge space or quote, inflect refusing a huge number) we return something sensible instead.
"""
from __future__ import annotations

import re
from typing import Callable

import regex

_IDEOGRAPH = re.compile(r"[\u4e00-\u9fff]")
_ONLY_PUNCT = regex.compile(r"[\p{P}\p{S}]*")
_SPEAKABLE = regex.compile(r"[\p{L}\p{N}]")
_TRAILING_COMMAS = re.compile(r"[，,、]+$")

ZH_STOPS = ("。", "？", "！", "；", "：", "、", ".", "?", "!", ";")
EN_STOPS = (".", "?", "!", ";", ":")
CLOSING_QUOTES = ('"', "”")


def contains_chinese(text: str) -> bool:
    """True if the text has a CJK unified ideograph (U+4E00..U+9FFF): this picks the zh path."""
    return _IDEOGRAPH.search(text) is not None


def is_only_punctuation(text: str) -> bool:
    """True for '' and for text made only of Unicode punctuation (P*) and symbols (S*, incl. emoji)."""
    return _ONLY_PUNCT.fullmatch(text) is not None


def is_speakable(text: str) -> bool:
    """True if the text has at least one letter or number (whitespace/controls/punctuation alone are not)."""
    return _SPEAKABLE.search(text) is not None


def replace_corner_mark(text: str) -> str:
    return text.replace("²", "平方").replace("³", "立方")


def remove_bracket(text: str) -> str:
    for mark in ("（", "）", "【", "】", "`"):
        text = text.replace(mark, "")
    return text.replace("——", " ")


def replace_blank(text: str) -> str:
    """Drop every space except one that sits between two non-space ASCII characters."""
    def ascii_word(c: str) -> bool:
        return c.isascii() and c != " "

    out = []
    last = len(text) - 1
    for i, c in enumerate(text):
        if c != " ":
            out.append(c)
        elif 0 < i < last and ascii_word(text[i + 1]) and ascii_word(text[i - 1]):
            out.append(c)
    return "".join(out)


def zh_cleanup(text: str) -> str:
    """The clean-ups the official frontend applies to Chinese text after TN, in its order."""
    text = text.replace("\n", "")
    text = replace_blank(text)
    text = replace_corner_mark(text)
    text = text.replace(".", "。")
    text = text.replace(" - ", "，")
    text = remove_bracket(text)
    return _TRAILING_COMMAS.sub("。", text)


def _number_words(digits: str, inflect_engine) -> str:
    try:
        return inflect_engine.number_to_words(digits)
    except Exception:  # inflect gives up on ~20+ digits (Python past 4300): read them digit by digit
        if len(digits) == 1:
            return digits
        words = {d: _number_words(d, inflect_engine) for d in set(digits)}
        return " ".join(words[d] for d in digits)


def spell_out_number(text: str, inflect_engine) -> str:
    """Replace every maximal run of str.isdigit() characters with inflect's English words for it."""
    out = []
    start = None
    for i, c in enumerate(text):
        if c.isdigit():
            if start is None:
                start = i
            continue
        if start is not None:
            out.append(_number_words(text[start:i], inflect_engine))
            start = None
        out.append(c)
    if start is not None:
        out.append(_number_words(text[start:], inflect_engine))
    return "".join(out)


_CONTROL_TOKEN = re.compile(r"<\|[^<>|]*\|>")
_WORD = re.compile(r"\s*\S+|\s+")


def without_control_tokens(text: str) -> str:
    """The text with every Whisper-style control token ('<|en|>', '<|endoftext|>', ...) removed."""
    return _CONTROL_TOKEN.sub("", text)


def cut_to_tokens(text: str, tokenize: Callable[[str], list[int]], max_tokens: int, strip: bool = True) -> list[str]:
    """Cut text into pieces of at most max_tokens tokens each: between words where there is whitespace, else
    (one word longer than the bound) at the longest prefix that fits. Text within the bound stays whole.
    strip=False keeps each piece's leading whitespace (pieces then join back into the text)."""
    if len(tokenize(text)) <= max_tokens:
        return [text]
    pieces: list[str] = []
    current = ""
    for word in _WORD.findall(text):
        if current and len(tokenize(current + word)) > max_tokens:
            pieces.append(current)
            current = ""
        if len(tokenize(current + word)) <= max_tokens:
            current += word
            continue
        long = _cut_word(current + word, tokenize, max_tokens)  # current is empty or fits with a part of word
        pieces.extend(long[:-1])
        current = long[-1]
    if current:
        pieces.append(current)
    return [p for p in (p.strip() for p in pieces) if p] if strip else pieces


def _cut_word(text: str, tokenize: Callable[[str], list[int]], max_tokens: int) -> list[str]:
    """Text without usable whitespace -> prefixes of at most max_tokens tokens (the longest that fit)."""
    pieces = []
    while len(tokenize(text)) > max_tokens:
        lo, hi = 1, len(text)  # the longest fitting prefix, by bisection (a character is at most 4 tokens)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(tokenize(text[:mid])) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        pieces.append(text[:lo])
        text = text[lo:]
    return pieces + [text]


def split_paragraph(text: str, tokenize: Callable[[str], list[int]], lang: str = "zh", token_max_n: int = 80,
                    token_min_n: int = 60, merge_len: int = 20, comma_split: bool = False,
                    sentence_max_tokens: int | None = None) -> list[str]:
    """Cut text into sentences at stop punctuation, then pack sentences into segments of about
    token_min_n..token_max_n units (characters for zh, tokens for en); a short tail (< merge_len) joins
    the previous segment. With sentence_max_tokens, a sentence longer than that many tokens (text without stops)
    is first cut into pieces that fit (cut_to_tokens), which the packing then treats as sentences."""
    if lang == "zh":
        def length(s: str) -> int:
            return len(s)
        stops = list(ZH_STOPS)
    else:
        def length(s: str) -> int:
            return len(tokenize(s))
        stops = list(EN_STOPS)
    if comma_split:
        stops += ["，", ","]
    if not text:
        return []
    if text[-1] not in stops:
        text += "。" if lang == "zh" else "."

    sentences = []
    start = 0
    for i, c in enumerate(text):
        if c not in stops:
            continue
        if i > start:
            sentences.append(text[start:i + 1])
        if i + 1 < len(text) and text[i + 1] in CLOSING_QUOTES:
            # a closing quote right after the stop belongs to the sentence just closed
            if sentences:
                sentences[-1] += text[i + 1]
            else:
                sentences.append(text[i:i + 2])
            start = i + 2
        else:
            start = i + 1
    if sentence_max_tokens is not None:
        sentences = [piece for sentence in sentences for piece in _bounded(sentence, tokenize, sentence_max_tokens)]

    segments = []
    current = ""
    for sentence in sentences:
        if length(current + sentence) > token_max_n and length(current) > token_min_n:
            segments.append(current)
            current = ""
        current += sentence
    if current:
        if length(current) < merge_len and segments:
            segments[-1] += current
        else:
            segments.append(current)
    return segments


def _bounded(sentence: str, tokenize: Callable[[str], list[int]], max_tokens: int) -> list[str]:
    """cut_to_tokens for one sentence, the spaces between pieces kept so that packing joins them as written."""
    return cut_to_tokens(sentence, tokenize, max_tokens, strip=False)
