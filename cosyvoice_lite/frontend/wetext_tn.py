"""Text normalisation with WeText's FSTs, driven the way wetext 0.0.4 (the version CosyVoice pins) drives them.

Pipeline: tagger FST -> reorder the fields of each tagged token into the verbaliser's canonical order ->
verbaliser FST. The FSTs are the ones shipped inside the `wetext` 0.1.8 wheel (we only read its files; its
Python runtime behaves differently, e.g. it keeps fields the old runtime dropped). kaldifst runs the FSTs.

Where the old runtime would crash or hang (empty tagger output, malformed tags, text kaldifst cannot take),
``WeTextNormalizer.normalize`` returns the input unchanged instead: the caller's built-in rules still apply.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import kaldifst

FST_SHA256 = {
    "zh/tn/tagger.fst": "cf341314c51f7ce59049f3b2c42f0ce8fd71e6d08d4d6969613aad384a5e2ae8",
    "zh/tn/verbalizer.fst": "5a13cd679dd54637d12d2bd1bd33ee2165d91c867e14468c93195af02256e5da",
    "en/tn/tagger.fst": "245e2dc9174cdd007a8e9e50f3339773d1adbbc7535b71cf67478dc1683cc3ec",
    "en/tn/verbalizer.fst": "03155c88f317b2795969e264c19f87faf98b9853d5ac631e419bacdc3b3ee15a",
}

# Canonical field order per token type that the TN verbalisers expect (wetext 0.0.4). Fields not listed
# for a reordered type are dropped, as the old runtime did.
ZH_ORDERS = {
    "date": ["year", "month", "day"],
    "fraction": ["denominator", "numerator"],
    "measure": ["denominator", "numerator", "value"],
    "money": ["value", "currency"],
    "time": ["noon", "hour", "minute", "second"],
}
EN_ORDERS = {
    "date": ["preserve_order", "text", "day", "month", "year"],
    "money": ["integer_part", "fractional_part", "quantity", "currency_maj"],
}

_DIGIT = re.compile(r"\d")                  # the old runtime normalises only text with a (Unicode) digit
_IDEOGRAPH = re.compile(r"[\u4e00-\u9fff]")


class TagParseError(ValueError):
    pass


def find_fst_dir() -> Path:
    """wetext/fsts inside the installed wetext package, which is not imported (another directory may be given to
    WeTextNormalizer: the service's COSYVOICE_LITE_WETEXT_FSTS setting)."""
    spec = importlib.util.find_spec("wetext")  # locating the package does not run its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "wetext FSTs not found: `pip install --no-deps wetext==0.1.8` or set COSYVOICE_LITE_WETEXT_FSTS")
    return Path(list(spec.submodule_search_locations)[0]) / "fsts"


def parse_tags(tagged: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """Parse `name { key: "value" ... } name { ... }` into (name, key order, values).

    Values are kept raw (a backslash and the character after it are both kept), as the old runtime did.
    A key seen twice keeps both positions in the order but only its last value.
    """
    tokens = []
    n, i = len(tagged), 0
    while True:
        while i < n and tagged[i] == " ":
            i += 1
        if i >= n:
            return tokens
        start = i
        while i < n and (tagged[i].isascii() and (tagged[i].isalpha() or tagged[i] == "_")):
            i += 1
        name = tagged[start:i]
        for expected in " { ":
            if i < n and tagged[i] == expected:
                i += 1
        order, values = [], {}
        while True:
            while i < n and tagged[i] == " ":
                i += 1
            if i >= n:  # the old runtime ends a token at end of text too
                break
            if tagged[i] == "}":
                i += 1
                break
            start = i
            while i < n and (tagged[i].isascii() and (tagged[i].isalpha() or tagged[i] == "_")):
                i += 1
            key = tagged[start:i]
            if not key:
                raise TagParseError(f"expected a field name at {i}")
            for expected in ': "':
                if i < n and tagged[i] == expected:
                    i += 1
            start = i
            while i < n and tagged[i] != '"':
                i += 2 if tagged[i] == "\\" else 1
            if i >= n:
                raise TagParseError("unterminated value")
            order.append(key)
            values[key] = tagged[start:i]
            i += 1  # closing quote
        tokens.append((name, order, values))


def reorder_tags(tagged: str, orders: dict[str, list[str]]) -> str:
    """Rewrite each tagged token with its fields in the canonical order the verbaliser expects."""
    out = []
    for name, order, values in parse_tags(tagged):
        if name in orders and values.get("preserve_order") != "true":
            order = orders[name]
        fields = "".join(f' {key}: "{values[key]}"' for key in order if key in values)
        out.append(f"{name} {{{fields} }}")
    return " ".join(out)


class WeTextNormalizer:
    """Chinese and English TN (remove_erhua=False), chosen by whether the text has a CJK ideograph."""

    def __init__(self, fst_dir: Path | None = None):
        fst_dir = Path(fst_dir or find_fst_dir())
        self.taggers, self.verbalizers = {}, {}
        for lang in ("zh", "en"):
            for kind, table in (("tagger", self.taggers), ("verbalizer", self.verbalizers)):
                path = fst_dir / lang / "tn" / f"{kind}.fst"
                if not path.is_file():
                    raise FileNotFoundError(path)
                table[lang] = kaldifst.TextNormalizer(str(path))
        self.orders = {"zh": ZH_ORDERS, "en": EN_ORDERS}

    def normalize(self, text: str, lang: str | None = None) -> str:
        """TN of ``text``; ``lang`` None = zh if it has a CJK ideograph else en. Text without digits is returned as is.

        Text longer than MAX_CHUNK is normalised chunk by chunk, cut between sentences where possible:
        the FSTs' time and memory grow faster than linearly (10k chars of '1 1 1 ...' took 13 s and 600 MB
        in one go, ~3 s in chunks). Shorter text goes through whole, exactly as officially.
        """
        if not _DIGIT.search(text):
            return text
        lang = lang or ("zh" if _IDEOGRAPH.search(text) else "en")
        pieces = chunk_text(text, MAX_CHUNK)
        return "".join((self.run_fsts(piece, lang) if piece.strip() else piece) + sep for piece, sep in pieces)

    def run_fsts(self, text: str, lang: str) -> str:
        """One tagger -> reorder -> verbaliser pass over the whole text (the input back if the FSTs fail on it)."""
        try:
            tagged = self.taggers[lang](text)
            if not tagged:  # e.g. the en tagger on Hangul + digits; the old runtime asserts here
                return text
            spoken = self.verbalizers[lang](reorder_tags(tagged, self.orders[lang]))
        except (TagParseError, TypeError, ValueError, UnicodeError):
            return text  # TypeError: kaldifst refuses strings that are not valid UTF-8 (lone surrogates)
        return spoken if spoken else text


MAX_CHUNK = 500
_SPACE_RUN = re.compile(r"\s+")
_STOPS = ".!?;"
_WIDE_STOPS = "。！？；"


def chunk_text(text: str, max_len: int) -> list[tuple[str, str]]:
    """Cut text into (piece, separator) pairs, pieces at most max_len long, whose concatenation is the text.

    Cuts go where the FSTs keep the text as it is, so that chunked TN equals whole-text TN: preferably
    at the latest single space after a sentence stop or right after a full-width stop; failing that at the
    latest whitespace (the FSTs may have rewritten it, e.g. en drops newlines) or, last, anywhere.
    Separators (whitespace) are kept out of TN.
    """
    out = []
    pos = 0
    while len(text) - pos > max_len:
        window = text[pos:pos + max_len + 1]  # a separator may start right after max_len characters
        spaces = [m for m in _SPACE_RUN.finditer(window) if 0 < m.start() <= max_len]
        sentence_space = next((m for m in reversed(spaces)
                               if m.group() == " " and window[m.start() - 1] in _STOPS), None)
        wide = max(window.rfind(c, 0, max_len) for c in _WIDE_STOPS)
        if sentence_space is not None and sentence_space.start() > wide:
            out.append((window[:sentence_space.start()], " "))
            pos += sentence_space.end()
        elif wide >= 0:
            out.append((window[:wide + 1], ""))
            pos += wide + 1
        elif spaces:
            out.append((window[:spaces[-1].start()], spaces[-1].group()))
            pos += spaces[-1].end()
        else:
            out.append((window[:max_len], ""))
            pos += max_len
    if pos < len(text):
        out.append((text[pos:], ""))
    return out
