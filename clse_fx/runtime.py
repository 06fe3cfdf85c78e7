"""Run a compiled bundle end to end: processor -> pruned prefill engine -> decode engine -> text.

At import this module needs only numpy: the Triton model repository ships a copy of it as the generation loop
of its Python-backend model (``clse_fx.export.triton``).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
) -> None:
    """Refuse feeds the prefill graph was not built for, with a one-line error: ids or mask not of the compiled
    ``shape`` [batch, sequence], non-integer ids, a mask that is not 0/1 or not left padded (zeros, then ones) or
    holds no token, or a row whose visual placeholders are not exactly the compiled ``per_prompt`` or sit in
    the padding. The graph indexes visual tokens by count, so these would fail deep inside it or answer
    silently wrong."""
    for name, array in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if tuple(array.shape) != tuple(shape):
            raise ValueError(
                f"{name} has shape {list(array.shape)} but the bundle was compiled for {list(shape)}; "
                "recompile with matching --batch/--text-len"
            )
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
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


def _check_sampling(sampling: object) -> None:
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


@dataclass
class Generation:
    """One prompt's answer: generated token ids (up to and including a stop token) and their text."""

    token_ids: list[int]
    text: str
    timings: Timings = field(default_factory=Timings)


class Engine:
    """A loaded bundle. Feeds must match the compiled geometry; the processor's output is fitted to it."""

    def __init__(self, bundle: Path, manifest: dict, prefill, decode, processor, input_graphs=None) -> None:
        self.bundle, self.manifest = bundle, manifest
        self.prefill, self.decode, self.processor = prefill, decode, processor
        self.input_graphs = input_graphs or {}  # name -> session, run in order before the prefill
        geometry = manifest["geometry"]
        self.batch, self.sequence_length = geometry["batch"], geometry["sequence_length"]
        self.images_per_prompt, self.text_len = geometry["images"], geometry["text_len"]
        self.num_stages = len(manifest["plan"]["stages"])
        self.num_layers = len(manifest["plan"]["visual_tokens_per_layer"])
        self.pad_id = manifest["pad_token_id"]

    @classmethod
    def load(cls, bundle: str | Path, providers: list[str] | None = None, threads: int | None = None) -> Engine:
        """Open a bundle, verifying every file against the manifest's hashes. ``providers`` defaults to the
        bundle target's (GPU execution providers first for onnxruntime-gpu, falling back to CPU); ``threads``
        caps each session's intra-op threads (default: ONNX Runtime's, one per physical core)."""
        from transformers import AutoProcessor

        from clse_fx.export.bundle import read_manifest
        from clse_fx.export.onnxruntime import OnnxSession, select_providers

        bundle = Path(bundle)
        if not bundle.is_dir():
            raise FileNotFoundError(f"bundle {bundle} does not exist; compile one with clse-compile")
        manifest = read_manifest(bundle, verify=True)
        graphs = manifest["graphs"]
        providers = providers or select_providers(manifest.get("target", "onnxruntime"))

        def session(name: str):
            path = bundle / graphs[name]["file"]
            if path.suffix == ".pt2":  # an AOTInductor package (the aot-inductor target): needs torch
                from clse_fx.export.aot_inductor import AotiSession

                return AotiSession(path, graphs[name], manifest.get("device", "cpu"))
            return OnnxSession(path, providers, threads)

        prefill, decode = session("prefill"), session("decode")
        has_processor = any(name.endswith("processor_config.json") for name in manifest["files"])
        processor = AutoProcessor.from_pretrained(bundle, trust_remote_code=False) if has_processor else None
        pipeline = manifest.get("pipeline", [])
        input_graphs = {name: session(name) for name in pipeline}
        return cls(bundle, manifest, prefill, decode, processor, input_graphs)

    def encode(self, images: list, prompts: list[str], chat: bool = False) -> dict[str, np.ndarray]:
        """Prompts and images -> the compiled [B, S] input_ids / attention_mask and pixel_values (left padded)."""
        if self.processor is None:
            raise ValueError(
                "this bundle has no processor files, so it cannot run from text and images; recompile from a "
                "checkpoint dir with its processor, or feed token ids and pixels to Engine.generate_ids"
            )
        image_token = self.processor.image_token
        rows, pixels = [], []
        for prompt, image in zip(prompts, images):
            if not prompt or not prompt.strip():
                raise ValueError("empty prompt: give the question to ask about the image")
            row_images = image if isinstance(image, (list, tuple)) else [image]
            if len(row_images) != self.images_per_prompt:
                raise ValueError(f"the bundle was compiled for {self.images_per_prompt} image(s) per prompt")
            if image_token not in prompt:
                prompt = f"{image_token * len(row_images)}\n{prompt}"
            if chat:
                prompt = self._chat(prompt)
            encoded = self.processor(images=row_images, text=prompt, return_tensors="np")
            ids = encoded["input_ids"][0]
            if len(ids) > self.sequence_length:
                text_tokens = len(ids) - (self.sequence_length - self.text_len)
                raise ValueError(
                    f"the prompt has {text_tokens} text tokens but the bundle was compiled for at most "
                    f"{self.text_len}; shorten it or recompile with --text-len {text_tokens}"
                )
            rows.append(ids)
            pixels.append(encoded["pixel_values"])
        input_ids = np.full((len(rows), self.sequence_length), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros_like(input_ids)
        for i, ids in enumerate(rows):
            input_ids[i, -len(ids) :] = ids
            attention_mask[i, -len(ids) :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": np.concatenate(pixels).astype(np.float32),
        }

    def _chat(self, prompt: str) -> str:
        tokenizer = self.processor.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "this bundle's tokenizer has no chat template; ask without chat, with the prompt in the model's format"
            )
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(
        self,
        images: list,
        prompts: list[str],
        max_new_tokens: int = 32,
        sampling: SamplingConfig = GREEDY,
        stop_token_ids: list[int] | None = None,
        chat: bool = False,
    ) -> list[Generation]:
        """Answer each (image, prompt) pair; batches of any size are run in chunks of the compiled batch. One
        generator, seeded with ``sampling.seed``, serves every chunk of the call."""
        _check_sampling(sampling)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one per prompt")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        positions = self.manifest.get("max_position_embeddings")
        if positions and self.sequence_length + max_new_tokens > positions:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} runs past the model's {positions} positions after a "
                f"{self.sequence_length}-token prompt; ask for at most {positions - self.sequence_length}"
            )
        if not prompts:
            return []
        stops = set(self.default_stops() if stop_token_ids is None else stop_token_ids)
        rng = sampling.rng()
        results: list[Generation] = []
        for start in range(0, len(prompts), self.batch):
            chunk = list(range(start, min(start + self.batch, len(prompts))))
            # Fill a short last chunk with copies of its last row; their outputs are dropped.
            rows = chunk + [chunk[-1]] * (self.batch - len(chunk))
            feeds = self.encode([images[i] for i in rows], [prompts[i] for i in rows], chat)
            ids, timings = self.generate_ids(feeds, max_new_tokens, sampling, rng, stops)
            for row in range(len(chunk)):
                tokens = ids[row]
                text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
                results.append(Generation(token_ids=tokens, text=text, timings=timings))
        return results

    def default_stops(self) -> list[int]:
        """The model's end-of-sequence token ids, from the manifest."""
        eos = self.manifest.get("eos_token_id")
        return [] if eos is None else eos if isinstance(eos, list) else [eos]

    def generate_ids(
        self,
        feeds: dict[str, np.ndarray],
        max_new_tokens: int,
        sampling: SamplingConfig = GREEDY,
        rng: np.random.Generator | None = None,
        stops: set[int] = frozenset(),
    ) -> tuple[list[list[int]], Timings]:
        """Prefill + decode on compiled-shape feeds; per row the new ids, cut after the first stop token.
        ``rng`` defaults to ``sampling.rng()``."""
        _check_sampling(sampling)
        self.check_feeds(feeds)
        decode_names = list(self.decode.inputs)[3:]

        def decode(input_ids, position_ids, pad_counts, past):
            return self.decode.run(
                input_ids=input_ids, position_ids=position_ids, pad_counts=pad_counts, **dict(zip(decode_names, past))
            )

        start = time.perf_counter()
        feeds = self.run_input_graphs(feeds)
        pipeline_ms = (time.perf_counter() - start) * 1e3
        rows, timings = generation_loop(
            lambda feeds: self.prefill.run(**feeds),
            decode,
            feeds,
            self.num_stages,
            max_new_tokens,
            sampling,
            rng,
            stops,
        )
        timings.prefill_ms += pipeline_ms
        return rows, timings

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """:func:`check_prompt_feeds` against this bundle's compiled geometry (bundles written before the
        manifest named every visual token id and count fall back to the image token and ``num_visual``)."""
        geometry, manifest = self.manifest["geometry"], self.manifest
        check_prompt_feeds(
            np.asarray(feeds["input_ids"]),
            np.asarray(feeds["attention_mask"]),
            (self.batch, self.sequence_length),
            manifest.get("visual_token_ids", [manifest["image_token_id"]]),
            geometry.get("visual_tokens_per_prompt", geometry["num_visual"]),
        )

    def run_input_graphs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the bundle's pre-prefill graphs (e.g. vision tower, M-RoPE index) in order, adding their outputs."""
        feeds = dict(feeds)
        for name, session in self.input_graphs.items():
            outputs = session.run(**{key: feeds[key] for key in session.inputs if key in feeds})
            feeds.update(zip((o["name"] for o in self.manifest["graphs"][name]["outputs"]), outputs))
        return feeds


