"""Speed modes, batched decoding, streaming and the scheduler: what they must keep from the float32 model.

Speed itself is never asserted here (scripts/bench.py measures it); these tests pin down behaviour and quality.
"""
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn
from golden_data import GOLDEN

from cosyvoice_lite.decode import streaming
from cosyvoice_lite.model import load_model
from cosyvoice_lite.cancel import Cancelled
from cosyvoice_lite.decode.lm_decoder import LMDecoder
from cosyvoice_lite.decode.reference import generate
from cosyvoice_lite.decode.scheduler import GROWTH_MARGIN, GROWTH_STEPS, Scheduler
from cosyvoice_lite.model.config import read_config
from cosyvoice_lite.model.layers import FileEmbedding, Fp16Linear, Int8Linear
from cosyvoice_lite.model.loader import build_networks, load_state
from cosyvoice_lite.model.precision import Precision
from cosyvoice_lite.model.modes import SETTINGS, mode_settings
from cosyvoice_lite.settings import Settings
from cosyvoice_lite.decode.streaming import HIFT_CACHE_FRAMES, TOKEN_OVERLAP, TokenStream
from parity import Golden
from cosyvoice_lite.voices import builtin_voices

MODEL_DIR = GOLDEN / "model"
GREEDY_STEPS = 40


def voice_of(model, speaker_id: str):
    """The built-in Voice of one of the model's speakers."""
    return next(v for v in builtin_voices(model.speakers) if v.id == speaker_id)


MANIFEST = Golden(GOLDEN).manifest  # raises with the path when the golden data is missing
LLM_CASES = sorted(name for name, case in MANIFEST["cases"].items() if case.get("kind") == "llm")
assert LLM_CASES, "manifest lists no 'llm' cases"


def llm_inputs(case):
    text = torch.from_numpy(np.load(GOLDEN / case / "text_token.npy").astype(np.int64))[None]  # (1, L)
    return text, torch.from_numpy(np.load(GOLDEN / case / "embedding.npy"))  # (1, 192)


@pytest.fixture(scope="module")
def exact():
    return load_model(MODEL_DIR)


@pytest.fixture(scope="module")
def default():
    return load_model(MODEL_DIR, mode="default")


@pytest.fixture(scope="module")
def fast():
    return load_model(MODEL_DIR, mode="fast")


def mode_decoder(model) -> LMDecoder:
    """The decoder the scheduler runs for this model's mode."""
    return LMDecoder.for_model(model)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- modes ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", LLM_CASES)
def test_default_mode_keeps_the_float32_greedy_tokens(exact, default, case):
    ref, _ = mode_decoder(exact).greedy(*llm_inputs(case), GREEDY_STEPS)
    ours, _ = mode_decoder(default).greedy(*llm_inputs(case), GREEDY_STEPS)
    assert ours == ref


@pytest.mark.parametrize("case", LLM_CASES)
def test_default_mode_logits_stay_within_one_percent(exact, default, case):
    tokens, ref = mode_decoder(exact).greedy(*llm_inputs(case), GREEDY_STEPS)
    _, ours = mode_decoder(default).greedy(*llm_inputs(case), GREEDY_STEPS, forced=tokens)
    assert rel(ours, ref) < 1e-2


def test_fast_mode_shares_the_default_llm(default, fast):
    text, embedding = llm_inputs(LLM_CASES[0])
    _, a = mode_decoder(default).greedy(text, embedding, 10)
    _, b = mode_decoder(fast).greedy(text, embedding, 10)
    assert torch.equal(a, b)


def test_exact_mode_keeps_float32_modules(exact):
    assert exact.mode.name == "exact" and exact.n_timesteps == 10
    assert not any(isinstance(m, (Int8Linear, Fp16Linear)) for m in exact.llm.modules())
    assert not mode_decoder(exact).batched


