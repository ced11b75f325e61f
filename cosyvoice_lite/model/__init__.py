"""CosyVoice-300M-SFT in plain PyTorch: ``load_model(model_dir)`` reads an official model directory."""
from .cosyvoice import CosyVoiceSFT, UnknownSpeaker
from .loader import ModelLoadError, load_model

__all__ = ["CosyVoiceSFT", "ModelLoadError", "UnknownSpeaker", "load_model"]
