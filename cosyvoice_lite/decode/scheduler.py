"""One worker thread that runs every synthesis of the process: batched LLM steps, streamed flow + HiFT chunks.

All torch work happens on this one thread, so concurrent requests never fight over the cores with two thread pools
(oversubscribed OpenMP pools slow down by an order of magnitude). The loop alternates between

- vocoding: when a request has enough tokens for its next chunk (or its LLM has finished a segment), the flow and
  HiFT turn them into audio; among several such requests the one whose listener is closest to running out of
  audio goes first;
- decoding: otherwise one LLM step advances every decoding request by one token, in one batch (the linear layers
  read their weights once for all of them; in exact mode each sequence is stepped on its own).

A request speaks text segments in a Voice (a built-in speaker, a cloned or an instructed voice: the LLM and every flow
chunk get the voice's prompt), or converts given speech tokens into a voice (voice conversion: no LLM, the source
tokens are streamed through the flow and HiFT in the same chunks).

Each request has its own torch.Generator (seeded when a seed is given), so concurrent requests do not disturb each
other's random draws.

The chunk sizes follow the official schedule, except for an unseeded request in a mode with ``adaptive_hops`` while
the scheduler keeps up with real time (its recent work, r seconds per second of audio, took less time than the audio
it made): its hops then grow from the first one by up to 0.9/r per chunk (1.2, 1.5 or 2), so that each chunk is
ready before the listener has played the previous one (decode/streaming.py). A seeded request keeps the official
schedule, so that its audio does not depend on how fast the machine was.
"""
from __future__ import annotations

import atexit
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Deque, Dict, Iterator, List, Optional

import numpy as np
import torch

from ..cancel import DONE, Cancelled, reason, results
from ..forks import PerProcess
from ..memory import release_compute_threads, release_free_memory
from ..model.cosyvoice import llm_conditioning
from .lm_decoder import LMDecoder, Sequence
from ..voices import Voice
from .streaming import TokenStream

log = logging.getLogger(__name__)

# LLM steps a due chunk may wait for other requests to reach a chunk of the same size, so that the flow runs them
# as one batch: requests that arrive a few tokens apart would otherwise never be due at the same step.
JOIN_LAG = 6

# Weight of the past in the measured speed, per chunk: the last dozen or so chunks count.
SPEED_DECAY = 0.9
# Hop growth at a measured speed of r < 1 seconds of work per second of audio: the largest of GROWTH_STEPS that is at
# most GROWTH_MARGIN / r (at least the first). A chunk that grows by 1/r takes as long to make as its predecessor
# lasts; the margin covers each chunk's fixed costs and the speed's noise. Simulated against the official hops with
# the stages' measured speeds, this leaves the least silence from r = 0.5 to 0.95 (docs/performance.md). A few
# steps rather than any factor: requests that start together at slightly different measured speeds keep chunks of
# equal sizes, which share their flow passes.
GROWTH_MARGIN = 0.9
GROWTH_STEPS = (1.2, 1.5, 2.0)

# Yielded after the last chunk of each segment when submit(..., segment_ends=True): lets a caller cut the audio
# into segments (the audio cache stores them one by one).
SEGMENT_END = object()


@dataclass(eq=False)
class Request:
    segments: List[torch.Tensor]             # text tokens (1, L) per segment, in order
    voice: Voice
    speed: float
    cancel: object                           # CancelToken, threading.Event or None
    generator: torch.Generator
    sampling: Dict                           # LLM overrides (min/max_token_text_ratio, sampling)
    segment_ends: bool = False               # put SEGMENT_END after each segment's last chunk
    seeded: bool = False                     # a seed was given: the official chunk sizes, whatever the speed
    conversion: bool = False                 # voice conversion: one stream of given tokens, no LLM
    out: "queue.SimpleQueue" = field(default_factory=queue.SimpleQueue)
    submitted: float = field(default_factory=time.monotonic)
    # worker-side state
    next_segment: int = 0
    seq: Optional[Sequence] = None
    streams: Deque[list] = field(default_factory=collections.deque)  # [TokenStream, llm_done] oldest first
    audio_samples: int = 0
    waited: int = 0                          # LLM steps its due chunk has waited for equal chunks of others
    abandoned: bool = False

    def cancelled(self) -> bool:
        return self.abandoned or (self.cancel is not None and self.cancel.is_set())

    def error(self) -> Cancelled:
        return Cancelled(reason(self.cancel))


