"""The concurrent-requests workload that scripts/bench.py (in-process) and scripts/bench_http.py (over HTTP) both
measure, so that their concurrency gains compare like with like: the same text, speakers and seeds, hence the same
speech tokens and the same amount of audio per request on both paths."""

# 13 text tokens. With random weights the LLM runs to its length limit (20 speech tokens per text token, ~5 s of
# audio); a trained model ends the sentence itself, sooner.
CONCURRENT_TEXT = "今天天气很好，我们去散步。"


def concurrent_request(i: int, speakers: list[str]) -> dict:
    """The i-th request of the workload, as the /tts body (the audio cache off: repeats must be synthesised)."""
    return {"text": CONCURRENT_TEXT, "speaker": speakers[i % len(speakers)], "seed": i, "cache": False}
