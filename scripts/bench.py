#!/usr/bin/env python3
"""Speed, memory and quality of the CosyVoice-300M-SFT path on this machine, per speed mode (exact, default, fast).

    python scripts/bench.py                          # full-size architecture, random weights (no download)
    python scripts/bench.py --quick                  # ~3 s utterance, default + fast only, no quality: ~2 min
    python scripts/bench.py --model-dir models/CosyVoice-300M-SFT
    python scripts/bench.py --quality --json         # + error figures; last line: one JSON object
    python scripts/bench.py --isa avx2               # as on a CPU with AVX2 only (kernels capped, plan follows)

Without --model-dir a full-size model with random weights is written once to the temp directory (1.7 GB) and
loaded from there, so that load time and memory are those of a real model directory. Random weights never emit
end-of-speech, so the LLM is forced to decode exactly ``seconds * 50`` tokens, the work a trained model does for an
utterance of that length. Every mode runs in a fresh process (its peak RSS is that of a serving process: model,
engine, one utterance, streaming, 4 concurrent requests). Times are wall clock on ``--threads`` threads; on a busy
machine they vary, so compare runs made back to back.

Figures: LLM ms/token (one sequence; also on one thread: the LLM with a core of its own), silence in a 20 s stream
(a listener who starts playing the first chunk as it arrives: the sum of the waits after the audio in hand ran
out), flow and HiFT seconds per audio second (the whole utterance at once),
RTF = synthesis seconds / audio seconds for the whole utterance at once (LLM, then flow, then HiFT: how the issue
measured the official code); streamed RTF = the same utterance through the engine (chunked flow and HiFT, as the
service runs it); first audio = seconds from the engine call to its first streamed chunk for a two-sentence text;
concurrent speedup = audio per second with 4 concurrent requests over audio per second with the same 4 requests
one after another (scripts/workload.py: seeded, so both runs decode the same tokens; scripts/bench_http.py sends the
same requests over HTTP). The whole-utterance figures are the median of ``--repeat`` runs (3), with their range.
Zero-shot rows (the streamed modes): the same texts and lengths with a voice cloned from a ``--prompt-seconds`` clip
(5 s) instead of a built-in speaker: its transcript and speech tokens prefix the LLM, its mel is the flow's prompt
in every chunk. "make a voice" times POST /v1/audio/voices' work for a 10 s clip (speech tokenizer and speaker
encoder loaded, run, released) where the model directory has the two ONNX files (``--voice-models DIR`` links them
into the random model). Peak RSS (serving) is taken after the engine tests (load, streaming, 4 concurrent requests), before the one-shot
whole-utterance test, which holds the whole utterance's activations at once.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TEXT = "希望你以后能够做得比我还好哟。今天天气很好，我们一起去公园散步吧。"
STREAM_TEXT = "Hello, and welcome to the show. Today we talk about speech synthesis on small computers."
RTF_TEXT = "今天天气很好，我们一起去公园散步吧。"  # the streamed-RTF utterance (its length is forced)
PROMPT_TEXT = "希望你以后能够做得比我还好哟，今天我们一起来聊一聊。"  # the cloned voice's transcript (~5 s of speech)
GOLDEN = ROOT / "tests" / "golden"
GOLDEN_MODES = ROOT / "tests" / "golden-modes"
# --isa: every library that picks its kernels by CPU feature, capped as on a CPU that has only that ISA: oneDNN (in
# PyTorch and in OpenVINO), OpenVINO's own kernels (capping oneDNN alone makes them disagree, and crash), ATen's
# vectorised ops, fbgemm's int8, MKL's GEMM
ISA_LIMITS = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "OV_CPU_MAX_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                       "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
STAGE_KEYS = ("llm_ms_per_token", "flow_s_per_audio_s", "hift_s_per_audio_s", "rtf")  # --repeat reports a range


def cpu_generation() -> str | None:
    """x86 'cpu family'/'model' numbers: VMs often report a bare "AMD EPYC", and the generation behind it (AMD
    family 25 = Zen 3/4, 26 = Zen 5) moves every figure here."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in ("cpu family", "model") and key.strip() not in fields:
                    fields[key.strip()] = value.strip()
                if not line.strip():
                    break
    except OSError:
        return None
    return f"family {fields['cpu family']} model {fields['model']}" if len(fields) == 2 else None


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: getrusage's ru_maxrss survives exec, so a child started by a
    parent that grew large would report the parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class OtherLoad:
    """Share of the machine's CPU time used by other processes while this one ran (Linux /proc/stat): timings
    taken while it is high are not comparable."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return sum(ticks), ticks[3] + ticks[4], usage.ru_utime + usage.ru_stime

    def share(self):
        end = self._sample()
        if self.start is None or end is None:
            return None
        total, idle, own = (b - a for a, b in zip(self.start, end))
        hz = os.sysconf("SC_CLK_TCK")
        return max(0.0, (total - idle - own * hz) / total) if total else None


# --- one mode, in its own process ----------------------------------------------------------------------------

def forced(n_tokens: int, text_len: int) -> dict:
    ratio = (n_tokens + 0.5) / text_len  # min_len = max_len = n_tokens
    return {"min_token_text_ratio": ratio, "max_token_text_ratio": ratio}


def bench_stages(model, text_token, speaker: str, n_tokens: int) -> dict:
    import torch

    from cosyvoice_lite.decode.reference import text_to_tokens

    seconds = n_tokens / model.token_rate
    torch.manual_seed(0)
    start = started = time.perf_counter()
    first_token_at = None
    tokens = []
    for token in text_to_tokens(model, text_token, speaker, **forced(n_tokens, len(text_token))):
        if first_token_at is None:
            first_token_at = time.perf_counter()
        tokens.append(token)
    llm_s = time.perf_counter() - start
    start = time.perf_counter()
    mel = model.tokens_to_mel(tokens, speaker)
    flow_s = time.perf_counter() - start
    start = time.perf_counter()
    wav = model.mel_to_wav(mel)
    hift_s = time.perf_counter() - start
    audio_s = wav.shape[1] / model.sample_rate
    return {
        "audio_s": audio_s, "tokens": len(tokens), "llm_s": llm_s, "llm_first_token_s": first_token_at - started,
        "llm_ms_per_token": 1000 * llm_s / len(tokens), "flow_s": flow_s, "flow_s_per_audio_s": flow_s / seconds,
        "hift_s": hift_s, "hift_s_per_audio_s": hift_s / seconds, "total_s": llm_s + flow_s + hift_s,
        "rtf": (llm_s + flow_s + hift_s) / audio_s,
    }


def median_of(runs) -> dict:
    """Each figure's median over the runs (the host's noise moves single runs by tens of percent), with the
    stage figures' values of every run as ``<key>_runs``."""
    runs = list(runs)
    out = {}
    for key in runs[0]:
        out[key] = statistics.median(run[key] for run in runs)
        if key in STAGE_KEYS and len(runs) > 1:
            out[f"{key}_runs"] = [run[key] for run in runs]
    return out


