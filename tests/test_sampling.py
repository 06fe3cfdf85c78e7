"""SamplingConfig: the one object that says how each next token is picked, checked when it is made; and the
generation loop's use of it, over stand-in engines (no model needed)."""

import dataclasses

import numpy as np
import pytest

from clse_fx.deploy.loop import GREEDY, SamplingConfig, generation_loop

VOCAB = 7


def _logits(rows: int = 3) -> np.ndarray:
    """[rows, VOCAB] logits whose argmax is neither the first nor the last index, a different one per row."""
    logits = np.random.default_rng(0).normal(size=(rows, VOCAB)).astype(np.float32)
    logits[np.arange(rows), 1 + np.arange(rows) % (VOCAB - 2)] = 10.0
    return logits


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"do_sample": True, "temperature": 0}, "temperature must be > 0 when sampling"),
        ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0 when sampling"),
        ({"do_sample": True, "temperature": -0.5}, "temperature must be > 0 when sampling"),
        ({"do_sample": True, "temperature": float("inf")}, "temperature must be a finite number"),
        ({"do_sample": True, "temperature": 1e309}, "temperature must be a finite number"),  # JSON's 1e309 is inf
        ({"do_sample": True, "temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),  # rejected when greedy too
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": -float("inf")}, "temperature must be a finite number"),
        ({"temperature": "1.0"}, "temperature must be a number"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"do_sample": True, "top_k": -3}, "top_k must be >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"do_sample": True, "seed": -7}, "seed must be a non-negative integer"),
        ({"seed": 1.5}, "seed must be a non-negative integer"),
        ({"do_sample": "false"}, "do_sample must be true or false"),
    ],
)
def test_bad_settings_raise_one_clear_line(settings, message):
    with pytest.raises(ValueError) as caught:
        SamplingConfig(**settings)
    text = str(caught.value)
    assert message in text and "\n" not in text, text


def test_good_settings_are_kept_and_frozen():
    assert GREEDY == SamplingConfig() == SamplingConfig(False, 1.0, 0, None)
    assert not GREEDY.do_sample
    # Temperature only matters when sampling: a greedy config may carry 0; seed 0 and top_k 0 are valid values.
    assert SamplingConfig(temperature=0).temperature == 0
    config = SamplingConfig(do_sample=True, temperature=0.5, top_k=3, seed=0)
    assert (config.do_sample, config.temperature, config.top_k, config.seed) == (True, 0.5, 3, 0)
    assert SamplingConfig(do_sample=np.bool_(True), temperature=np.float32(0.5), top_k=np.int32(2)).top_k == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 4
    assert hash(config) == hash(SamplingConfig(do_sample=True, temperature=0.5, top_k=3, seed=0))


def test_greedy_is_argmax_and_draws_nothing():
    logits = _logits()
    rng = np.random.default_rng(5)
    before = rng.bit_generator.state
    tokens = GREEDY.next_token(logits, rng)
    assert tokens.dtype == np.int64 and tokens.tolist() == [1, 2, 3]
    assert rng.bit_generator.state == before  # greedy leaves the generator as it was
    # A greedy config ignores temperature and top_k.
    assert SamplingConfig(temperature=0.01, top_k=1).next_token(logits, rng).tolist() == [1, 2, 3]


def test_a_seed_fixes_the_samples_and_different_seeds_differ():
    logits = np.zeros((40, VOCAB), np.float32)  # uniform: every token equally likely
    config = SamplingConfig(do_sample=True, seed=3)
    first = config.next_token(logits, config.rng())
    assert first.dtype == np.int64 and first.shape == (40,)
    assert first.tolist() == config.next_token(logits, config.rng()).tolist()
    other = SamplingConfig(do_sample=True, seed=4)
    assert first.tolist() != other.next_token(logits, other.rng()).tolist()
    assert len(set(first.tolist())) > 1  # a sample, not an argmax


def test_samples_are_one_draw_per_row_from_the_tempered_top_k_softmax():
    """Pins the math and the generator use, so seeded answers stay the same from release to release."""
    logits = _logits(4).astype(np.float64)
    config = SamplingConfig(do_sample=True, temperature=0.7, top_k=3, seed=11)
    got = config.next_token(logits.astype(np.float32), config.rng())
    rng = np.random.default_rng(11)
    expected = []
    for row in logits.astype(np.float32).astype(np.float64) / 0.7:
        kept = np.isin(np.arange(VOCAB), np.argsort(row)[-3:])
        p = np.where(kept, np.exp(row - row.max()), 0.0)
        expected.append(rng.choice(VOCAB, p=p / p.sum()))
    assert got.tolist() == expected
    # top_k keeps only the k highest logits, however many draws are made.
    flat = np.tile(np.arange(VOCAB, dtype=np.float32), (500, 1))
    draws = SamplingConfig(do_sample=True, top_k=2, seed=0).next_token(flat, np.random.default_rng(0))
    assert set(draws.tolist()) == {VOCAB - 2, VOCAB - 1}
    # A low temperature makes the sample the argmax; a high one spreads it over the kept tokens.
    cold = SamplingConfig(do_sample=True, temperature=1e-3, seed=0)
    assert cold.next_token(flat, cold.rng()).tolist() == [VOCAB - 1] * 500
    hot = SamplingConfig(do_sample=True, temperature=100.0, seed=0)
    assert len(set(hot.next_token(flat, hot.rng()).tolist())) == VOCAB


