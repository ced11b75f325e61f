"""The Wyoming protocol front door (Home Assistant's way to local speech engines), a thin adapter over the
synthesis service: framing with bounds (framing.py), one connection's events and audio (connection.py), sentences
out of streamed text deltas (sentences.py), the listening server and its two ways to run (server.py)."""
from .server import WyomingServer, describe, run, start_in_thread

__all__ = ["WyomingServer", "describe", "run", "start_in_thread"]
