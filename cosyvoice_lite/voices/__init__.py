"""Voices: what conditions synthesis (``Voice``), made from a checkpoint's speakers, and the names a service offers
them by (``VoiceBook``)."""
from .book import DEFAULT_VOICE_MAP, VoiceBook, VoiceMapError, parse_voice_map
from .voice import BUILTIN, CLONED, INSTRUCTED, Voice, builtin_voices

__all__ = ["BUILTIN", "CLONED", "DEFAULT_VOICE_MAP", "INSTRUCTED", "Voice", "VoiceBook", "VoiceMapError",
           "builtin_voices", "parse_voice_map"]