def generation_loop(
    prefill: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
    decode: Callable[[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]], list[np.ndarray]],
    feeds: dict[str, np.ndarray],
    num_stages: int,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    rng: np.random.Generator | None = None,
    stops: set[int] = frozenset(),
) -> tuple[list[list[int]], Timings]:
    """The prefill + decode loop over any engine: ``prefill(feeds)`` returns the prefill graph's outputs and
    ``decode(input_ids, position_ids, pad_counts, past)`` the decode graph's; ``sampling`` picks each token,
    drawing from ``rng`` (default ``sampling.rng()``); per row the new ids, cut after the first stop token."""
    rng = sampling.rng() if rng is None else rng
    start = time.perf_counter()
    prefilled = prefill(feeds)
    prefill_ms = (time.perf_counter() - start) * 1e3
    past = list(prefilled[2 + num_stages :])
    timings = Timings(prefill_ms=prefill_ms, kv_cache_bytes=int(sum(t.nbytes for t in past)))
    batch, seq = feeds["input_ids"].shape
    pad_counts = (seq - feeds["attention_mask"].sum(axis=1)).astype(np.int64)
    # Decode positions continue after the unpruned prompt, shifted by the rope deltas where M-RoPE made them.
    positions = (seq + feeds.get("rope_deltas", np.zeros(batch, np.int64)))[:, None].astype(np.int64)
    token = sampling.next_token(prefilled[0][:, -1], rng)
    generated, done = [token], np.isin(token, list(stops))
    start = time.perf_counter()
    steps = 0
    for step in range(max_new_tokens - 1):
        if done.all():
            break
        logits, *new = decode(token[:, None], positions + step, pad_counts, past)
        past = [np.concatenate([p, n], axis=2) for p, n in zip(past, new)]
        token = sampling.next_token(logits[:, -1], rng)
        generated.append(token)
        done |= np.isin(token, list(stops))
        steps += 1
    timings.decode_ms_per_token = (time.perf_counter() - start) * 1e3 / max(steps, 1)
    ids = np.stack(generated, axis=1)
    rows = []
    for row in ids.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
    return rows, timings
