"""Engines: the interface (base), CosyVoice, the offline Piper voice, and the choice between them (select).
CosyVoice is imported only when chosen, so that the offline voice starts without loading torch."""
from .base import OUTPUT_RATE, SEGMENT_END, Engine, Offers, Plan, Segment, SerialExecutor, SynthesisError
from .select import StartupError, load_engine

__all__ = ["OUTPUT_RATE", "SEGMENT_END", "Engine", "Offers", "Plan", "Segment", "SerialExecutor", "StartupError",
           "SynthesisError", "load_engine"]