def test_default_mode_converts_llm_and_flow_linears(default):
    remaining = [name for name, m in default.llm.named_modules() if isinstance(m, nn.Linear)]
    assert remaining == ["spk_embed_affine_layer"]
    fp16 = [name for name, m in default.llm.named_modules() if isinstance(m, Fp16Linear)]
    assert fp16 == ["text_encoder.embed.out.0", "llm.embed.out.0", "llm_decoder"]
    assert isinstance(default.llm.llm.encoders[0].feed_forward.w_1, Int8Linear)
    assert isinstance(default.llm.text_encoder_affine_layer, Int8Linear)
    assert isinstance(default.llm.text_embedding, FileEmbedding)
    assert all(type(m) is Fp16Linear for part in (default.flow.encoder, default.flow.decoder.estimator)
               for m in part.modules() if isinstance(m, (nn.Linear, Int8Linear, Fp16Linear)))
    # the length regulator and the small projections around the encoder stay float32
    assert [type(default.flow.spk_embed_affine_layer), type(default.flow.encoder_proj)] == [nn.Linear, nn.Linear]
    assert type(default.flow.length_regulator.model[0]) is nn.Conv1d
    assert default.n_timesteps == 10


def test_fast_mode_uses_fewer_steps_and_int8_flow(fast):
    assert fast.n_timesteps < 10
    assert all(type(m) is Int8Linear for part in (fast.flow.encoder, fast.flow.decoder.estimator)
               for m in part.modules() if isinstance(m, (nn.Linear, Int8Linear, Fp16Linear)))


def test_lean_load_equals_loading_the_float32_checkpoint_into_networks_built_for_the_mode(default):
    """The lean path (weights-free networks, mapped checkpoints) converts exactly what a plain load converts."""
    llm, _, _, _ = build_networks(read_config(MODEL_DIR / "cosyvoice.yaml"), Precision.of(SETTINGS["default"]))
    load_state(llm, torch.load(MODEL_DIR / "llm.pt", weights_only=True), "llm.pt")
    text, embedding = llm_inputs(LLM_CASES[0])
    _, a = LMDecoder(llm.eval(), batched=False).greedy(text, embedding, 10)
    _, b = LMDecoder(default.llm, batched=False).greedy(text, embedding, 10)
    assert torch.equal(a, b)


def test_lean_load_leaves_no_tensor_without_data(default):
    for module in (default.llm, default.flow, default.hift):
        assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def test_mode_comes_from_the_environment():
    assert Settings.from_env(environ={"COSYVOICE_MODE": "fast"}).mode == "fast"
    assert Settings.from_env(environ={}).mode == "default"
    assert mode_settings(None).name == "default"
    with pytest.raises(ValueError, match="COSYVOICE_MODE"):
        Settings.from_env(environ={"COSYVOICE_MODE": "turbo"})
    with pytest.raises(ValueError, match="unknown speed mode"):
        mode_settings("turbo")


def test_flow_and_vocoder_error_of_default_mode_is_small(exact, default):
    tokens = torch.randint(0, 4096, (1, 60), generator=torch.Generator().manual_seed(0))
    embedding = exact.embedding(next(iter(exact.speakers)))
    noise = torch.randn(1, 80, exact.flow.n_frames(60), generator=torch.Generator().manual_seed(1))
    ref = exact.flow.inference(tokens, embedding, noise=noise)
    ours = default.flow.inference(tokens, embedding, noise=noise)
    assert rel(ours, ref) < 1e-2


# ---- batched decoding ----------------------------------------------------------------------------------------

def test_exact_decoder_reproduces_generate_draw_for_draw(exact):
    text, embedding = llm_inputs(LLM_CASES[0])
    torch.manual_seed(3)
    ref = list(generate(exact.llm, text, embedding, min_token_text_ratio=1, max_token_text_ratio=2))
    torch.manual_seed(3)
    stepper = mode_decoder(exact)
    seq = stepper.start(text, embedding, min_token_text_ratio=1, max_token_text_ratio=2)
    ours = []
    while not seq.finished:
        token = stepper.step([seq])[0]
        if token is not None:
            ours.append(token)
    assert ours == ref


