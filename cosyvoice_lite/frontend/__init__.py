"""Text frontend of CosyVoice-300M-SFT: normalisation, sentence splitting and Whisper BPE token ids."""
from .frontend import NothingToSpeak, TextFrontend
from .tokenizer import Tokenizer

__all__ = ["NothingToSpeak", "TextFrontend", "Tokenizer"]
