#!/usr/bin/env python3
"""Speed and memory of the CosyVoice-300M-SFT path on this machine.

    python scripts/bench.py                      # full-size architecture, random weights (no download)
    python scripts/bench.py --model-dir models/CosyVoice-300M-SFT
    python scripts/bench.py --seconds 10 --json  # last line: one JSON object with every figure

Random weights never emit end-of-speech, so the LLM is forced to decode exactly ``seconds * 50`` tokens, the
same work a trained model does for an utterance of that length. Times are wall-clock on ``--threads`` threads.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TEXT = "希望你以后能够做得比我还好哟。今天天气很好，我们一起去公园散步吧。"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(args):
    from cosyvoice_lite.model import CosyVoiceSFT, load_model
    from cosyvoice_lite.model.random_model import SPEAKERS, build_random_model

    if args.model_dir:
        return load_model(args.model_dir), f"{args.model_dir}"
    _, llm, flow, hift = build_random_model("full", seed=0)
    for module in (llm, flow, hift):
        module.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    speakers = {name: torch.randn(1, 192, generator=generator) for name in SPEAKERS}
    return CosyVoiceSFT(llm, flow, hift, speakers), "full-size CosyVoice-300M architecture, random weights"


def bench_stages(model, text_token, speaker: str, n_tokens: int, n_timesteps: int) -> dict:
    ratio = (n_tokens + 0.5) / len(text_token)  # forces exactly n_tokens
    seconds = n_tokens / model.token_rate
    torch.manual_seed(0)
    start = started = time.perf_counter()
    first_token_at = None
    tokens = []
    for token in model.text_to_tokens(text_token, speaker, min_token_text_ratio=ratio, max_token_text_ratio=ratio):
        if first_token_at is None:
            first_token_at = time.perf_counter()
        tokens.append(token)
    llm_s = time.perf_counter() - start
    start = time.perf_counter()
    mel = model.tokens_to_mel(tokens, speaker, n_timesteps=n_timesteps)
    flow_s = time.perf_counter() - start
    start = time.perf_counter()
    wav = model.mel_to_wav(mel)
    hift_s = time.perf_counter() - start
    audio_s = wav.shape[1] / model.sample_rate
    return {
        "audio_s": audio_s,
        "tokens": len(tokens),
        "llm_s": llm_s,
        "llm_first_token_s": first_token_at - started,
        "llm_ms_per_token": 1000 * llm_s / len(tokens),
        "flow_s": flow_s,
        "flow_s_per_audio_s": flow_s / seconds,
        "hift_s": hift_s,
        "hift_s_per_audio_s": hift_s / seconds,
        "total_s": llm_s + flow_s + hift_s,
        "rtf": (llm_s + flow_s + hift_s) / audio_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="a real model directory (default: random full-size weights in memory)")
    parser.add_argument("--seconds", type=float, default=10.0, help="utterance length to synthesise")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="flow Euler steps")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from cosyvoice_lite.frontend import TextFrontend

    started = time.perf_counter()
    model, what = load(args)
    load_s = time.perf_counter() - started
    speaker = next(iter(model.speakers))
    text_token = TextFrontend().tokenize(TEXT)
    n_tokens = int(args.seconds * model.token_rate)
    bench_stages(model, text_token, speaker, 25, args.steps)  # warm-up
    result = bench_stages(model, text_token, speaker, n_tokens, args.steps)
    figures = {
        "model": what,
        "threads": args.threads,
        "load_s": round(load_s, 2),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()},
        "rtf_fp32": round(result["rtf"], 3),
        "llm_ms_per_token_fp32": round(result["llm_ms_per_token"], 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print(f"model: {what}; {args.threads} threads; {result['tokens']} tokens = {result['audio_s']:.2f} s of audio")
    print(f"{'stage':<8} {'seconds':>9} {'per audio s':>12}")
    print(f"{'llm':<8} {result['llm_s']:9.2f} {result['llm_s'] / result['audio_s']:12.3f}   "
          f"({result['llm_ms_per_token']:.1f} ms/token)")
    print(f"{'flow':<8} {result['flow_s']:9.2f} {result['flow_s_per_audio_s']:12.3f}")
    print(f"{'hift':<8} {result['hift_s']:9.2f} {result['hift_s_per_audio_s']:12.3f}")
    print(f"{'total':<8} {result['total_s']:9.2f} {result['rtf']:12.3f}   (real-time factor)")
    print(f"peak RSS {figures['peak_rss_mb']:.0f} MB; model load {load_s:.1f} s")
    if args.json:
        print(json.dumps(figures, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