@pytest.mark.parametrize("mode", ["exact", "default"])
def test_batched_steps_match_single_sequence_steps(exact, default, mode):
    """Sequences that join at different steps (different cache lengths) get the logits they get alone."""
    model = exact if mode == "exact" else default
    inputs = [llm_inputs(case) for case in LLM_CASES]
    stepper = mode_decoder(model)
    alone = [stepper.greedy(text, embedding, 20) for text, embedding in inputs]
    seqs, rows = [], [[] for _ in inputs]
    for step in range(20 + len(inputs)):
        if step < len(inputs):
            seqs.append(stepper.start(*inputs[step], min_token_text_ratio=0, max_token_text_ratio=10 ** 6))
        live = [s for s in seqs if s.steps < 20]
        if not live:
            break
        logits = stepper.logits(live)
        for i, s in enumerate(live):
            k = seqs.index(s)
            rows[k].append(logits[i:i + 1])
            stepper.push(s, alone[k][0][s.steps])
    for k, (_, ref) in enumerate(alone):
        got = torch.cat(rows[k])
        if mode == "exact":
            assert torch.equal(got, ref)
        else:  # int8 activation scales are shared by the rows of a batch
            assert rel(got, ref) < 1e-2


def test_batched_decoding_of_long_sequences_follows_the_single_sequence_path(default):
    """Past several cache growths (the caches grow in blocks of frames)."""
    text, embedding = llm_inputs(LLM_CASES[0])
    tokens = torch.randint(0, 4096, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    _, ref = LMDecoder(default.llm, batched=False).greedy(text, embedding, 300, forced=tokens)
    _, ours = mode_decoder(default).greedy(text, embedding, 300, forced=tokens)
    assert rel(ours, ref) < 1e-2


def test_a_long_sequence_leaves_no_large_position_table_and_later_logits_are_unchanged(default):
    """The relative-position rows a long sequence needed are given back when shorter ones follow and when the
    decoder is idle; what the short sequences compute is the same as on a fresh decoder."""
    text, embedding = llm_inputs(LLM_CASES[0])
    tokens = torch.randint(0, 4096, (1200,), generator=torch.Generator().manual_seed(4)).tolist()
    fresh = LMDecoder(default.llm, batched=True)
    _, ref = fresh.greedy(text, embedding, 40, forced=tokens[:40])
    decoder = LMDecoder(default.llm, batched=True)
    decoder.greedy(text, embedding, 1200, forced=tokens)
    assert decoder.positions.size > 1200
    _, after = decoder.greedy(text, embedding, 40, forced=tokens[:40])
    assert torch.equal(after, ref)
    assert decoder.positions.size == decoder.positions.KEEP  # a fresh one holds less; never more than this
    decoder.greedy(text, embedding, 1200, forced=tokens)
    decoder.release_idle()
    assert decoder.positions.size == decoder.positions.KEEP


def test_scripted_layer_stack_gives_the_logits_of_the_python_loop(default):
    """The batched step's TorchScript layer stack runs the same ops as its Python loop: equal logits, bit for bit,
    for sequences of different lengths stepped together."""
    inputs = [llm_inputs(case) for case in LLM_CASES]
    tokens = torch.randint(0, 4096, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    results = []
    for scripted in (True, False):
        decoder = LMDecoder(default.llm, batched=True, scripted=scripted)
        seqs = [decoder.start(text, embedding, min_token_text_ratio=0, max_token_text_ratio=10 ** 6)
                for text, embedding in inputs]
        rows = []
        for step, token in enumerate(tokens):
            live = seqs[:1 + step // 10]  # the others join later: different cache lengths in one batch
            rows.append(decoder.logits(live))
            for s in live:
                decoder.push(s, token)
        results.append(rows)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_float_lm_asked_to_batch_steps_each_sequence_through_the_module(exact):
    """Only int8 layer stacks have a batched step; a float32 LM keeps the module's (official) logits."""
    text, embedding = llm_inputs(LLM_CASES[0])
    _, ref = LMDecoder(exact.llm, batched=False).greedy(text, embedding, 10)
    decoder = LMDecoder(exact.llm, batched=True)
    _, ours = decoder.greedy(text, embedding, 10)
    assert torch.equal(ours, ref) and not decoder.batched


def test_a_sequence_can_switch_between_batched_and_single_steps(default):
    """The batched step keeps a sequence's keys and values in buffers of its own; single-sequence steps on the same
    cache must see them, and batched steps what single ones appended (across the cache growths)."""
    text, embedding = llm_inputs(LLM_CASES[0])
    tokens = torch.randint(0, 4096, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    single = LMDecoder(default.llm, batched=False)
    _, ref = single.greedy(text, embedding, 200, forced=tokens)
    batched = LMDecoder(default.llm, batched=True)
    seq = batched.start(text, embedding, min_token_text_ratio=0, max_token_text_ratio=10 ** 6)
    rows = []
    for i, token in enumerate(tokens):
        decoder = single if (i // 45) % 2 else batched
        rows.append(decoder.logits([seq]))
        decoder.push(seq, token)
    assert rel(torch.cat(rows), ref) < 1e-2
    assert torch.equal(torch.cat(rows).argmax(dim=1), ref.argmax(dim=1))


def test_per_sequence_generators_make_draws_independent(exact):
    """A sequence's draws depend on its own generator only, not on the sequences stepped with it."""
    text, embedding = llm_inputs(LLM_CASES[0])

    def run(others: int):
        stepper = mode_decoder(exact)
        seqs = [stepper.start(text, embedding, 1, 1.5, generator=torch.Generator().manual_seed(i))
                for i in range(others + 1)]
        out = []
        while not seqs[0].finished:
            token = stepper.step(seqs)[0]
            if token is not None:
                out.append(token)
        return out

    assert run(0) == run(2)


# ---- streaming -----------------------------------------------------------------------------------------------

def test_single_chunk_stream_equals_whole_segment_synthesis(exact):
    speaker = next(iter(exact.speakers))
    tokens = torch.randint(0, 4096, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    stream = TokenStream(exact, voice_of(exact, speaker), generator=torch.Generator().manual_seed(5))
    for token in tokens:
        stream.push(token)
    wav = stream.finish()
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 80, exact.flow.n_frames(50), generator=g)
    mel = exact.flow.inference(torch.tensor([tokens]), exact.embedding(speaker), noise=noise)
    ref, _ = exact.hift(mel, generator=g)
    assert torch.equal(wav, ref)


def test_stream_hops_and_chunk_lengths(exact):
    speaker = next(iter(exact.speakers))
    stream = TokenStream(exact, voice_of(exact, speaker), first_hop=30, generator=torch.Generator().manual_seed(0))
    frame = exact.samples_per_frame
    lengths, hops = [], []
    for token in torch.randint(0, 4096, (400,), generator=torch.Generator().manual_seed(1)).tolist():
        stream.push(token)
        if stream.ready():
            hops.append(stream.hop)
            lengths.append(stream.chunk().shape[1])
    lengths.append(stream.finish().shape[1])
    assert hops == [30, 100, 200]
    overlap = exact.flow.n_frames(TOKEN_OVERLAP)
    assert lengths[0] == (exact.flow.n_frames(30 + TOKEN_OVERLAP) - overlap - HIFT_CACHE_FRAMES) * frame
    assert lengths[1] == (exact.flow.n_frames(100 + TOKEN_OVERLAP) - overlap) * frame
    whole = exact.flow.n_frames(400) * frame
    assert abs(sum(lengths) - whole) <= 4 * frame  # chunking rounds frame counts per chunk


def _frames_of_hop(model, hop):
    """Mel frames a non-final chunk of `hop` tokens brings after the first (official joins at both ends)."""
    return model.flow.n_frames(hop + TOKEN_OVERLAP) - model.flow.n_frames(TOKEN_OVERLAP)


def test_grown_hops_rise_by_the_factor_from_the_first_up_to_the_longest(exact):
    stream = TokenStream(exact, voice_of(exact, next(iter(exact.speakers))), first_hop=30, hop_growth=1.5,
                         generator=torch.Generator().manual_seed(0))
    hops = []
    for token in torch.randint(0, 4096, (700,), generator=torch.Generator().manual_seed(1)).tolist():
        stream.push(token)
        if stream.ready():
            hops.append(stream.hop)
            stream.chunk()
    assert hops == [30, 45, 68, 102, 153, 200]


def test_grown_hops_leave_room_for_the_official_joins_after_a_short_first_one(exact):
    stream = TokenStream(exact, voice_of(exact, next(iter(exact.speakers))), first_hop=1, first_overlap=10,
                         first_cache=10, hop_growth=1.5, generator=torch.Generator().manual_seed(0))
    first = stream.hop
    for token in torch.randint(0, 4096, (first + 10,), generator=torch.Generator().manual_seed(1)).tolist():
        stream.push(token)
    stream.chunk()
    # 1.5 times the first hop would leave HiFT fewer frames than the two caches of the official joins need:
    # the next hop is the smallest that leaves enough
    assert _frames_of_hop(exact, round(1.5 * first)) < 2 * HIFT_CACHE_FRAMES
    assert _frames_of_hop(exact, stream.hop) >= 2 * HIFT_CACHE_FRAMES > _frames_of_hop(exact, stream.hop - 1)


def test_hop_growth_must_be_above_one(exact):
    with pytest.raises(ValueError, match="above 1"):
        TokenStream(exact, voice_of(exact, next(iter(exact.speakers))), hop_growth=1.0)


def test_shorter_first_join_gives_a_smaller_first_chunk_then_official_joins(exact):
    speaker = next(iter(exact.speakers))
    stream = TokenStream(exact, voice_of(exact, speaker), first_hop=1, first_overlap=10, first_cache=10,
                         generator=torch.Generator().manual_seed(0))
    frame = exact.flow.n_frames
    first_hop = stream.hop
    assert frame(first_hop + 10) - frame(10) >= 2 * 10 > frame(first_hop + 9) - frame(10)  # the smallest such hop
    lengths, sizes = [], []
    for token in torch.randint(0, 4096, (300,), generator=torch.Generator().manual_seed(1)).tolist():
        stream.push(token)
        if stream.ready():
            sizes.append(stream.next_chunk_size())
            lengths.append(stream.chunk().shape[1] // exact.samples_per_frame)
    lengths.append(stream.finish().shape[1] // exact.samples_per_frame)
    assert sizes[:2] == [first_hop + 10, 100 + TOKEN_OVERLAP]
    assert lengths[0] == frame(first_hop + 10) - frame(10) - 10
    # the second chunk re-vocodes the 10 cached frames and holds back the official 20
    assert lengths[1] == frame(100 + TOKEN_OVERLAP) - frame(TOKEN_OVERLAP) + 10 - HIFT_CACHE_FRAMES
    assert abs(sum(lengths) - frame(300)) <= 4


def test_long_chunks_give_the_flows_memory_back_before_hift_runs(exact, monkeypatch):
    events = []
    monkeypatch.setattr(streaming, "release_free_memory", lambda: events.append("trim"))
    hift = exact.hift
    monkeypatch.setattr(exact, "hift", lambda mel, *args, **kw: events.append(mel.shape[2]) or hift(mel, *args, **kw))
    stream = TokenStream(exact, voice_of(exact, next(iter(exact.speakers))), first_hop=30, generator=torch.Generator().manual_seed(0))
    for token in torch.randint(0, 4096, (300,), generator=torch.Generator().manual_seed(1)).tolist():
        stream.push(token)
        if stream.ready():
            stream.chunk()
    stream.finish()
    frames = exact.flow.n_frames
    # chunks of 30 + 20, then 100 + 20 tokens; the last one has the remaining 170 (and HiFT's 20 cached frames)
    flow_frames = [frames(50), frames(120), frames(170)]
    hift_frames = [flow_frames[0] - frames(TOKEN_OVERLAP), flow_frames[1] - frames(TOKEN_OVERLAP) + HIFT_CACHE_FRAMES,
                   flow_frames[2] + HIFT_CACHE_FRAMES]
    expected = []
    for flow, hift_input in zip(flow_frames, hift_frames):
        expected += (["trim"] if flow >= streaming.TRIM_BEFORE_HIFT_FRAMES else []) + [hift_input]
    assert "trim" in expected
    assert events == expected


def test_first_join_overlaps_must_be_positive(exact):
    with pytest.raises(ValueError, match="at least 1"):
        TokenStream(exact, voice_of(exact, next(iter(exact.speakers))), first_overlap=0)


def test_only_fast_mode_shortens_the_first_join():
    assert (SETTINGS["exact"].first_overlap, SETTINGS["exact"].first_cache) == (TOKEN_OVERLAP, HIFT_CACHE_FRAMES)
    assert (SETTINGS["default"].first_overlap, SETTINGS["default"].first_cache) == (TOKEN_OVERLAP, HIFT_CACHE_FRAMES)
    assert (SETTINGS["fast"].first_overlap, SETTINGS["fast"].first_cache) == (10, 10)


@pytest.mark.parametrize("speed", [0.25, 1.0, 4.0])
def test_stream_length_follows_the_tempo(exact, speed):
    speaker = next(iter(exact.speakers))
    stream = TokenStream(exact, voice_of(exact, speaker), speed=speed, first_hop=10, generator=torch.Generator().manual_seed(0))
    total = 0
    for token in torch.randint(0, 4096, (260,), generator=torch.Generator().manual_seed(1)).tolist():
        stream.push(token)
        if stream.ready():
            total += stream.chunk().shape[1]
    total += stream.finish().shape[1]
    assert abs(total - exact.flow.n_frames(260) * exact.samples_per_frame / speed) < 8 * exact.samples_per_frame


def test_chunks_of_several_streams_in_one_flow_batch_match_one_by_one(exact):
    speakers = list(exact.speakers)[:2]
    tokens = torch.randint(0, 4096, (2, 160), generator=torch.Generator().manual_seed(2)).tolist()

    def streams():
        out = []
        for i, speaker in enumerate(speakers):
            stream = TokenStream(exact, voice_of(exact, speaker), first_hop=30, generator=torch.Generator().manual_seed(i))
            for token in tokens[i]:
                stream.push(token)
            out.append(stream)
        return out

    alone = [[s.chunk(), s.chunk()] for s in streams()]
    together = streams()
    batched = [TokenStream.chunk_many(together), TokenStream.chunk_many(together)]
    for i in range(2):
        for k in range(2):
            assert rel(batched[k][i], alone[i][k]) < 5e-3  # float rounding differs with the batch size


# ---- scheduler -----------------------------------------------------------------------------------------------

def _segments(model):
    text, _ = llm_inputs(LLM_CASES[0])
    return [text[0, :12].tolist(), text[0, 12:20].tolist()]


def _collect(chunks):
    return np.concatenate(list(chunks))


@pytest.fixture(scope="module")
def scheduler(exact):
    s = Scheduler(exact, max_batch=4, first_hop=20)
    yield s
    s.close()


def test_scheduler_seeded_request_is_reproducible_while_others_run(exact, scheduler):
    speaker = next(iter(exact.speakers))
    alone = _collect(scheduler.submit(_segments(exact), voice_of(exact, speaker), seed=11))
    results = {}

    def run(i):
        results[i] = _collect(scheduler.submit(_segments(exact), voice_of(exact, speaker), seed=11 if i == 0 else 100 + i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert np.array_equal(results[0], alone)
    assert not np.array_equal(results[1], alone)


def test_scheduler_streams_with_the_first_join_of_the_mode(fast):
    speaker = next(iter(fast.speakers))
    s = Scheduler(fast, first_hop=1)
    try:
        chunks = s.submit(_segments(fast)[:1], voice_of(fast, speaker), seed=1, min_token_text_ratio=15, max_token_text_ratio=15)
        first = next(chunks)
        chunks.close()
    finally:
        s.close()
    frame = fast.flow.n_frames
    overlap, cache = fast.mode.first_overlap, fast.mode.first_cache
    hop = TokenStream(fast, voice_of(fast, speaker), first_hop=1, first_overlap=overlap, first_cache=cache).hop
    assert first.size == (frame(hop + overlap) - frame(overlap) - cache) * fast.samples_per_frame


def test_scheduler_cancel_stops_the_request(exact, scheduler):
    speaker = next(iter(exact.speakers))
    cancel = threading.Event()
    chunks = scheduler.submit(_segments(exact) * 5, voice_of(exact, speaker), seed=1, cancel=cancel)
    next(chunks)
    cancel.set()
    with pytest.raises(Cancelled):
        for _ in chunks:
            pass
    assert scheduler.wait_idle(30)


def test_requests_a_few_tokens_apart_share_their_flow_passes(default):
    """A request that arrives a few LLM steps after another catches up for the flow: their equal chunks run as
    one batch instead of one after the other."""
    speaker = next(iter(default.speakers))
    s = Scheduler(default, max_batch=2, first_hop=20)
    events, results, threads = [], {}, []
    fixed = dict(min_token_text_ratio=8, max_token_text_ratio=8)

    def run(name):
        results[name] = _collect(s.submit(_segments(default)[:1], voice_of(default, speaker), seed=len(name), **fixed))

    def trace(event, seconds, batch=1):
        events.append((event, batch))
        if event == "llm" and len(events) == 3:  # the first request has 3 tokens: the second one arrives
            threads.append(threading.Thread(target=run, args=("late",)))
            threads[-1].start()
            deadline = time.monotonic() + 30  # queued before the next step (on a busy machine a thread starts late)
            while s.busy < 2 and time.monotonic() < deadline:
                time.sleep(0.001)

    s.trace = trace
    try:
        run("early")
        for t in threads:
            t.join(120)
    finally:
        s.close()
    assert set(results) == {"early", "late"}
    vocodes = [batch for event, batch in events if event == "vocode"]
    assert vocodes and vocodes[0] == 2, events


def test_default_mode_keeps_half_the_key_value_bytes_of_exact_mode(exact, default):
    text, embedding = llm_inputs(LLM_CASES[0])

    def bytes_per_frame(model):
        stepper = mode_decoder(model)
        seq = stepper.start(text, embedding, min_token_text_ratio=0, max_token_text_ratio=10 ** 6)
        for _ in range(5):
            stepper.step([seq])
        layers = seq.cache.layers
        return sum(t.element_size() * t[0, :, 0].numel() for layer in layers for t in (layer.k, layer.v))

    assert bytes_per_frame(default) * 2 == bytes_per_frame(exact)


def test_default_mode_keeps_its_relative_position_rows_at_half_the_bytes_of_float32(default):
    """The position rows the batched step shares between sequences are stored like its keys and values."""
    text, embedding = llm_inputs(LLM_CASES[0])

    def bytes_per_position(decoder):
        decoder.greedy(text, embedding, 5)
        return sum(t.element_size() * t[:, 0].numel() for t in decoder.positions.reserve(1))

    as_float32 = LMDecoder(default.llm, batched=True, kv_dtype=torch.float32)
    assert bytes_per_position(mode_decoder(default)) * 2 == bytes_per_position(as_float32)


def _second_chunk_frames(model, scheduler, **request):
    """Mel frames of a streamed request's second chunk (first hop 20; 180 tokens)."""
    chunks = list(scheduler.submit(_segments(model)[:1], voice_of(model, next(iter(model.speakers))),
                                   min_token_text_ratio=15, max_token_text_ratio=15, **request))
    return chunks[1].size // model.samples_per_frame


def test_an_unseeded_stream_grows_its_hops_while_the_scheduler_keeps_up(default):
    voice = voice_of(default, next(iter(default.speakers)))
    first = TokenStream(default, voice, first_hop=20).hop
    s = Scheduler(default, first_hop=20)
    try:
        assert s.realtime_factor is None
        list(s.submit(_segments(default)[:1], voice, seed=0))
        # the tiny model makes audio many times faster than it plays: the hops grow by the largest factor
        largest = max(GROWTH_STEPS)
        assert s.keeps_up() and GROWTH_MARGIN / s.realtime_factor > largest
        assert _second_chunk_frames(default, s) == _frames_of_hop(default, round(largest * first))
        # a seed keeps the official schedule
        assert _second_chunk_frames(default, s, seed=4) == _frames_of_hop(default, 100)
    finally:
        s.close()


def test_an_unseeded_stream_keeps_the_official_hops_when_the_scheduler_falls_behind(default):
    s = Scheduler(default, first_hop=20)
    step, slow = s.decoder.step, [True]

    def slow_step(seqs):
        if slow[0]:
            time.sleep(0.05)  # per token: well over a second of work per second of audio
        return step(seqs)

    s.decoder.step = slow_step
    try:
        list(s.submit(_segments(default)[:1], voice_of(default, next(iter(default.speakers))), seed=0,
                      min_token_text_ratio=3, max_token_text_ratio=3))
        assert not s.keeps_up() and s.realtime_factor > 1
        slow[0] = False
        assert _second_chunk_frames(default, s) == _frames_of_hop(default, 100)
    finally:
        s.close()


def test_exact_mode_streams_with_the_official_hops(exact, scheduler):
    assert _second_chunk_frames(exact, scheduler) == _frames_of_hop(exact, 100)
