"""Voices: what conditions synthesis (``Voice``), made from a checkpoint's speakers or, later, from reference audio."""
from .voice import BUILTIN, CLONED, INSTRUCTED, Voice, builtin_voices

__all__ = ["BUILTIN", "CLONED", "INSTRUCTED", "Voice", "builtin_voices"]