def bench_first_audio(engine, voice=None) -> dict:
    """Seconds from the engine call to the first chunk (and to the second) for a two-sentence text."""
    from cosyvoice_lite.audio import SAMPLE_RATE

    cancel = threading.Event()
    started = time.perf_counter()
    times, samples = [], 0
    for chunk in engine.speak(STREAM_TEXT, voice, cancel=cancel):
        times.append(time.perf_counter() - started)
        samples += chunk.size
        if len(times) == 2:
            cancel.set()  # random weights never end a sentence: stop after two chunks
            break
    engine.scheduler.wait_idle()  # the cancelled request finishes its current chunk
    return {"first_audio_s": times[0], "second_chunk_s": times[1] if len(times) > 1 else None,
            "first_chunks_audio_s": samples / SAMPLE_RATE}


def bench_stream_rtf(engine, n_tokens: int, voice=None) -> dict:
    """One utterance of n_tokens through the engine's streaming path: synthesis seconds / audio seconds."""
    text = engine.frontend.tokenize(RTF_TEXT)
    voice = voice or engine.voices()[0]
    started = time.perf_counter()
    samples = sum(wav.size for wav in engine.scheduler.submit([text], voice, seed=0, **forced(n_tokens, len(text))))
    took = time.perf_counter() - started
    return {"stream_s": took, "stream_rtf": took / (samples / engine.model.sample_rate)}


def prompt_voice(engine, seconds: float):
    """A zero-shot voice as made from a ``seconds`` reference clip: its transcript's tokens, random speech tokens
    and mel of the clip's length (random weights make any values as costly as real ones), a speaker's embedding."""
    import numpy as np

    from cosyvoice_lite.voices.voice import CLONED, Voice

    model = engine.model
    rng = np.random.default_rng(0)
    n_tokens = int(seconds * model.token_rate)
    embedding = next(iter(model.speakers.values())).numpy()
    return Voice("voice_bench", "bench", "zh", kind=CLONED, llm_embedding=embedding, flow_embedding=embedding,
                 prompt_text=engine.frontend.tokenize(PROMPT_TEXT),
                 prompt_speech=rng.integers(0, model.flow.vocab_size, n_tokens),
                 prompt_mel=rng.normal(-6.0, 2.0, (model.flow.n_frames(n_tokens), 80)))


def bench_make_voice(engine, seconds: float = 10.0) -> dict:
    """Seconds to make a voice from a ``seconds`` clip with its transcript (ONNX networks loaded, run and released,
    as the service does unless KEEP_VOICE_MODELS): needs campplus.onnx and speech_tokenizer_v1.onnx."""
    import numpy as np

    if not engine.offers.cloning:
        return {}
    rate = 16000
    t = np.arange(int(seconds * rate)) / rate
    clip = (0.3 * np.sin(2 * np.pi * 180 * t * (1 + 0.3 * np.sin(2 * np.pi * 0.5 * t)))).astype(np.float32)
    started = time.perf_counter()
    engine.make_voice(clip, rate, PROMPT_TEXT, "bench", "voice_bench10")
    return {"make_voice_s": time.perf_counter() - started, "make_voice_clip_s": seconds}


def bench_underrun(engine, seconds: float = 20.0, seed: int | None = None, speed: float = 1.0,
                   prefix: str = "underrun") -> dict:
    """A listener who starts playing the first chunk as it arrives: the seconds of silence they hear in a streamed
    utterance of ``seconds`` of speech tokens (sum of every wait for a chunk after the audio in hand ran out), and
    the longest one. ``speed`` is the tempo (0.5: twice the audio per token). Unseeded, as a listener asks by
    default, the chunk sizes follow the measured speed; a seed pins the official ones."""
    text = engine.frontend.tokenize(RTF_TEXT)
    n_tokens = int(seconds * engine.model.token_rate)
    rate = engine.model.sample_rate
    if seed is None:  # the chunk sizes follow the speed of the last dozen chunks: let it be that of such a stream
        list(engine.scheduler.submit([text], engine.voices()[0], speed=speed, **forced(n_tokens, len(text))))
    started = time.perf_counter()
    played_until = None  # wall time at which the audio received so far ends playing
    gaps = []
    for wav in engine.scheduler.submit([text], engine.voices()[0], seed=seed, speed=speed,
                                       **forced(n_tokens, len(text))):
        now = time.perf_counter()
        if played_until is None:
            played_until = now
        elif now > played_until:
            gaps.append(now - played_until)
            played_until = now
        played_until += wav.size / rate
    return {f"{prefix}_s": sum(gaps), f"{prefix}_longest_s": max(gaps, default=0.0), f"{prefix}_gaps": len(gaps),
            f"{prefix}_audio_s": seconds / speed, f"{prefix}_total_s": time.perf_counter() - started}


