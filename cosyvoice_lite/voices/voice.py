"""A voice is data: everything that conditions synthesis besides the text, handed down to the model unchanged.

A built-in speaker of CosyVoice-300M-SFT is a Voice with one speaker embedding for the LLM and the flow. A cloned
voice (zero-shot) adds its reference clip's transcript tokens, speech tokens and mel, which the LLM and the flow read
as a prompt; without a transcript it is cross-lingual (the LLM gets the embedding only, the flow the whole prompt).
An instruction (CosyVoice-300M-Instruct) is a Voice derived from a speaker: the instruction's tokens are the LLM's
prompt text and the LLM gets no embedding. The arrays are numpy (float32 features, int32 tokens), so the offline
voice and a voice store need no torch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np

# how a Voice came to be: a speaker of the checkpoint, made from a reference clip, or a speaker with an instruction
BUILTIN, CLONED, INSTRUCTED = "builtin", "cloned", "instructed"


def _ints(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32).reshape(-1)


@dataclass(frozen=True, eq=False)
class Voice:
    id: str                                   # stable id: the model's speaker id ('中文女') or 'voice_...'
    name: str                                 # readable name, e.g. 'zh-female'
    language: str = "und"                     # BCP-47-ish tag: 'zh', 'en', 'ja', 'yue', 'ko', 'und'
    engine: str = "cosyvoice"
    kind: str = BUILTIN
    llm_embedding: np.ndarray | None = None   # (1, D) speaker embedding the LLM reads; None: no speaker slot
    flow_embedding: np.ndarray | None = None  # (1, D) speaker embedding the flow reads
    prompt_text: np.ndarray = field(default_factory=lambda: _ints([]))    # (Lp,) text tokens of the prompt
    prompt_speech: np.ndarray = field(default_factory=lambda: _ints([]))  # (Np,) speech tokens of the clip, 50 Hz
    prompt_mel: np.ndarray | None = None      # (Fp, 80) mel of the clip at the model's rate, or None

    def __post_init__(self):
        for name in ("llm_embedding", "flow_embedding", "prompt_mel"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.ascontiguousarray(value, dtype=np.float32))
        object.__setattr__(self, "prompt_text", _ints(self.prompt_text))
        object.__setattr__(self, "prompt_speech", _ints(self.prompt_speech))

    @property
    def llm_prompt_speech(self) -> np.ndarray:
        """The clip's speech tokens continue the LLM's prompt only with their transcript (zero-shot); a clip without
        one (cross-lingual) conditions the flow alone."""
        return self.prompt_speech if self.prompt_text.size and self.kind == CLONED else _ints([])

    @property
    def fingerprint(self) -> str:
        """sha256 of everything that conditions synthesis (not of the names): the audio cache keys by it."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            h = hashlib.sha256(f"voice-1\n{self.engine}\n{self.kind}\n".encode())
            if self.llm_embedding is None and self.flow_embedding is None and self.prompt_mel is None:
                h.update(self.id.encode())  # an engine's own voice (the offline voice): its id is all there is
            for name in ("llm_embedding", "flow_embedding", "prompt_text", "prompt_speech", "prompt_mel"):
                value = getattr(self, name)
                h.update(f"\n{name}:".encode())
                if value is not None:
                    h.update(str(value.shape).encode() + value.tobytes())
            cached = h.hexdigest()
            object.__setattr__(self, "_fingerprint", cached)
        return cached

    def instructed(self, instruction_tokens) -> "Voice":
        """This speaker told how to speak (CosyVoice-300M-Instruct): the instruction is the LLM's prompt text, the
        LLM gets no speaker embedding (the flow keeps it)."""
        return replace(self, kind=INSTRUCTED, llm_embedding=None, prompt_text=_ints(instruction_tokens),
                       prompt_speech=_ints([]), prompt_mel=None)

    def __repr__(self) -> str:
        return f"Voice({self.id!r}, {self.name!r}, {self.kind}, {self.fingerprint[:12]})"


def builtin_voices(speakers: dict, aliases: dict | None = None, engine: str = "cosyvoice") -> list[Voice]:
    """Voices of a checkpoint's speakers ({id: (1, D) embedding}, e.g. spk2info.pt); ``aliases`` maps an id to
    (readable name, language)."""
    aliases = aliases or {}
    voices = []
    for sid, embedding in speakers.items():
        name, language = aliases.get(sid, (sid, "und"))
        array = np.asarray(embedding.detach().cpu().numpy() if hasattr(embedding, "detach") else embedding,
                           dtype=np.float32).reshape(1, -1)
        voices.append(Voice(sid, name, language, engine, BUILTIN, llm_embedding=array, flow_embedding=array))
    return voices
