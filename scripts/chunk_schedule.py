"""What a listener of one streamed request hears under a chunk schedule, from stage speeds alone (no model).

The scheduler's thread alternates LLM steps and chunks (flow + HiFT): a chunk of h new tokens waits for their LLM
steps, then runs the flow on h + 20 tokens (the overlap with the next chunk) and HiFT on the frames it keeps. The
listener starts playing the first chunk when it arrives; whenever a chunk arrives after the audio in hand ran out,
they hear silence. This is the arithmetic behind the lean modes' hop growth (decode/scheduler.py: GROWTH_MARGIN and
GROWTH_STEPS); docs/performance.md has its table next to the measured streams.

    .venv/bin/python scripts/chunk_schedule.py                       # Zen 4 fast-mode speeds, scaled from 0.45 to 1
    .venv/bin/python scripts/chunk_schedule.py --llm-ms 6 --flow 0.3 --hift 0.12 --scale 1
"""
from __future__ import annotations

import argparse

TOKEN_RATE = 50                     # speech tokens per second of audio (CosyVoice-300M)
FRAME_RATE = 22050 / 256            # mel frames per second
OVERLAP = 20                        # tokens shared by consecutive chunks (official)
MAX_HOP = 200


def frames(tokens: int) -> int:
    return int(tokens / TOKEN_RATE * FRAME_RATE)


def listen(hops, tokens: int, llm_s: float, flow_s: float, flow_fixed_s: float, hift_s: float):
    """(first audio, silence in all, longest gap, chunks, seconds of work) for hops(k) = the k-th chunk's hop.
    llm_s: seconds per token; flow_s: seconds per audio second of frames it runs; hift_s: per audio second."""
    now = played = 0.0
    done = decoded = chunk = 0
    gaps, first = [], None
    while done < tokens:
        end = min(tokens, done + hops(chunk) + OVERLAP)
        final = end == tokens
        now += max(0, end - decoded) * llm_s
        decoded = max(decoded, end)
        kept = frames(end - done) - (0 if final else frames(OVERLAP))
        now += flow_fixed_s + flow_s * frames(end - done) / FRAME_RATE + hift_s * kept / FRAME_RATE
        done = tokens if final else done + hops(chunk)
        chunk += 1
        if first is None:
            first = played = now
        elif now > played:
            gaps.append(now - played)
            played = now
        played += kept / FRAME_RATE
    return first, sum(gaps), max(gaps, default=0.0), chunk, now


def official(first: int):
    return lambda k: first if k == 0 else (100 if k == 1 else MAX_HOP)


def grown(first: int, factor: float):
    """Hops as TokenStream grows them (the official joins' smallest hop is below any hop here)."""
    hops = [first]
    while hops[-1] < MAX_HOP:
        hops.append(min(MAX_HOP, max(hops[-1] + 1, round(hops[-1] * factor))))
    return lambda k: hops[min(k, len(hops) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-ms", type=float, default=10.0, help="LLM ms per token (Zen 4, fast mode: 10)")
    parser.add_argument("--flow", type=float, default=0.35, help="flow s per audio s, without its fixed part")
    parser.add_argument("--flow-fixed", type=float, default=0.06, help="flow s per chunk whatever its length")
    parser.add_argument("--hift", type=float, default=0.21, help="HiFT s per audio s")
    parser.add_argument("--first-hop", type=int, default=23)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--scale", type=float, nargs="*", default=[0.45, 0.55, 0.65, 0.75, 0.85, 1.0],
                        help="speed-ups of every stage to try (1: as given)")
    parser.add_argument("--growth", type=float, nargs="*", default=[1.2, 1.35, 1.5, 1.7, 2.0])
    args = parser.parse_args()
    tokens = int(args.seconds * TOKEN_RATE)
    print(f"{args.seconds:.0f} s stream: silence in all / longest gap (s), official hops and hops grown by a factor")
    print("  r  | official    | " + " | ".join(f"x{g:<10}" for g in args.growth))
    for scale in args.scale:
        speeds = (args.llm_ms / 1000 * scale, args.flow * scale, args.flow_fixed * scale, args.hift * scale)
        base = listen(official(args.first_hop), tokens, *speeds)
        r = base[4] / args.seconds
        cells = [f"{base[1]:5.2f} / {base[2]:4.2f}"]
        for factor in args.growth:
            run = listen(grown(args.first_hop, factor), tokens, *speeds)
            cells.append(f"{run[1]:5.2f} / {run[2]:4.2f}")
        print(f"{r:4.2f} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