def bench_llm_one_thread(model, text_token, speaker: str, n_tokens: int = 200) -> dict:
    """LLM ms per token on one thread (the other core free): the step's floor when the LLM has a core of its own."""
    import torch

    from cosyvoice_lite.decode.reference import text_to_tokens

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        list(text_to_tokens(model, text_token, speaker, **forced(20, len(text_token))))  # warm-up
        started = time.perf_counter()
        tokens = list(text_to_tokens(model, text_token, speaker, **forced(n_tokens, len(text_token))))
        return {"llm_ms_per_token_1t": 1000 * (time.perf_counter() - started) / len(tokens)}
    finally:
        torch.set_num_threads(threads)


def bench_concurrency(engine, n_requests: int, text: str | None = None) -> dict:
    """Audio seconds per wall second: n_requests of scripts/workload.py (``text`` instead of its own, if given)
    through engine.synthesize (as the service's request threads call it) one after another, then all at once."""
    from workload import concurrent_request

    from cosyvoice_lite.engines.base import OUTPUT_RATE

    voices = {v.id: v for v in engine.voices()}

    def one(i, out):
        body = concurrent_request(i, list(voices))
        chunks = engine.speak(text or body["text"], voices[body["speaker"]], seed=body["seed"])
        out[i] = sum(chunk.size for chunk in chunks) / OUTPUT_RATE

    audio = {}
    started = time.perf_counter()
    for i in range(n_requests):
        one(i, audio)
    sequential_s = time.perf_counter() - started
    sequential_audio = sum(audio.values())
    audio = {}
    threads = [threading.Thread(target=one, args=(i, audio)) for i in range(n_requests)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent_s = time.perf_counter() - started
    concurrent_audio = sum(audio.values())
    return {"sequential_s": sequential_s, "concurrent_s": concurrent_s,
            "sequential_audio_per_s": sequential_audio / sequential_s,
            "concurrent_audio_per_s": concurrent_audio / concurrent_s,
            "concurrent_speedup": (concurrent_audio / concurrent_s) / (sequential_audio / sequential_s)}


CACHE_TEXTS = tuple(f"This sentence is about {topic}, and it is long enough to stand on its own as one segment of "
                    f"the text, since it has many words in it and goes on for quite a while before it finally ends, "
                    f"so that the splitter never packs it together with the sentence before it or the one after it."
                    for topic in ("apples", "rivers"))


def bench_cache(engine, n_tokens: int) -> dict:
    """The sentence-level audio cache (disk, in a fresh temporary directory): the same text twice (cold, warm),
    then that text with one more sentence (partial: only the new one is synthesised), against the two sentences
    synthesised without the cache; each whole and timed."""
    import numpy as np

    from cosyvoice_lite.audio import SAMPLE_RATE, to_pcm16
    from cosyvoice_lite.service import SynthesisRequest, SynthesisService
    from cosyvoice_lite.settings import Settings

    first, second = CACHE_TEXTS
    assert len(engine.frontend.split(f"{first} {second}")) == 2
    text_len = len(engine.frontend.tokenize(first))
    # random weights never stop: n_tokens per sentence of this length
    engine.scheduler.sampling = forced(n_tokens, text_len)
    with tempfile.TemporaryDirectory() as tmp:
        service = SynthesisService(Settings.from_env({"cache": "disk", "cache_dir": tmp}), engine)
        service.admission.wait_ready(600)  # its warm-up must not run inside the first timed request

        def run(text, use_cache=True):
            started = time.perf_counter()
            first_chunk, chunks = None, []
            synthesis = service.start(SynthesisRequest(text, service.voices.default, cache=use_cache))
            try:
                for chunk in synthesis:
                    first_chunk = first_chunk or time.perf_counter() - started
                    chunks.append(chunk)
            finally:
                synthesis.close()
            took = time.perf_counter() - started
            return synthesis.cache_status, took, first_chunk, to_pcm16(np.concatenate(chunks))

        uncached = run(f"{first} {second}", use_cache=False)
        cold, warm, partial = run(first), run(first), run(f"{first} {second}")
    engine.scheduler.sampling = {}
    assert (uncached[0], cold[0], warm[0], partial[0]) == ("off", "miss", "hit", "partial")
    return {"cache_cold_s": cold[1], "cache_warm_s": warm[1], "cache_warm_first_chunk_s": warm[2],
            "cache_partial_s": partial[1], "cache_partial_first_chunk_s": partial[2],
            "cache_audio_s": len(cold[3]) / 2 / SAMPLE_RATE, "cache_speedup": cold[1] / warm[1],
            "cache_uncached_2_sentences_s": uncached[1], "cache_partial_vs_uncached": partial[1] / uncached[1],
            "cache_partial_vs_cold": partial[1] / cold[1], "cache_identical": cold[3] == warm[3],
            "cache_partial_starts_with_cached": partial[3].startswith(warm[3])}


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from cosyvoice_lite.engines.cosyvoice import CosyVoiceEngine

    load = OtherLoad()
    started = time.perf_counter()
    from cosyvoice_lite.settings import Settings

    engine = CosyVoiceEngine(args.model_dir, mode=args.worker, threads=args.threads, backend=args.backend,
                             cache_root=Settings.from_env().cache_root)
    load_s = time.perf_counter() - started
    rss_loaded = peak_rss_mb()
    model = engine.model
    speaker = next(iter(model.speakers))
    text_token = engine.frontend.tokenize(TEXT)
    n_tokens = int(args.seconds * model.token_rate)
    result = {"mode": args.worker, "load_s": load_s, "rss_after_load_mb": rss_loaded,
              "runtime": engine.runtime["stages"], "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    # serving first (streaming, as the service runs), so that its peak RSS is measured before the one-shot test
    if args.stream:
        bench_first_audio(engine)  # warm-up of the streaming path
        result.update(bench_first_audio(engine))
        result.update(bench_stream_rtf(engine, n_tokens))
        result.update(bench_underrun(engine, speed=args.underrun_tempo))
        result.update(bench_underrun(engine, seed=0, speed=args.underrun_tempo, prefix="underrun_official"))
    if args.concurrency:
        result.update(bench_concurrency(engine, args.concurrency))
    if args.stream and args.prompt_seconds:
        voice = prompt_voice(engine, args.prompt_seconds)
        bench_first_audio(engine, voice)  # warm-up: the prompt makes every flow pass longer
        result.update({f"zs_{k}": v for k, v in bench_first_audio(engine, voice).items()})
        result.update({f"zs_{k}": v for k, v in bench_stream_rtf(engine, n_tokens, voice).items()})
        result.update(bench_make_voice(engine))
    if args.cache:
        result.update(bench_cache(engine, n_tokens))
    result["serving_peak_rss_mb"] = peak_rss_mb()
    bench_stages(model, text_token, speaker, 25)  # warm-up
    result.update(median_of(bench_stages(model, text_token, speaker, n_tokens) for _ in range(args.repeat)))
    result["peak_rss_mb"] = peak_rss_mb()
    result.update(bench_llm_one_thread(model, text_token, speaker))
    if args.stream and args.prompt_seconds:
        zs = median_of(bench_stages(model, text_token, voice, n_tokens) for _ in range(args.repeat))
        result.update({f"zs_{k}": v for k, v in zs.items()})
    result["other_load"] = load.share()
    engine.scheduler.close()  # torch must be idle when the interpreter exits
    return result


# --- quality: every mode against float32 ----------------------------------------------------------------------

def quality(args) -> dict:
    """Error of default and fast against exact (float32) on the golden model and on the full-size random model."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from cosyvoice_lite.decode.lm_decoder import LMDecoder
    from cosyvoice_lite.model import load_model

    def full_model(mode):  # the full-size random model, built in the mode's precision like a real one
        return load_model(random_model_dir(), mode=mode)

    def cases_for(name):
        if name == "golden":
            manifest = json.loads((GOLDEN / "manifest.json").read_text())
            return [(torch.from_numpy(np.load(GOLDEN / c / "text_token.npy").astype(np.int64))[None],
                     torch.from_numpy(np.load(GOLDEN / c / "embedding.npy")), c)
                    for c, meta in manifest["cases"].items() if meta.get("kind") == "llm"], 40
        g = torch.Generator().manual_seed(7)
        return [(torch.randint(0, 50000, (1, 30), generator=g), torch.randn(1, 192, generator=g), f"random{i}")
                for i in range(2)], args.quality_tokens

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    def spectral_rel(a, b):
        """Relative error of STFT magnitudes: insensitive to the slow phase drift that a tiny F0 change causes in
        the harmonic source (which makes the sample-wise error of any two renderings large)."""
        window = torch.hann_window(1024)
        A, B = (torch.stft(w, 1024, 256, window=window, return_complex=True).abs() for w in (a, b))
        return rel(A, B)

    def sampled(model, text, emb, n, seed):
        decoder = LMDecoder.for_model(model)
        seq = decoder.start(text, emb, min_token_text_ratio=0, max_token_text_ratio=10 ** 6,
                            generator=torch.Generator().manual_seed(seed))
        tokens = []
        while len(tokens) < n and not seq.finished:
            token = decoder.step([seq])[0]
            if token is not None:
                tokens.append(token)
        return tokens

    out = {}
    models = (["golden"] if (GOLDEN / "model").is_dir() else []) + ["full"]
    for name in models:
        load = (lambda mode: load_model(GOLDEN / "model", mode=mode)) if name == "golden" else full_model
        cases, n = cases_for(name)
        exact = load("exact")
        ref = []
        for text, emb, case in cases:
            greedy, logits = LMDecoder.for_model(exact).greedy(text, emb, n)
            tokens = sampled(exact, text, emb, n, seed=1)
            noise = torch.randn(1, 80, exact.flow.n_frames(len(tokens)), generator=torch.Generator().manual_seed(2))
            mel = exact.flow.inference(torch.tensor([tokens]), emb, n_timesteps=exact.n_timesteps, noise=noise)
            wav, _ = exact.hift(mel, generator=torch.Generator().manual_seed(3))
            ref.append((text, emb, case, greedy, logits, tokens, noise, mel, wav))
            # scale of the spectral figure: the same float32 mel rendered with another source seed
            other, _ = exact.hift(mel, generator=torch.Generator().manual_seed(4))
            out.setdefault(f"{name}_exact_other_seed_wav_spectral_rel", []).append(spectral_rel(other, wav))
        del exact
        for mode in ("default", "fast"):
            model = load(mode)
            rows = []
            for text, emb, case, greedy, logits, tokens, noise, mel, wav in ref:
                decoder = LMDecoder.for_model(model)
                g2, _ = decoder.greedy(text, emb, n)
                _, forced_logits = decoder.greedy(text, emb, n, forced=greedy)
                t2 = sampled(model, text, emb, n, seed=1)
                mel2 = model.flow.inference(torch.tensor([tokens]), emb, n_timesteps=model.n_timesteps, noise=noise)
                wav2, _ = model.hift(mel2, generator=torch.Generator().manual_seed(3))
                first = next((i for i, (a, b) in enumerate(zip(greedy, g2)) if a != b), None)
                rows.append({
                    "case": case,
                    "greedy_same": g2 == greedy, "greedy_first_diff": first,
                    "logits_max_abs": float((forced_logits - logits).abs().max()), "logits_rel": rel(forced_logits, logits),
                    "sampled_changed": sum(a != b for a, b in zip(tokens, t2)) / max(1, len(tokens)),
                    "sampled_first_diff": next((i for i, (a, b) in enumerate(zip(tokens, t2)) if a != b), None),
                    "mel_max_abs": float((mel2 - mel).abs().max()), "mel_rel": rel(mel2, mel),
                    "wav_max_abs": float((wav2 - wav).abs().max()), "wav_rel": rel(wav2, wav),
                    "wav_spectral_rel": spectral_rel(wav2, wav),
                })
            out[f"{name}_{mode}"] = rows
            del model
    out.update(prompt_quality(rel, spectral_rel))
    return out


def prompt_quality(rel, spectral_rel) -> dict:
    """Error of default and fast against exact for the prompt modes (zero-shot, cross-lingual, instruct, voice
    conversion): the voices of the golden-modes cases on its model, teacher-forced logits and greedy tokens with the
    prompt, mel and waveform from the same tokens, noise (prompt frames included) and source seed."""
    import numpy as np
    import torch

    from cosyvoice_lite.decode.lm_decoder import LMDecoder
    from cosyvoice_lite.model import load_model
    from cosyvoice_lite.voices.voice import BUILTIN, CLONED, Voice

    root = GOLDEN_MODES
    if not (root / "manifest.json").is_file():
        return {}
    cases = json.loads((root / "manifest.json").read_text())["cases"]

    def arr(case, name):
        path = root / case / f"{name}.npy"
        return np.load(path) if path.is_file() else None

    def voice_of(case):  # the Voice the official model input of a case amounts to
        if cases[case]["kind"] == "instruct":
            spk = arr(case, "flow_embedding")
            return Voice("spk", "spk", kind=BUILTIN, llm_embedding=spk, flow_embedding=spk).instructed(
                arr(case, "prompt_text"))
        text = arr(case, "prompt_text")
        return Voice("clone", "clone", kind=CLONED, llm_embedding=arr(case, "llm_embedding"),
                     flow_embedding=arr(case, "flow_embedding"), prompt_text=[] if text is None else text,
                     prompt_speech=arr(case, "flow_prompt_speech_token"), prompt_mel=arr(case, "prompt_speech_feat")[0])

    names = sorted(c for c, meta in cases.items()
                   if meta["kind"] in ("zero_shot", "cross_lingual", "instruct", "zero_shot_spk", "vc"))
    exact = load_model(root / "model", mode="exact")
    ref = {}
    for case in names:
        voice, vc = voice_of(case), cases[case]["kind"] == "vc"
        tokens = (arr(case, "source_speech_token") if vc else arr(case, "speech_token")).reshape(-1).tolist()
        text = None if vc else torch.from_numpy(arr(case, "text").astype(np.int64)).reshape(1, -1)
        greedy = logits = None
        if text is not None:
            greedy, logits = LMDecoder.for_model(exact).greedy(text, n=len(tokens), **exact.llm_inputs(voice))
        frames = voice.prompt_mel.shape[0] if voice.prompt_mel is not None else 0
        noise = torch.randn(1, 80, frames + exact.flow.n_frames(len(tokens)),
                            generator=torch.Generator().manual_seed(2))
        mel = exact.tokens_to_mel(tokens, voice, noise=noise)
        wav, _ = exact.hift(mel, generator=torch.Generator().manual_seed(3))
        ref[case] = (voice, text, tokens, greedy, logits, noise, mel, wav)
    del exact
    out = {}
    for mode in ("default", "fast"):
        model = load_model(root / "model", mode=mode)
        rows = []
        for case, (voice, text, tokens, greedy, logits, noise, mel, wav) in ref.items():
            row = {"case": case, "kind": cases[case]["kind"]}
            if text is not None:
                decoder = LMDecoder.for_model(model)
                g2, _ = decoder.greedy(text, n=len(tokens), **model.llm_inputs(voice))
                _, forced_logits = decoder.greedy(text, n=len(tokens), forced=greedy, **model.llm_inputs(voice))
                row.update(greedy_same=g2 == greedy, logits_rel=rel(forced_logits, logits))
            mel2 = model.tokens_to_mel(tokens, voice, noise=noise)
            wav2, _ = model.hift(mel2, generator=torch.Generator().manual_seed(3))
            row.update(mel_rel=rel(mel2, mel), wav_spectral_rel=spectral_rel(wav2, wav))
            rows.append(row)
        out[f"prompt_modes_{mode}"] = rows
        del model
    return out


# --- the machine: CPU, dense GEMM ceilings, multiply-adds per stage ------------------------------------------

def gemm_peaks(threads: int) -> dict:
    """Dense GEMM multiply-adds per second (G/s) this machine reaches in PyTorch: float32, bf16 (only where the
    CPU multiplies bf16 natively; emulated figures say nothing), and int8 (fbgemm, the LLM's kernel)."""
    import torch

    from cosyvoice_lite.backends.cpu import cpu_info
    from cosyvoice_lite.model.layers import Int8Linear

    torch.set_num_threads(threads)
    m, k, n = 512, 1024, 1024

    def rate(fn, macs):
        fn()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(4):
                fn()
            best = min(best, (time.perf_counter() - start) / 4)
        return macs / best / 1e9

    a, b = torch.randn(m, k), torch.randn(k, n)
    out = {"fp32": rate(lambda: a @ b, m * k * n)}
    if cpu_info().native_bf16:
        a16, b16 = a.bfloat16(), b.bfloat16()
        out["bf16"] = rate(lambda: a16 @ b16, m * k * n)
    else:
        out["bf16"] = None
    layer = Int8Linear(k, n, bias=False)
    layer.load_state_dict({"weight": torch.randn(n, k)})
    with torch.inference_mode():
        out["int8"] = rate(lambda: layer(a), m * k * n)
    return {key: round(v, 1) if v else v for key, v in out.items()}


def stage_macs(model_dir: str) -> dict:
    """Multiply-adds per audio second of each stage, counted on the float32 modules (FlopCounterMode; 2 FLOPs per
    multiply-add): the flow estimator per Euler step (CFG batch of 2), HiFT's body, the LLM per token."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cosyvoice_lite.model.loader import load_float32_network

    flow = load_float32_network(model_dir, "flow")
    hift = load_float32_network(model_dir, "hift")
    frames = 344
    per_s = flow.sample_rate / flow.hop_size  # mel frames per audio second
    estimator = flow.decoder.estimator
    x = torch.randn(2, 80, frames)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            estimator(x, torch.ones(2, 1, frames), x, torch.rand(2), torch.randn(2, 80), x)
        estimator_macs = counter.get_total_flops() / 2 / frames * per_s
        s_frames = frames * hift.upsample_factor // hift.hop_len + 1
        with FlopCounterMode(display=False) as counter:
            hift.body(torch.randn(1, 80, frames), torch.randn(1, hift.n_fft + 2, s_frames))
        hift_macs = counter.get_total_flops() / 2 / frames * per_s
    del flow, hift
    llm = load_float32_network(model_dir, "llm")
    per_token = sum(m.weight.numel() for m in llm.llm.modules() if isinstance(m, torch.nn.Linear))
    per_token += llm.llm_decoder.weight.numel()
    return {"flow_step_gmacs_per_audio_s": estimator_macs / 1e9, "hift_gmacs_per_audio_s": hift_macs / 1e9,
            "llm_gmacs_per_token": per_token / 1e9}


def stage_efficiency(results: dict, macs: dict, peaks: dict, n_steps: dict) -> dict:
    """Per mode and stage: multiply-adds per second reached and the share of the matching GEMM ceiling."""
    out = {}
    for mode, r in results.items():
        runtime = r.get("runtime", {})
        rows = {}
        for stage, key, work in (
                ("flow_estimator", "flow_s_per_audio_s", macs["flow_step_gmacs_per_audio_s"] * n_steps[mode]),
                ("hift", "hift_s_per_audio_s", macs["hift_gmacs_per_audio_s"]),
                ("llm", "llm_ms_per_token", macs["llm_gmacs_per_token"] * 1000)):
            if r.get(key) is None:
                continue
            rate = work / r[key]
            precision = runtime.get(stage, "torch fp32").split()[-1]
            ceiling = peaks.get({"fp16": "fp32"}.get(precision, precision)) or peaks["fp32"]
            rows[stage] = {"gmacs": round(rate, 1), "share_of_peak": round(rate / ceiling, 3),
                           "runtime": runtime.get(stage, "torch fp32")}
        out[mode] = rows
    return out


# --- parent ---------------------------------------------------------------------------------------------------

VOICE_MODELS = ("campplus.onnx", "speech_tokenizer_v1.onnx")


def random_model_dir(voice_models: str | None = None) -> Path:
    from random_model import write_random_model

    path = Path(tempfile.gettempdir()) / "cosyvoice_lite_bench_full"
    if not (path / "spk2info.pt").is_file():  # written last: its presence means the directory is complete
        print(f"writing a full-size random model to {path} (once) ...", file=sys.stderr)
        write_random_model(path, "full", seed=0)
    for name in VOICE_MODELS:
        (path / name).unlink(missing_ok=True)
        if voice_models:
            (path / name).symlink_to(Path(voice_models, name).resolve())
    return path


def run_child(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"bench child {' '.join(argv)} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def table(results: dict, args) -> None:
    modes = list(results)
    print(f"{args.threads} threads; {args.seconds:g} s utterance ({int(args.seconds * 50)} tokens); model: "
          f"{args.model_dir or 'full-size architecture, random weights'}")
    rows = [
        ("LLM ms/token", "llm_ms_per_token", "{:.1f}"),
        ("LLM s/audio s", None, None),
        ("flow s/audio s", "flow_s_per_audio_s", "{:.3f}"),
        ("HiFT s/audio s", "hift_s_per_audio_s", "{:.3f}"),
        ("RTF (whole utterance)", "rtf", "{:.3f}"),
        ("RTF (engine, streamed)", "stream_rtf", "{:.3f}"),
        ("LLM ms/token, 1 thread", "llm_ms_per_token_1t", "{:.1f}"),
        ("first audio s (stream)", "first_audio_s", "{:.2f}"),
        ("2nd chunk at s", "second_chunk_s", "{:.2f}"),
        ("20 s stream: silence s", "underrun_s", "{:.2f}"),
        ("20 s stream: longest gap s", "underrun_longest_s", "{:.2f}"),
        ("20 s stream, official chunks: silence s", "underrun_official_s", "{:.2f}"),
        ("20 s stream, official chunks: longest gap s", "underrun_official_longest_s", "{:.2f}"),
        (f"{args.concurrency} sequential audio s/s", "sequential_audio_per_s", "{:.3f}"),
        (f"{args.concurrency} concurrent audio s/s", "concurrent_audio_per_s", "{:.3f}"),
        ("concurrent speedup", "concurrent_speedup", "{:.2f}x"),
        ("zero-shot: LLM ms/token", "zs_llm_ms_per_token", "{:.1f}"),
        ("zero-shot: flow s/audio s", "zs_flow_s_per_audio_s", "{:.3f}"),
        ("zero-shot: RTF (whole)", "zs_rtf", "{:.3f}"),
        ("zero-shot: RTF (streamed)", "zs_stream_rtf", "{:.3f}"),
        ("zero-shot: first audio s", "zs_first_audio_s", "{:.2f}"),
        ("zero-shot: 2nd chunk at s", "zs_second_chunk_s", "{:.2f}"),
        ("make a voice (10 s clip) s", "make_voice_s", "{:.2f}"),
        ("cache: cold s", "cache_cold_s", "{:.2f}"),
        ("cache: warm s", "cache_warm_s", "{:.4f}"),
        ("cache: warm speedup", "cache_speedup", "{:.0f}x"),
        ("cache: warm identical", "cache_identical", "{}"),
        ("cache: partial/uncached", "cache_partial_vs_uncached", "{:.2f}"),
        ("load s", "load_s", "{:.1f}"),
        ("RSS after load MB", "rss_after_load_mb", "{:.0f}"),
        ("peak RSS MB (serving)", "serving_peak_rss_mb", "{:.0f}"),
        ("peak RSS MB (+one-shot)", "peak_rss_mb", "{:.0f}"),
        ("CPU used by others", "other_load", "{:.0%}"),
    ]
    print(f"{'':<26}" + "".join(f"{m:>12}" for m in modes))
    for label, key, fmt in rows:
        cells = []
        for m in modes:
            r = results[m]
            if key is None:
                value = r.get("llm_ms_per_token")
                cells.append(f"{value * 50 / 1000:.3f}" if value is not None else "-")
            else:
                value = r.get(key)
                cells.append(fmt.format(value) if value is not None else "-")
        print(f"{label:<26}" + "".join(f"{c:>12}" for c in cells))
        if key in STAGE_KEYS and any(f"{key}_runs" in results[m] for m in modes):
            spans = []
            for m in modes:
                runs = results[m].get(f"{key}_runs")
                spans.append(f"{fmt.format(min(runs))}-{fmt.format(max(runs))}" if runs else "-")
            print(f"{'  min-max of ' + str(args.repeat):<26}" + "".join(f"{c:>12}" for c in spans))


def machine_table(cpu, generation: str | None, peaks: dict, macs: dict, efficiency: dict) -> None:
    limit = f" (kernels limited to {cpu.isa_limit}: --isa)" if cpu.isa_limit else ""
    print(f"\nCPU: {cpu.model} ({generation or cpu.arch}); features: {' '.join(cpu.features) or '-'}{limit}; "
          f"native bf16: {'yes' if cpu.native_bf16 else 'no'}")
    print("dense GEMM ceilings (G multiply-adds/s): " + ", ".join(
        f"{k} {v:.0f}" if v else f"{k} -" for k, v in peaks.items()))
    print(f"work: flow {macs['flow_step_gmacs_per_audio_s']:.1f} G per Euler step per audio s, HiFT body "
          f"{macs['hift_gmacs_per_audio_s']:.1f} G per audio s, LLM {macs['llm_gmacs_per_token'] * 1000:.0f} M "
          "per token")
    print(f"{'mode':<9}{'stage':<16}{'runtime':<16}{'G MAC/s':>9}{'of peak':>9}")
    for mode, rows in efficiency.items():
        for stage, row in rows.items():
            print(f"{mode:<9}{stage:<16}{row['runtime']:<16}{row['gmacs']:>9.1f}{row['share_of_peak']:>9.0%}")


def quality_table(q: dict) -> None:
    print("\nquality vs float32 (exact): logits teacher-forced along exact's greedy path; mel/wav from the same "
          "tokens, noise and source seed")
    print(f"{'model/mode':<16}{'case':<12}{'greedy':>8}{'logit abs':>10}{'logit rel':>10}{'sampled chg':>12}"
          f"{'mel abs':>9}{'mel rel':>9}{'wav abs':>9}{'wav rel':>9}{'wav spec':>9}")
    for key, rows in q.items():
        if key.endswith("other_seed_wav_spectral_rel") or key.startswith("prompt_modes"):
            continue
        for r in rows:
            greedy = "same" if r["greedy_same"] else f"@{r['greedy_first_diff']}"
            print(f"{key:<16}{r['case']:<12}{greedy:>8}{r['logits_max_abs']:>10.3g}{r['logits_rel']:>10.2e}"
                  f"{r['sampled_changed']:>12.2f}{r['mel_max_abs']:>9.3f}{r['mel_rel']:>9.3f}"
                  f"{r['wav_max_abs']:>9.3f}{r['wav_rel']:>9.3f}{r['wav_spectral_rel']:>9.3f}")
    if q.get("prompt_modes_default"):
        print(f"\nprompt modes on the golden-modes model vs exact\n{'mode/kind':<26}{'case':<16}{'greedy':>8}"
              f"{'logit rel':>10}{'mel rel':>9}{'wav spec':>9}")
    for key in ("prompt_modes_default", "prompt_modes_fast"):
        for r in q.get(key, []):
            greedy = "-" if "greedy_same" not in r else ("same" if r["greedy_same"] else "differs")
            logits = f"{r['logits_rel']:.2e}" if "logits_rel" in r else "-"
            print(f"{key.split('_')[-1] + ' ' + r['kind']:<26}{r['case']:<16}{greedy:>8}{logits:>10}"
                  f"{r['mel_rel']:>9.1e}{r['wav_spectral_rel']:>9.3f}")
    for key, values in q.items():
        if key.endswith("other_seed_wav_spectral_rel"):
            print(f"scale: {key.split('_exact')[0]} float32, another HiFT source seed: wav spec rel "
                  + ", ".join(f"{v:.3f}" for v in values))
    print("sampled chg = share of positions whose sampled token differs (same seed); after the first change the "
          "contexts differ, so later positions differ too. wav spec = relative error of STFT magnitudes.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="a real model directory (default: random full-size weights)")
    parser.add_argument("--seconds", type=float, default=10.0, help="utterance length for stage times and RTF")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of the whole-utterance stage test per mode (their median is reported)")
    parser.add_argument("--isa", choices=sorted(ISA_LIMITS),
                        help="cap every kernel library at this ISA, as on a CPU that has no more (the plan follows)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="exact,default,fast", help="comma-separated speed modes")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent requests (0: skip)")
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="skip the first-audio test")
    parser.add_argument("--stream-modes", default="default,fast",
                        help="modes that run the streaming and concurrency tests")
    parser.add_argument("--prompt-seconds", type=float, default=5.0,
                        help="zero-shot rows (streamed modes): a cloned voice with a clip of this length (0: skip)")
    parser.add_argument("--voice-models", help="a directory with campplus.onnx and speech_tokenizer_v1.onnx for the "
                        "random model (times making a voice)")
    parser.add_argument("--quality", action="store_true", help="also measure errors against float32")
    parser.add_argument("--quality-tokens", type=int, default=100, help="tokens per case on the full-size model")
    parser.add_argument("--underrun-tempo", type=float, default=1.0,
                        help="tempo of the 20 s stream whose gaps are measured (below 1: more audio per token, "
                             "as on a faster CPU)")
    parser.add_argument("--cache", action="store_true", help="also time the audio cache: cold, warm, partial")
    parser.add_argument("--quick", action="store_true", help="3 s utterance, default+fast")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--backend", default="auto", choices=("auto", "openvino", "torch"),
                        help="runtime of the flow estimator and HiFT (BACKEND)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-quality", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.isa and any(os.environ.get(k) != v for k, v in ISA_LIMITS[args.isa].items()):
        # the libraries read these once, when they load: start again with them set (the children inherit them)
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], {**os.environ, **ISA_LIMITS[args.isa]})
    args.repeat = max(1, args.repeat)
    if args.quick:
        args.seconds = 3.0
        if args.modes == parser.get_default("modes"):
            args.modes = "default,fast"
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.worker_quality:
        print(json.dumps(quality(args)))
        return 0

    model_dir = str(args.model_dir or random_model_dir(args.voice_models))
    from cosyvoice_lite.backends.cpu import cpu_info
    from cosyvoice_lite.model.modes import mode_settings

    cpu, generation = cpu_info(), cpu_generation()
    print(f"[machine] {cpu.model} ({generation or cpu.arch}, {cpu.cores} logical CPUs): {' '.join(cpu.features)}"
          + (f" (kernels limited to {cpu.isa_limit})" if cpu.isa_limit else ""), file=sys.stderr, flush=True)
    peaks = gemm_peaks(args.threads)
    macs = stage_macs(model_dir)
    results = {}
    stream_modes = set(args.stream_modes.split(","))
    for mode in args.modes.split(","):
        argv = ["--worker", mode, "--model-dir", model_dir, "--seconds", str(args.seconds),
                "--threads", str(args.threads), "--repeat", str(args.repeat),
                "--backend", args.backend, "--prompt-seconds", str(args.prompt_seconds),
                "--concurrency", str(args.concurrency if mode in stream_modes else 0),
                "--underrun-tempo", str(args.underrun_tempo)]
        if not args.stream or mode not in stream_modes:
            argv.append("--no-stream")
        if args.cache:
            argv.append("--cache")
        print(f"[{mode}] ...", file=sys.stderr, flush=True)
        results[mode] = run_child(argv)
    table(results, args)
    n_steps = {mode: mode_settings(mode).n_timesteps for mode in results}
    efficiency = stage_efficiency(results, macs, peaks, n_steps)
    machine_table(cpu, generation, peaks, macs, efficiency)
    q = None
    if args.quality:
        print("[quality] ...", file=sys.stderr, flush=True)
        q = run_child(["--worker-quality", "--threads", str(args.threads),
                       "--quality-tokens", str(args.quality_tokens)])
        quality_table(q)
    if args.json:
        def get(mode, key):
            value = results.get(mode, {}).get(key)
            return round(value, 4) if isinstance(value, float) else value

        summary = {
            "threads": args.threads, "seconds": args.seconds,
            "rtf_fp32": get("exact", "rtf"), "rtf_default": get("default", "rtf"), "rtf_fast": get("fast", "rtf"),
            "first_audio_s": get("default", "first_audio_s"), "first_audio_s_fast": get("fast", "first_audio_s"),
            "rtf_stream_default": get("default", "stream_rtf"), "rtf_stream_fast": get("fast", "stream_rtf"),
            "peak_rss_mb": get("default", "serving_peak_rss_mb"),
            "peak_rss_mb_default_with_oneshot": get("default", "peak_rss_mb"),
            "peak_rss_mb_fp32": get("exact", "peak_rss_mb"),
            "concurrent_speedup_4": get("default", "concurrent_speedup"),
            "concurrent_speedup_4_fast": get("fast", "concurrent_speedup"),
            "llm_ms_per_token_fp32": get("exact", "llm_ms_per_token"),
            "llm_ms_per_token_default": get("default", "llm_ms_per_token"),
            "llm_ms_per_token_fast": get("fast", "llm_ms_per_token"),
            "llm_ms_per_token_1t": {m: get(m, "llm_ms_per_token_1t") for m in results},
            "underrun_s": {m: get(m, "underrun_s") for m in results if "underrun_s" in results[m]},
            "underrun_longest_s": {m: get(m, "underrun_longest_s") for m in results if "underrun_s" in results[m]},
            "underrun_official_s": {m: get(m, "underrun_official_s") for m in results if "underrun_s" in results[m]},
            "underrun_official_longest_s": {m: get(m, "underrun_official_longest_s")
                                            for m in results if "underrun_s" in results[m]},
            "prompt_s": args.prompt_seconds,
            "zero_shot": {m: {k: get(m, f"zs_{k}") for k in ("rtf", "stream_rtf", "first_audio_s", "llm_ms_per_token",
                                                              "flow_s_per_audio_s")} for m in results},
            "zero_shot_vs_sft_rtf": {m: round(results[m]["zs_rtf"] / results[m]["rtf"], 3)
                                     for m in results if "zs_rtf" in results[m]},
            "make_voice_s_10s_clip": get("default", "make_voice_s"),
            "cpu": cpu.model, "cpu_generation": generation, "cpu_features": list(cpu.features),
            "gemm_peak_gmacs": peaks,
            "isa_limit": cpu.isa_limit, "repeat": args.repeat,
            "flow_s_per_audio_s": {m: get(m, "flow_s_per_audio_s") for m in results},
            "hift_s_per_audio_s": {m: get(m, "hift_s_per_audio_s") for m in results},
            # exact mode is the float32 PyTorch path of every stage (the ratio's denominator)
            "rtf_torch_fp32": get("exact", "rtf") if results.get("exact", {}).get("runtime", {}).get(
                "flow_estimator", "torch").startswith("torch") else None,
            "stage_macs": {k: round(v, 3) for k, v in macs.items()},
            "stage_efficiency": efficiency,
            "modes": results,
        }
        if q is not None:
            summary["quality"] = q
        print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