def _engine(vocab: int = VOCAB, batch: int = 2, seq: int = 4):
    """A stand-in prefill and decode: each step's logits depend on the last token; one new KV slot a step."""
    table = np.random.default_rng(1).normal(size=(vocab, vocab)).astype(np.float32)

    def prefill(feeds):
        logits = np.zeros((batch, seq, vocab), np.float32)
        logits[:, -1] = table[np.arange(batch) + 2]
        return logits, [np.zeros((batch, 1, seq, 2), np.float32)]

    def decode(input_ids, position_ids, pad_counts, cache_lengths, buffers):
        return [table[input_ids[:, 0]][:, None], np.zeros((batch, 1, 1, 2), np.float32)]

    feeds = {"input_ids": np.ones((batch, seq), np.int64), "attention_mask": np.ones((batch, seq), np.int64)}
    return prefill, decode, feeds


START = np.full((2, 1), 4, np.int64)


def test_generation_loop_takes_one_sampling_config():
    prefill, decode, feeds = _engine()
    greedy, _ = generation_loop(prefill, decode, feeds, START, 6)
    assert greedy == generation_loop(prefill, decode, feeds, START, 6, GREEDY, np.random.default_rng(9))[0]
    assert all(len(row) == 6 for row in greedy)
    config = SamplingConfig(do_sample=True, temperature=2.0, seed=21)
    # Without a generator the loop draws from sampling.rng(), so a seeded config alone fixes the answer.
    sampled, _ = generation_loop(prefill, decode, feeds, START, 6, config)
    assert sampled == generation_loop(prefill, decode, feeds, START, 6, config)[0]
    assert sampled == generation_loop(prefill, decode, feeds, START, 6, config, config.rng())[0]
    assert sampled != generation_loop(prefill, decode, feeds, START, 6, config, np.random.default_rng(22))[0]
    # Stop tokens end a row, and are kept as its last id.
    stop = sampled[0][2]
    cut, _ = generation_loop(prefill, decode, feeds, START, 6, config, stops={stop})
    assert cut[0] == sampled[0][: sampled[0].index(stop) + 1]


def test_generation_loop_fills_one_preallocated_cache():
    """Decode sees the same KV buffers at every step (allocated once, per layer its prompt length plus a slot per
    new token), their filled slots are the cache the old loop grew by concatenation, and the answers match."""
    batch, vocab, steps = 2, 11, 6
    rng = np.random.default_rng(0)
    table = rng.normal(size=(vocab, vocab)).astype(np.float32)
    weights = rng.normal(size=vocab).astype(np.float32)
    prompt = [rng.normal(size=(batch, 2, n, 3)).astype(np.float32) for n in (5, 5, 3, 3)]  # per-layer lengths

    def prefill(feeds):
        return np.ones((batch, 4, vocab), np.float32) * table[:batch, None], prompt

    def step(input_ids, cache):  # the logits depend on every cached value
        total = sum(t.sum(axis=(1, 2, 3)) for t in cache)
        logits = table[input_ids[:, 0]] + total[:, None] * weights
        return [logits[:, None], *(np.full((batch, 2, 1, 3), i + input_ids[:, :1, None, None]) for i in range(4))]

    seen = []

    def decode(input_ids, position_ids, pad_counts, cache_lengths, buffers):
        seen.append((buffers, [b.ctypes.data for b in buffers], [b.shape for b in buffers]))
        return step(input_ids, [b[:, :, :n] for b, n in zip(buffers, np.repeat(cache_lengths, 2))])

    feeds = {"input_ids": np.ones((batch, 4), np.int64), "attention_mask": np.ones((batch, 4), np.int64)}
    ids, _ = generation_loop(prefill, decode, feeds, START, steps)
    assert len(seen) == steps - 1 and all(s[0] is seen[0][0] and s[1:] == seen[0][1:] for s in seen)
    assert seen[0][2] == [(batch, 2, n + steps - 1, 3) for n in (5, 5, 3, 3)]
    # The old loop: the cache grows by concatenation every step.
    past, token, old = list(prompt), table[:batch].argmax(axis=-1), []
    old.append(token)
    for _ in range(steps - 1):
        logits, *new = step(token[:, None], past)
        past = [np.concatenate([p, n], axis=2) for p, n in zip(past, new)]
        token = logits[:, -1].argmax(axis=-1)
        old.append(token)
    assert ids == np.stack(old, axis=1).tolist()
    buffers = seen[0][0]
    assert all(np.array_equal(b[:, :, : p.shape[2]], p) for b, p in zip(buffers, past))  # the last step's write too