class Scheduler:
    def __init__(self, model, max_batch: int = 4, first_hop: Optional[int] = None,
                 n_timesteps: Optional[int] = None):
        self.model = model
        self.decoder = LMDecoder.for_model(model)
        self.max_batch = max_batch
        self.first_hop = first_hop
        self.n_timesteps = n_timesteps or model.n_timesteps
        self._worker = PerProcess(self._start_worker)
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._inbox: Deque[Request] = collections.deque()
        self._tasks: Deque = collections.deque()  # (fn, out, cancel) to run on this thread between units
        self._active: List[Request] = []
        self._working = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.trace = None  # callable(event: str, seconds: float, **info) for benchmarks, or None
        # LLM overrides for every request: benchmarks on random weights (which never end a sentence) force lengths
        self.sampling: Dict = {}
        # seconds of work and of audio made lately (decayed sums): their ratio is the measured speed
        self._work_s = 0.0
        self._audio_s = 0.0
        self._unbilled_s = 0.0  # LLM steps since the last chunk

    # ---- client side -------------------------------------------------------------------------------------
    def submit(self, segments: List, voice: Voice, speed: float = 1.0, cancel: Optional[threading.Event] = None,
               seed: Optional[int] = None, segment_ends: bool = False, **sampling) -> Iterator[np.ndarray]:
        """Yield float32 waveform chunks (model sample rate) for the text-token segments, in order (and
        SEGMENT_END after each segment when `segment_ends`); raises Cancelled when `cancel` is set. Closing the
        iterator early stops the work too. The first segment streams with the first-chunk rules (short first
        hop, the mode's first join), the others with the regular ones."""
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2 ** 62, (1,)).item()))
        request = Request([torch.as_tensor(s, dtype=torch.int64).reshape(1, -1) for s in segments], voice,
                          speed, cancel, generator, {**self.sampling, **sampling}, segment_ends, seed is not None)
        return self._results(request)

    def submit_conversion(self, source_tokens, voice: Voice, speed: float = 1.0,
                          cancel: Optional[threading.Event] = None, seed: Optional[int] = None,
                          segment_ends: bool = False) -> Iterator[np.ndarray]:
        """Voice conversion: yield float32 waveform chunks of the speech tokens of a source clip (50 Hz, from the
        speech tokenizer) said in `voice`, whose reference clip is the flow's prompt (a cloned voice). Streamed in
        chunks like synthesis (first-chunk rules, then hops while enough tokens are left, then the rest); raises
        Cancelled when `cancel` is set."""
        if voice.prompt_mel is None or not voice.prompt_speech.size:
            raise ValueError(f"voice conversion needs a voice with a reference clip; {voice.id!r} has none")
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2 ** 62, (1,)).item()))
        request = Request([], voice, speed, cancel, generator, {}, segment_ends, seed is not None, conversion=True)
        mode = self.model.mode
        stream = TokenStream(self.model, voice, self.n_timesteps, speed, generator, first_hop=self.first_hop,
                             stop=request.cancelled, first_overlap=mode.first_overlap, first_cache=mode.first_cache,
                             hop_growth=self._hop_growth(request))
        for token in np.asarray(source_tokens).reshape(-1).tolist():
            stream.push(int(token))
        request.streams.append([stream, not stream.ready()])  # no more tokens will come: done once not ready
        return self._results(request)

    def _results(self, request: Request) -> Iterator[np.ndarray]:
        """Queue the request (at the first next(), so an iterator never used costs nothing) and yield its audio."""
        self._ensure_worker()
        with self._lock:
            self._inbox.append(request)
            self._wakeup.notify()
        try:
            yield from results(request.out, request.cancel)
        finally:
            request.abandoned = True  # no-op when finished; stops the worker's work otherwise

    def call(self, fn, cancel=None):
        """Run ``fn()`` on the scheduler's thread, between two units of synthesis work, and return its result (or
        raise its error). Torch work of the service besides synthesis (making a voice) goes here, so that one pool
        of compute threads exists: a second one on the same cores slows both by an order of magnitude."""
        self._ensure_worker()
        out: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._tasks.append((fn, out, cancel))
            self._wakeup.notify()
        values = list(results(out, cancel))
        return values[0] if values else None

    @property
    def realtime_factor(self) -> Optional[float]:
        """Seconds of work per second of audio over the last chunks of every request (None before the first)."""
        return self._work_s / self._audio_s if self._audio_s else None

    def keeps_up(self) -> bool:
        """Whether the recent work made audio faster than it plays."""
        factor = self.realtime_factor
        return factor is not None and factor < 1.0

    @property
    def busy(self) -> int:
        return len(self._inbox) + len(self._active)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no request is queued or in progress (abandoned ones finish their current chunk first)."""
        deadline = time.monotonic() + timeout
        while self.busy or self._working:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after its current unit of work (torch must not be busy while the interpreter exits)."""
        with self._lock:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- worker ------------------------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        """Start the worker in this process (again after a fork: threads do not survive one)."""
        self._worker.get()

    def _start_worker(self) -> threading.Thread:
        # fresh primitives: the ones inherited across a fork may be in any state
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._inbox, self._active = collections.deque(), []
        self._tasks: Deque = collections.deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="cosyvoice-scheduler", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        return self._thread

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._working = False
                if not self._inbox and not self._active and not self._tasks and not self._stopping:
                    self.decoder.release_idle()  # what a long request grew
                    release_compute_threads()  # idle: another thread may run torch meanwhile (tools, benchmarks)
                while not self._inbox and not self._active and not self._tasks and not self._stopping:
                    self._wakeup.wait()
                if self._stopping:
                    return
                while self._inbox and len(self._active) < self.max_batch:
                    self._active.append(self._inbox.popleft())
                task = self._tasks.popleft() if self._tasks else None
                self._working = True
            if task is not None:  # one task between two units of work: listeners wait for it once, not for a queue
                self._run_task(*task)
            for request in [r for r in self._active if r.cancelled()]:
                self._finish(request, request.error())
            if not self._active:
                continue
            try:
                with torch.inference_mode():
                    self._work()
            except Exception as error:  # a bug must fail the requests, not kill the worker
                log.exception("synthesis failed")
                for request in list(self._active):
                    self._finish(request, error)

    @staticmethod
    def _run_task(fn, out: "queue.SimpleQueue", cancel) -> None:
        if cancel is not None and cancel.is_set():
            out.put(Cancelled(reason(cancel)))
            return
        try:
            with torch.inference_mode():
                out.put(fn())
            out.put(DONE)
        except BaseException as error:  # handed to the caller
            out.put(error)

    def _finish(self, request: Request, error: Optional[BaseException] = None) -> None:
        if request in self._active:
            self._active.remove(request)
        request.out.put(error if error is not None else DONE)

    def _work(self) -> None:
        """One unit of work: a vocoder chunk if one is due, else one LLM step for every decoding request."""
        for request in list(self._active):
            if request.seq is None and not request.streams:
                self._start_segment(request)
        due = [r for r in self._active if self._vocodable(r)]
        if due:
            now = time.monotonic()
            # the listener with the least audio in hand (audio sent minus time waited) goes first
            request = min(due, key=lambda r: r.audio_samples / self.model.sample_rate - (now - r.submitted))
            group = [request]
            key = self._chunk_key(request)
            if self.model.mode.batched:  # equal chunks of other requests share the flow pass
                group += [r for r in due if r is not request and self._chunk_key(r) == key][:self.max_batch - 1]
                if (len(group) < self.max_batch and request.waited < JOIN_LAG
                        and self._catching_up(key, exclude=group)):
                    request.waited += 1
                    self._step()
                    return
            request.waited = 0
            try:
                started = time.perf_counter()
                self._vocode(group)
                release_free_memory()  # a chunk frees its large tensors: give the pages back before the next one
                if self.trace:
                    self.trace("vocode", time.perf_counter() - started, batch=len(group))
            except Cancelled:
                for r in group:
                    self._finish(r, r.error())
            except Exception as error:
                log.exception("vocoding failed")
                for r in group:
                    self._finish(r, error)
            return
        self._step()

    def _measure(self, vocode_s: float, samples: int) -> None:
        """Add a chunk's work (its flow and HiFT, and the LLM steps since the previous chunk) to the measured speed."""
        self._work_s = SPEED_DECAY * self._work_s + self._unbilled_s + vocode_s
        self._audio_s = SPEED_DECAY * self._audio_s + samples / self.model.sample_rate
        self._unbilled_s = 0.0

    def _catching_up(self, key: tuple, exclude: List[Request]) -> bool:
        """Whether another request decoding its first stream is at most JOIN_LAG tokens short of a chunk of the
        same (non-final) size."""
        final, size, prompt_frames = key
        if final:
            return False
        for r in self._active:
            if r in exclude or r.seq is None or len(r.streams) != 1:
                continue
            stream = r.streams[0][0]
            if (stream.hop + stream.overlap == size and stream.prompt_frames == prompt_frames
                    and 0 < size - len(stream.tokens) <= JOIN_LAG):
                return True
        return False

    def _step(self) -> None:
        """One LLM step for every decoding request, in one batch."""
        decoding = [r for r in self._active if r.seq is not None]
        if not decoding:
            return
        started = time.perf_counter()
        tokens = self.decoder.step([r.seq for r in decoding])
        took = time.perf_counter() - started
        self._unbilled_s += took
        if self.trace:
            self.trace("llm", took, batch=len(decoding))
        for request, token in zip(decoding, tokens):
            stream = request.streams[-1]
            if token is not None:
                stream[0].push(token)
            if request.seq.finished:
                stream[1] = True
                request.seq = None
                self._start_segment(request)

    def _start_segment(self, request: Request) -> None:
        """Begin decoding the request's next segment (if any) with a fresh stream."""
        if request.next_segment >= len(request.segments):
            if not request.streams and request.seq is None:
                self._finish(request)
            return
        text = request.segments[request.next_segment]
        first = request.next_segment == 0
        request.next_segment += 1
        request.seq = self.decoder.start(text, **llm_conditioning(request.voice), generator=request.generator,
                                         **request.sampling)
        mode = self.model.mode
        joins = {"first_overlap": mode.first_overlap, "first_cache": mode.first_cache} if first else {}
        stream = TokenStream(self.model, request.voice, self.n_timesteps, request.speed, request.generator,
                             first_hop=self.first_hop if first else None, stop=request.cancelled,
                             hop_growth=self._hop_growth(request), **joins)
        request.streams.append([stream, False])

    def _hop_growth(self, request: Request) -> float:
        """The hop growth of a request's next stream (0: the official hops)."""
        if not self.model.mode.adaptive_hops or request.seeded or not self.keeps_up():
            return 0.0
        allowed = GROWTH_MARGIN / self.realtime_factor
        return max([step for step in GROWTH_STEPS if step <= allowed], default=GROWTH_STEPS[0])

    @staticmethod
    def _vocodable(request: Request) -> bool:
        if not request.streams:
            return False
        stream, llm_done = request.streams[0]
        return llm_done or stream.ready()

    @staticmethod
    def _chunk_key(request: Request) -> tuple:
        """(final, tokens, prompt frames) of the request's next chunk: chunks with equal keys can share one flow
        batch."""
        stream, llm_done = request.streams[0]
        return llm_done, stream.next_chunk_size(final=llm_done), stream.prompt_frames

    def _vocode(self, group: List[Request]) -> None:
        """The next chunk of each request in `group` (one request, or several with equal chunks)."""
        started = time.perf_counter()
        final = group[0].streams[0][1]
        wavs = TokenStream.chunk_many([r.streams[0][0] for r in group], final=final)
        self._measure(time.perf_counter() - started, sum(wav.numel() for wav in wavs))  # before a listener hears
        for request, wav in zip(group, wavs):
            if final:
                request.streams.popleft()
            elif request.conversion and not request.streams[0][0].ready():
                request.streams[0][1] = True  # the rest of the source tokens is the last chunk
            if wav.numel():
                request.audio_samples += wav.numel()
                request.out.put(wav[0].numpy().astype(np.float32, copy=False))
            if final and request.segment_ends:
                request.out.put(SEGMENT_END)
            if not request.streams and request.seq is None and request.next_segment >= len(request.segments):
                self._finish(request)
