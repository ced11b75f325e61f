"""The voices a service offers by name: the engine's own (by id or readable name) and the OpenAI voice names mapped
onto them (VOICE_MAP laid over DEFAULT_VOICE_MAP)."""
from __future__ import annotations

import logging

from .voice import Voice

log = logging.getLogger("cosyvoice_lite")

# OpenAI's built-in voices -> CosyVoice-300M-SFT speakers, by the voices' character (female / male). OpenAI's voices
# are English voices, so are these speakers; Chinese text wants VOICE_MAP=alloy=zh-female,... (or voice=zh-female).
DEFAULT_VOICE_MAP = {
    "alloy": "en-female", "ash": "en-male", "ballad": "en-male", "coral": "en-female", "echo": "en-male",
    "fable": "en-male", "nova": "en-female", "onyx": "en-male", "sage": "en-female", "shimmer": "en-female",
    "verse": "en-male", "marin": "en-female", "cedar": "en-male",
}


class VoiceMapError(ValueError):
    """VOICE_MAP names a voice that does not exist, or hides one (the message says which)."""


def parse_voice_map(text: str) -> dict[str, str]:
    """VOICE_MAP 'alloy=zh-female,echo=zh-male' as {voice name (lower case): voice id or name}."""
    entries = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, target = item.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise ValueError(f"VOICE_MAP entries are name=speaker separated by commas, got {item.strip()!r}")
        entries[name.strip().lower()] = target.strip()
    return entries


class VoiceBook:
    """Finds a Voice by name. ``voices``: the engine's own, the first being the default. A model without speakers
    of its own (CosyVoice-300M, the base model) has none: no default, and the OpenAI names map to nothing.

    A VOICE_MAP target the engine does not have is an error, except on an engine with a single voice (the offline
    voice): there every name maps to it (logged), so that a VOICE_MAP written for CosyVoice does not stop the
    fallback from starting."""

    def __init__(self, voices: list[Voice], voice_map: str = "", engine: str = ""):
        self.voices = list(voices)
        self.default: Voice | None = self.voices[0] if self.voices else None
        user = parse_voice_map(voice_map)
        for name in user:
            if self.own(name) is not None:
                raise VoiceMapError(f"VOICE_MAP name {name!r} is already a speaker of the {engine} engine; "
                                    "choose another name")
        self.mapped: dict[str, Voice] = {}
        if self.default is None:
            if user:
                raise VoiceMapError(f"VOICE_MAP maps {', '.join(sorted(user))} to speakers, but the {engine} engine's "
                                    "model has no built-in speakers (a base model); leave VOICE_MAP empty")
            return
        single = len(self.voices) == 1
        for name, target in {**DEFAULT_VOICE_MAP, **user}.items():
            voice = self.own(target)
            if voice is None:
                if name in user and not single:
                    raise VoiceMapError(f"VOICE_MAP maps {name!r} to {target!r}, which is not a speaker of the "
                                        f"{engine} engine; choose one of: {self.names_listing()}")
                if name in user or not single:  # an engine with one voice: no news
                    log.info("voice %s: the %s engine has no speaker %s; %s speaks it", name, engine, target,
                             self.default.name)
                voice = self.default
            self.mapped[name] = voice

    def own(self, name: str) -> Voice | None:
        """One of the engine's voices by id or readable name (names match case-insensitively)."""
        for voice in self.voices:
            if name == voice.id or name.strip().lower() == voice.name.lower():
                return voice
        return None

    def find(self, name: str, mapped: bool = True) -> Voice | None:
        """A voice's id or name first (so a mapped name never hides a voice), then, with ``mapped``, a mapped
        OpenAI name."""
        return self.own(name) or (self.mapped.get(name.strip().lower()) if mapped else None)

    def names_listing(self) -> str:
        return ", ".join(f"{v.id} ({v.name})" if v.name != v.id else v.id for v in self.voices)

    def listing(self) -> list[dict]:
        """/v1/audio/voices: the voices, then the mapped names with the voice each one speaks with."""
        voices = [{"id": v.name, "name": v.id, "language": v.language, "speaker": v.name} for v in self.voices]
        voices += [{"id": name, "name": f"{name} ({v.name})", "language": v.language, "speaker": v.name}
                   for name, v in self.mapped.items()]
        return voices
