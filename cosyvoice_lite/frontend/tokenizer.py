"""The text tokenizer CosyVoice-300M was trained with: Whisper's multilingual BPE (100 languages).

The vocabulary is data, so we only borrow the `multilingual.tiktoken` ranks file that the `openai-whisper`
PyPI package ships, and build the tiktoken ``Encoding`` ourselves. Nothing is downloaded and the `whisper`
package is never imported (its import pulls in torch/numba); we only locate its directory.
"""
from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import tiktoken

# Whisper's language codes in its token order (the first 100 = num_languages=100, ending with Cantonese).
LANGUAGE_CODES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt "
    "la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc "
    "ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue"
).split()

# Pre-tokenisation pattern of Whisper's (GPT-2 style) encodings.
PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

VOCAB_SHA256 = "b34b360dbb493e781e479794586d661700670d65564001f23024971d1f2fa126"


def special_tokens(num_languages: int = 100) -> list[str]:
    """Whisper's special tokens, in id order right after the BPE ranks."""
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{code}|>" for code in LANGUAGE_CODES[:num_languages]],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *[f"<|{i * 0.02:.2f}|>" for i in range(1501)],
    ]


def find_vocab_file() -> Path:
    """Path of the multilingual.tiktoken inside the openai-whisper package (another file may be given to
    Tokenizer: the service's COSYVOICE_LITE_TIKTOKEN setting)."""
    spec = importlib.util.find_spec("whisper")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "multilingual.tiktoken not found: install it with `pip install --no-deps openai-whisper==20250625` "
            "or point COSYVOICE_LITE_TIKTOKEN at the file")
    path = Path(list(spec.submodule_search_locations)[0]) / "assets" / "multilingual.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed openai-whisper package")
    return path


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_encoding(num_languages: int = 100, path: Path | None = None) -> tiktoken.Encoding:
    """The 51,866-id encoding (50,257 BPE ranks + 1,609 specials for 100 languages)."""
    ranks = load_ranks(Path(path) if path else find_vocab_file())
    specials = {token: len(ranks) + i for i, token in enumerate(special_tokens(num_languages))}
    return tiktoken.Encoding(
        name="multilingual",
        explicit_n_vocab=len(ranks) + len(specials),
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens=specials,
    )


class Tokenizer:
    """Text -> token ids exactly as the official frontend does (every special token is allowed)."""

    def __init__(self, num_languages: int = 100, path: Path | None = None):
        self.encoding = build_encoding(num_languages, path)

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        # Every special token looks like '<|...|>': text lacking either marker cannot hold one, and the plain
        # BPE path gives the same ids ~10x faster (tiktoken rebuilds the 1,609-entry allowed set per call).
        if "<|" in text and "|>" in text:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)
