"""CosyVoice-300M-SFT as an engine: text frontend -> token ids -> the scheduler (batched LLM steps, streamed flow
and HiFT chunks) -> 24 kHz audio."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..audio import Resampler
from ..backends import accelerate, describe, external_paths, runtime_plan
from ..decode.scheduler import SEGMENT_END as SCHEDULER_SEGMENT_END
from ..decode.scheduler import Scheduler
from ..frontend import NothingToSpeak, TextFrontend
from ..memory import configure_process, release_compute_threads, release_free_memory
from ..model import ModelLoadError, load_model
from ..model.fingerprint import model_fingerprint
from ..model.modes import mode_settings
from ..frontend.onnx_models import SPEAKER_ENCODER_FILE, TOKENIZER_FILE
from ..frontend.prompt_audio import Clip, PromptAudioError, clip_of
from ..voices import Voice, builtin_voices
from ..voices.clone import VoiceMaker, instruct_voice, with_end_marker
from .base import OUTPUT_RATE, SEGMENT_END, Engine, Offers, Plan, Segment, SynthesisError

# Speech tokens in the first streamed chunk of a request besides its overlap (then 100, growing to 200). TokenStream
# raises it to the smallest hop that leaves HiFT enough frames.
FIRST_HOP = 1


# Readable aliases and languages for the speaker ids that CosyVoice-300M-SFT ships.
COSYVOICE_SPEAKERS = {
    "中文女": ("zh-female", "zh"),
    "中文男": ("zh-male", "zh"),
    "日语男": ("ja-male", "ja"),
    "粤语女": ("yue-female", "yue"),
    "英文女": ("en-female", "en"),
    "英文男": ("en-male", "en"),
    "韩语女": ("ko-female", "ko"),
}


class CosyVoiceEngine(Engine):
    """CosyVoice-300M-SFT on the CPU, streamed: each text segment goes LLM -> flow -> HiFT in chunks (official v1
    streaming: the first audio comes after a few dozen speech tokens, not at the end of the segment), resampled
    22050 -> 24000 Hz with one continuous soxr stream per segment (no seams between chunks; a segment's audio
    does not depend on its neighbours, so the audio cache can store and serve it alone).

    ``mode`` is a mode of ``cosyvoice_lite.model.modes`` ('exact', 'default', 'fast'; None -> 'default').
    Concurrent ``synthesize`` calls (one per request thread) go straight to one scheduler thread that decodes
    ``max_batch`` of them side by side, the rest wait.
    """

    name = "cosyvoice"

    def __init__(self, model_dir, n_timesteps: int | None = None, mode: str | None = None, max_batch: int = 4,
                 first_hop: int | None = FIRST_HOP, threads: int | None = None, backend: str = "auto",
                 cache_root: str | None = None, defer_backend: bool = False, kind: str = "auto",
                 keep_voice_models: bool = False, tiktoken_file: str | None = None, wetext_fsts: str | None = None):
        """``defer_backend``: compile the OpenVINO stages at the first synthesis or warm-up, in the process that
        serves, not here (the service: gunicorn loads the model in its master and forks the workers, and
        OpenVINO's thread pool does not survive a fork: a worker would run the compiled stages on one core)."""
        configure_process(threads)
        self.mode = mode_settings(mode)
        self.model_dir = model_dir
        self.first_hop = first_hop
        self._identity: str | None = None
        # one plan for the whole model: what OpenVINO runs is built float32 and left unread, the rest in the mode
        self._stages = runtime_plan(self.mode, backend)
        self.model = load_model(model_dir, mode=self.mode.name, external=external_paths(self._stages))
        release_free_memory()  # loading frees much more than it keeps (the backend trims after each stage)
        # backend: 'auto' | 'openvino' | 'torch' (backends.plan); cache_root: where compiled models are kept
        self._backend = {"backend": backend, "cache_root": cache_root, "threads": torch.get_num_threads()}
        self._backend_lock = threading.Lock()
        self._backend_ready = False
        self.runtime = describe(self._stages)  # the plan, until the stages are compiled
        # tiktoken_file / wetext_fsts: the frontend's data in place of what its packages ship (settings.py)
        self.frontend = TextFrontend(fst_dir=wetext_fsts or None, vocab_path=tiktoken_file or None)
        self.n_timesteps = n_timesteps or self.mode.n_timesteps
        self.max_batch = max(1, max_batch)
        self.scheduler = Scheduler(self.model, max_batch=self.max_batch, first_hop=first_hop,
                                   n_timesteps=self.n_timesteps)
        self._voices = builtin_voices(self.model.speakers, COSYVOICE_SPEAKERS)
        # the speech tokenizer and speaker encoder: opened to make a voice, closed after unless kept
        self._voice_maker = VoiceMaker(model_dir, self.model.sample_rate, keep_loaded=keep_voice_models)
        self.offers = recognise(model_dir, kind, bool(self._voices), self._voice_maker.available)
        if not self.offers.speakers and not self.offers.cloning:
            raise ModelLoadError(f"{model_dir} has no spk2info.pt (built-in speakers) and no {SPEAKER_ENCODER_FILE} "
                                 f"and {TOKENIZER_FILE} to make a voice with: no voice could speak with it; fetch "
                                 "the missing files (scripts/download_model.py --model base)")
        if not self.offers.speakers:
            self.hint = ("this model has no built-in speakers: make a voice from a reference clip (POST "
                         "/v1/audio/voices, or on the web page) and speak with it")
        self.model_id = {"base": "cosyvoice-300m", "sft": "cosyvoice-300m-sft",
                         "instruct": "cosyvoice-300m-instruct"}[self.offers.kind]
        if not defer_backend:
            self.prepare()
        release_compute_threads()  # synthesis runs on the scheduler's thread, not on this one

    @property
    def description(self) -> str:
        return f"{self.model_id} from {self.model_dir} ({self.mode.name} mode, {self.runtime['backend']})"

    def prepare(self) -> None:
        """Compile the stages the plan gives to the execution backend (once; callers wait for it)."""
        with self._backend_lock:
            if self._backend_ready:
                return
            self.runtime = accelerate(self.model, self.mode, self.model_dir, stages=self._stages, **self._backend)
            self._identity = None  # the cache key names what runs where
            self._backend_ready = True

    def warmup(self):
        self.prepare()
        return super().warmup()

    def voices(self):
        return self._voices

    def warmup_voice(self) -> Voice:
        if self._voices:
            return super().warmup_voice()
        # no speaker of its own (the base model): a neutral voice (zero embedding) runs the same networks as any
        zeros = np.zeros((1, self.model.flow.spk_embed_affine_layer.in_features), dtype=np.float32)
        return Voice("warm-up", "warm-up", llm_embedding=zeros, flow_embedding=zeros)

    @property
    def precision(self) -> str:
        """The arithmetic and runtime of each network: the mode's, and what the backend chose for this CPU (bf16 or
        float32 OpenVINO, PyTorch), with the runtime's version, since each of them rounds differently."""
        m = self.mode
        chosen = ",".join(f"{name}={stage}" for name, stage in self.runtime.get("stages", {}).items())
        return f"llm={m.llm},flow={m.flow},hift={m.hift};{chosen};openvino={self.runtime.get('openvino')}"

    def identity(self) -> str:
        """Model (hash of the checkpoint files, not the path), mode, precision, Euler steps and streaming rules:
        what besides voice, tempo, position and text tokens decides a segment's audio."""
        if self._identity is None:
            m = self.mode
            parts = {"engine": self.name, "model": model_fingerprint(self.model_dir), "mode": m.name,
                     "precision": self.precision, "steps": self.n_timesteps, "first_hop": self.first_hop,
                     "first_join": f"{m.first_overlap}/{m.first_cache}", "rate": OUTPUT_RATE}
            self._identity = ";".join(f"{k}={v}" for k, v in parts.items())
        return self._identity

    @property
    def busy(self) -> int:
        return self.scheduler.busy

    @property
    def realtime_factor(self) -> float | None:
        return self.scheduler.realtime_factor

    def plan(self, text: str, normalize: bool = True) -> Plan:
        """Text tokens per segment, and the audio the LLM's length limits allow for them (EOS cannot come before
        min_token_text_ratio x tokens, decoding stops at max_token_text_ratio x tokens)."""
        try:
            pieces = self.frontend.segments_or_raise(text, normalize)
        except NothingToSpeak as error:
            raise SynthesisError(str(error)) from None
        segments = tuple(Segment(piece, tuple(int(t) for t in tokens))
                         for piece, tokens in ((p, self.frontend.tokenize(p)) for p in pieces) if len(tokens))
        if not segments:
            raise SynthesisError("nothing to speak")
        limits = [self.model.llm.length_limits(len(s.tokens)) for s in segments]
        rate = self.model.token_rate
        return Plan(units=sum(len(s.tokens) for s in segments), segments=segments,
                    min_audio_s=sum(lo for lo, _ in limits) / rate, max_audio_s=sum(hi for _, hi in limits) / rate)

    def _synthesize(self, segments, voice, speed, cancel, seed) -> Iterator:
        self.prepare()  # a request that comes before the warm-up waits for the compiled stages
        chunks = self.scheduler.submit([list(s.tokens) for s in segments], voice, speed=speed, cancel=cancel,
                                       seed=seed, segment_ends=True)
        yield from self._resampled(chunks)

    def _resampled(self, chunks) -> Iterator:
        """The scheduler's chunks at OUTPUT_RATE, one continuous resampler per segment (no seams)."""
        resampler = Resampler(self.model.sample_rate, OUTPUT_RATE)
        try:
            for wav in chunks:
                if wav is SCHEDULER_SEGMENT_END:
                    tail = resampler.flush()
                    if tail.size:
                        yield tail
                    yield SEGMENT_END
                    resampler = Resampler(self.model.sample_rate, OUTPUT_RATE)
                    continue
                chunk = resampler.process(wav)
                if chunk.size:
                    yield chunk
        finally:
            chunks.close()

    # ---- voices of one's own ------------------------------------------------------------------------------
    # The clip is checked here, so that unusable audio is refused at once; the two ONNX networks run on the
    # scheduler's thread (one pool of compute threads), between units of synthesis.
    def make_voice(self, samples, rate, transcript, name, voice_id):
        self.prepare()
        tokens = self.frontend.tokenize(self.frontend.normalize(transcript)) if transcript else []
        clip = self._checked(samples, rate)
        return self.scheduler.call(lambda: self._voice_maker.make_voice(clip, tokens, name=name or voice_id,
                                                                       voice_id=voice_id))

    def instructed(self, voice, instructions):
        tokens = self.frontend.tokenize(with_end_marker(self.frontend.normalize(instructions)))
        return instruct_voice(voice, tokens)

    def convert(self, samples, rate, voice, cancel=None, seed=None):
        self.prepare()
        clip = self._checked(samples, rate)
        tokens = self.scheduler.call(lambda: self._voice_maker.source_tokens(clip))
        chunks = self.scheduler.submit_conversion(tokens, voice, cancel=cancel, seed=seed, segment_ends=True)
        yield from self._resampled(chunks)

    @staticmethod
    def _checked(samples, rate) -> Clip:
        try:
            return clip_of(samples, rate)
        except PromptAudioError as e:
            raise ValueError(str(e)) from None


def recognise(model_dir, kind: str, has_speakers: bool, has_voice_models: bool) -> Offers:
    """What a CosyVoice-300M directory offers. Its kind (MODEL_KIND, else: no speakers -> the base model;
    'instruct' in the directory's name -> -Instruct; else -SFT) and the two ONNX networks decide: cloning and
    conversion need the speech tokenizer and the speaker encoder; instructions, the Instruct model."""
    if kind == "auto":
        name = Path(model_dir).resolve().name.lower()
        kind = "base" if not has_speakers else "instruct" if "instruct" in name else "sft"
    return Offers(kind=kind, speakers=has_speakers, cloning=has_voice_models and kind != "instruct",
                  instructions=kind == "instruct", conversion=has_voice_models)
