"""Run a compiled bundle end to end: processor -> pruned prefill engine -> decode engine -> text.

At import this module needs only numpy: the Triton model repository ships a copy of it as the generation loop
of its Python-backend model (``clse_fx.deploy.triton``).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    """How each next token is picked: the argmax of the logits (greedy, the default), or with ``do_sample`` a
    draw from softmax(logits / temperature) over the ``top_k`` highest logits (0 = all tokens), from a
    generator seeded with ``seed`` (None = fresh entropy, so answers differ from call to call)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise ValueError(f"do_sample must be true or false, got {self.do_sample!r}")
        if not isinstance(self.temperature, numbers.Real) or isinstance(self.temperature, (bool, np.bool_)):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling (do_sample), got {self.temperature}")
        if not isinstance(self.top_k, numbers.Integral) or isinstance(self.top_k, (bool, np.bool_)):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = all tokens), got {self.top_k}")
        if self.seed is not None and (
            not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, (bool, np.bool_)) or self.seed < 0
        ):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")

    def rng(self) -> np.random.Generator:
        """A fresh generator for one generation call, seeded with ``seed``."""
        return np.random.default_rng(self.seed)

    def next_token(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One token id per row of ``logits`` [batch, vocab]: greedy argmax, or a sample (one draw from ``rng``
        per row) from softmax(logits / temperature) over the top_k (0 = all) tokens."""
        if not self.do_sample:
            return logits.argmax(axis=-1).astype(np.int64)
        scaled = logits.astype(np.float64) / self.temperature
        if self.top_k:
            threshold = np.sort(scaled, axis=-1)[:, -self.top_k][:, None]
            scaled = np.where(scaled < threshold, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)


GREEDY = SamplingConfig()


def check_prompt_feeds(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    shape: tuple[int, int],
    visual_token_ids: list[int],
    per_prompt: int,
    vocab_size: int | None = None,
) -> None:
    """Refuse feeds the prefill graph was not built for, with a one-line error: ids or mask not of the compiled
    ``shape`` [batch, sequence], ids :func:`check_token_ids` refuses, a mask that is not 0/1 or not left padded
    (zeros, then ones) or holds no token, or a row whose visual placeholders are not exactly the compiled ``per_prompt``
    or sit in the padding. The graph indexes visual tokens by count, so these would fail deep inside it or answer
    silently wrong."""
    for name, array in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if tuple(array.shape) != tuple(shape):
            raise ValueError(
                f"{name} has shape {list(array.shape)} but the bundle was compiled for {list(shape)}; "
                "recompile with matching --batch/--text-len"
            )
    check_token_ids(input_ids, vocab_size)
    if not (np.issubdtype(attention_mask.dtype, np.integer) or attention_mask.dtype == np.bool_):
        raise ValueError(f"attention_mask must be integers 0/1, got {attention_mask.dtype}")
    if not np.isin(attention_mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (prompt tokens)")
    length = input_ids.shape[1]
    for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
        tokens = int(mask.sum())
        if tokens == 0:
            raise ValueError(f"row {row}: the attention mask is all zeros; every row needs its prompt")
        if not mask[length - tokens :].all():
            raise ValueError(f"row {row}: the attention mask is not left padded (zeros, then ones); pad on the left")
        visual = np.isin(ids, visual_token_ids)
        count = int(visual.sum())
        if count != per_prompt:
            raise ValueError(
                f"row {row} holds {count} visual placeholder tokens but the bundle was compiled for {per_prompt} per "
                "prompt; give each prompt exactly its compiled images (the processor writes their tokens)"
            )
        if (visual & (mask == 0)).any():
            raise ValueError(f"row {row}: visual placeholder tokens sit in the padding; put them inside the prompt")


def check_token_ids(input_ids: np.ndarray, vocab_size: int | None, name: str = "input_ids") -> None:
    """Refuse non-integer token ids, or ids outside ``[0, vocab_size)`` (None: not checked), with a one-line error.
    Every session checks its token-id input here (and Engine and the Triton model before anything runs): ONNX
    Runtime's Gather wraps -1 to the last token and runs on; an AOTInductor package aborts the process."""
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids, got {input_ids.dtype}")
    if vocab_size is not None and input_ids.size and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        bad = int(input_ids.min()) if input_ids.min() < 0 else int(input_ids.max())
        raise ValueError(f"{name} holds token id {bad}, outside the model's vocabulary [0, {vocab_size})")


def check_valid_rows(valid: np.ndarray) -> None:
    """Raise on the first row the prefill graph's ``valid`` output marks as not one it was built for."""
    bad = np.flatnonzero(~np.asarray(valid, dtype=bool))
    if bad.size:
        raise ValueError(
            f"row {int(bad[0])}: the prefill graph reports a prompt it was not built for (visual placeholder count "
            "or placement, or the attention mask); its outputs were discarded"
        )


def check_sampling(sampling: object) -> None:
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(
            f"sampling must be a SamplingConfig, got {type(sampling).__name__}; "
            "e.g. sampling=SamplingConfig(do_sample=True, top_k=5, seed=3)"
        )


@dataclass
class Timings:
    prefill_ms: float = 0.0
    decode_ms_per_token: float = 0.0
    kv_cache_bytes: int = 0


def decode_start(feeds: dict[str, np.ndarray], start: int, offset_input: str | None) -> np.ndarray:
    """[batch, 1] position of each row's first decoded token: ``start`` (the unpruned prompt length), plus the
    row's value of ``offset_input`` where the pipeline makes one (M-RoPE's rope deltas)."""
    batch = len(feeds["input_ids"])
    offset = feeds[offset_input] if offset_input else np.zeros(batch, np.int64)
    return (start + np.asarray(offset).reshape(batch))[:, None].astype(np.int64)


class KVBuffers:
    """Every layer's keys and values in buffers allocated once per generation: the prefill's (pruned) cache,
    then one free slot per token to come. :meth:`write` puts a step's new key/value at each layer's next slot
    in place, O(1) per step; nothing grows, and a session that bound the buffers (ONNX Runtime IO binding)
    reads the writes without a copy. Unwritten slots are zeros: the decode graph masks them, but a masked
    slot still meets a zero probability in a matmul, and 0 * NaN from uninitialised memory would be NaN."""

    def __init__(self, cache: list[np.ndarray], free_slots: int) -> None:
        self.filled = np.array([key.shape[2] for key in cache[::2]], dtype=np.int64)  # slots in use, per layer
        self.buffers = []
        for tensor in cache:
            batch, heads, length, dim = tensor.shape
            buffer = np.zeros((batch, heads, length + free_slots, dim), dtype=tensor.dtype)
            buffer[:, :, :length] = tensor
            self.buffers.append(buffer)

    def write(self, new: list[np.ndarray]) -> None:
        """Store one step's new key/value per layer ([B, Hkv, 1, D] each) at each layer's next slot (none where
        the decode step wrote them into the buffers itself), and count the slot as filled."""
        for i, (buffer, tensor) in enumerate(zip(self.buffers, new)):
            buffer[:, :, self.filled[i // 2]] = tensor[:, :, 0]
        self.filled += 1


def copy_written_slots(buffers: list[np.ndarray], presents: list[np.ndarray], cache_lengths: np.ndarray) -> None:
    """Copy the slot a decode step that writes the KV cache itself filled (``cache_lengths[i]`` of layer i) from
    the present buffers it returned into the loop's ``buffers``: for runtimes that cannot bind the graph's present
    outputs to its past inputs' memory (Triton), O(1) per step like :meth:`KVBuffers.write`."""
    for i, (buffer, present) in enumerate(zip(buffers, presents)):
        slot = cache_lengths[i // 2]
        buffer[:, :, slot] = present[:, :, slot]


def generation_loop(
    prefill: Callable[[dict[str, np.ndarray]], tuple[np.ndarray, list[np.ndarray]]],
    decode: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]], list[np.ndarray]],
    feeds: dict[str, np.ndarray],
    positions: np.ndarray,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    rng: np.random.Generator | None = None,
    stops: set[int] = frozenset(),
) -> tuple[list[list[int]], Timings]:
    """The prefill + decode loop over any engine: ``prefill(feeds)`` returns the logits and every layer's key
    and value, ``decode(input_ids, position_ids, pad_counts, cache_lengths, buffers)`` the decode graph's
    outputs (logits, then each layer's new key and value) for the :class:`KVBuffers` ``buffers`` whose first
    ``cache_lengths`` slots per layer are filled; the list ``buffers`` is the same object at every step of a
    generation (sized to the prompt plus ``max_new_tokens``), so an engine may bind it once. A decode step that
    writes the new keys and values into ``buffers`` itself (at slot ``cache_lengths[i]``) returns the logits
    alone. Decoding starts at ``positions`` (:func:`decode_start`); ``sampling`` picks each token, drawing from
    ``rng`` (default ``sampling.rng()``); per row the new ids, cut after the first stop token."""
    rng = sampling.rng() if rng is None else rng
    start = time.perf_counter()
    logits, past = prefill(feeds)
    prefill_ms = (time.perf_counter() - start) * 1e3
    past = list(past)
    timings = Timings(prefill_ms=prefill_ms, kv_cache_bytes=int(sum(t.nbytes for t in past)))
    seq = feeds["input_ids"].shape[1]
    pad_counts = (seq - feeds["attention_mask"].sum(axis=1)).astype(np.int64)  # left padding
    token = sampling.next_token(logits[:, -1], rng)
    stop_ids = list(stops)  # np.isin takes a sequence; made once, not per step
    generated, done = [token], np.isin(token, stop_ids)
    start = time.perf_counter()
    steps = 0
    cache = KVBuffers(past, max_new_tokens - 1)  # step s writes slot length + s, s < max_new_tokens - 1
    for step in range(max_new_tokens - 1):
        if done.all():
            break
        logits, *new = decode(token[:, None], positions + step, pad_counts, cache.filled.copy(), cache.buffers)
        cache.write(new)
        token = sampling.next_token(logits[:, -1], rng)
        generated.append(token)
        done |= np.isin(token, stop_ids)
        steps += 1
    timings.decode_ms_per_token = (time.perf_counter() - start) * 1e3 / max(steps, 1)
    ids = np.stack(generated, axis=1)
    rows = []
    for row in ids.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
    return rows, timings


def check_finite_feeds(feeds: dict[str, np.ndarray]) -> None:
    """Refuse floating-point feeds (pixels) holding NaN or infinity, with a one-line error: the graph would answer
    NaN logits, decoded as token 0, as if it had seen an image. Sessions check their pixel inputs here too."""
    for name, array in feeds.items():
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise ValueError(f"{name} holds NaN or infinite values; pass finite pixel values")
