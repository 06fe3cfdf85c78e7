"""Run a compiled bundle end to end: text and pixels -> pruned prefill engine -> decode engine -> text."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clse_fx.deploy.loop import (
    GREEDY,
    SamplingConfig,
    Timings,
    check_finite_feeds,
    check_prompt_feeds,
    check_sampling,
    check_valid_rows,
    decode_start,
    generation_loop,
)
from clse_fx.deploy.manifest import KV_IN_GRAPH, Manifest, split_prefill_outputs
from clse_fx.deploy.preprocess import Preprocessor
from clse_fx.deploy.preprocess.media import DEFAULT_LIMITS, check_image
from clse_fx.deploy.session import bound_decode, widened_weights_fit


@dataclass
class Generation:
    """One prompt's answer: generated token ids (up to and including a stop token), their text, and per stage the
    visual token ids (0..N-1, grid order) the prefill kept."""

    token_ids: list[int]
    text: str
    timings: Timings = field(default_factory=Timings)
    kept_ids: list[list[int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what in the prompt the model cannot read


def graph_weight_bytes(graph: dict, element_type: int = 16) -> int:
    """Bytes of a manifest graph's external weights of ``element_type`` (ONNX's; 16: bfloat16)."""
    return sum(entry["length"] for entry in graph.get("initializers", {}).values() if entry["type"] == element_type)


class Engine:
    """A loaded bundle. Feeds must match the compiled geometry; text and pixels are fitted to it by the bundle's
    preprocessing recipe."""

    def __init__(
        self, bundle: Path, manifest: Manifest, prefill, decode, preprocessor, input_graphs=None, weights=None
    ) -> None:
        self.bundle, self.manifest, self.weights = bundle, manifest, weights  # weights: its sessions' BundleWeights
        self.prefill, self.decode, self.preprocessor = prefill, decode, preprocessor
        self.input_graphs = input_graphs or {}  # name -> session, run in order before the prefill
        geometry = manifest.geometry
        self.batch, self.sequence_length = manifest.batch, manifest.sequence_length
        self.images_per_prompt, self.text_len = geometry["images"], geometry["text_len"]
        self.num_stages, self.num_layers = manifest.num_stages, manifest.num_layers
        self.pad_id = manifest.pad_token_id
        self.image_limits = DEFAULT_LIMITS  # what generate() accepts (clse-run and clse-serve set their flags')

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        providers: list[str] | None = None,
        threads: int | None = None,
        verify_key: str | Path | None = None,
    ) -> Engine:
        """Open a bundle, verifying it first (:func:`clse_fx.deploy.verify.open_bundle`: every file against the
        manifest's hashes, each graph's weights against the manifest's table, and with ``verify_key``, an OpenSSF
        model-signing public key, the manifest's signature). ``providers`` defaults to the bundle target's (GPU
        execution providers first for onnxruntime-gpu, falling back to CPU); ``threads`` caps each session's
        intra-op threads (default: ONNX Runtime's, one per physical core)."""
        from clse_fx.deploy.manifest import DECODE, PREFILL
        from clse_fx.deploy.session import OnnxSession, select_providers
        from clse_fx.deploy.verify import check_unchanged, open_bundle
        from clse_fx.deploy.weights import BundleWeights

        bundle = Path(bundle)
        if bundle.is_file():
            raise FileNotFoundError(
                f"{bundle} is a file; pass the bundle directory (the folder with manifest.json), e.g. {bundle.parent}"
            )
        if not bundle.is_dir():
            raise FileNotFoundError(f"bundle {bundle} does not exist; compile one with clse-compile")
        verified = open_bundle(bundle, verify_key)
        manifest = verified.manifest
        graphs, vocab = manifest.graphs, manifest.vocab_size()
        providers = providers or select_providers(manifest.target)
        # On the CPU every session reads the weights from one guarded mapping; GPU providers copy them to the device.
        weights = BundleWeights(verified) if providers[0] == "CPUExecutionProvider" else None

        def session(name: str):
            path = bundle / graphs[name]["file"]
            if path.suffix == ".pt2":  # an AOTInductor package (the aot-inductor target): needs torch
                from clse_fx.deploy.aoti import AotiSession

                return AotiSession(path, graphs[name], manifest.device, vocab)
            shared = weights.initializers(name) if weights else None
            # Quantized graphs compute in float32 whatever the checkpoint's type (clse_fx/export/quantize.py).
            dtype = "float32" if manifest.quantization else manifest.dtype
            # Each session packs its own copy of the weights it prepacks (ONNX Runtime's Python API cannot share
            # them between sessions). Float products in the prefill run as fast from the mapped weights (a 1/8-width
            # LLaVA-1.5 fp32 prefill: +7% time, -470 MB of packed copies), the decode step's not (its per-token
            # products are 10% slower unpacked) nor quantized ones anywhere (MatMulNBits unpacked: 1.6x the
            # prefill, 12x the decode step).
            prepack = name == DECODE or manifest.quantization is not None
            # The decode step reads every weight per token: a bfloat16 one runs from float32 copies where they fit.
            widen = name == DECODE and dtype == "bfloat16" and widened_weights_fit(graph_weight_bytes(graphs[name]))
            return OnnxSession(path, providers, threads, dtype, shared, weights, vocab, prepack, widen)

        prefill, decode = session(PREFILL), session(DECODE)
        preprocessor = Preprocessor(bundle, manifest.preprocess) if manifest.preprocess else None
        input_graphs = {name: session(name) for name in manifest.pipeline}
        if weights is not None and manifest.quantization:
            # Every quantized product was packed into its session's memory while loading: the mapped weights it
            # was packed from (6.8 GiB at 7B int8) are not read again, and pages that are come back from the cache.
            weights.drop_resident()
        for name in verified.identities:  # graphs and tokenizer were read by path after verification
            check_unchanged(verified, name)
        return cls(bundle, manifest, prefill, decode, preprocessor, input_graphs, weights)

    def check_bundle(self) -> None:
        """Raise :class:`~clse_fx.deploy.weights.BundleChangedError` if a weights file this engine maps changed on
        disk since it was loaded (the engine then refuses every run; a health check can replace it)."""
        if self.weights is not None:
            self.weights.check()

    def encode(self, media: list, prompts: list[str], chat: bool = False) -> dict[str, np.ndarray]:
        """Prompts and their images (or videos: lists of frames) -> the compiled [B, S] input_ids /
        attention_mask (left padded) and the pixel feeds, by the bundle's preprocessing recipe. A prompt's
        media is one item or a list of items (images); a video is always a list of frames."""
        if self.preprocessor is None:
            raise ValueError(
                "this bundle has no preprocessing recipe, so it cannot run from text and pixels; recompile from a "
                "checkpoint dir with its processor, or feed token ids and pixels to Engine.generate_ids"
            )
        video = self.preprocessor.modality == "video"
        rows, items = [], []
        for prompt, item in zip(prompts, media):
            row = [item] if video or not isinstance(item, (list, tuple)) else list(item)
            if len(row) != self.images_per_prompt:
                raise ValueError(
                    f"the bundle was compiled for {self.images_per_prompt} {self.preprocessor.modality}(s) per prompt"
                )
            if video and any(len(frames) != self.preprocessor.frames for frames in row):
                raise ValueError(
                    f"the bundle was compiled for videos of {self.preprocessor.frames} frames; sample that many "
                    "(clse_fx.deploy.preprocess.media.load_video does)"
                )
            for image in (frame for entry in row for frame in (entry if video else [entry])):
                check_image(image, self.image_limits)  # before any resize: a 50000x1 image would take GBs
            ids = self.preprocessor.encode_text(prompt, len(row), chat)
            if len(ids) > self.sequence_length:
                text_tokens = len(ids) - (self.sequence_length - self.text_len)
                raise ValueError(
                    f"the prompt has {text_tokens} text tokens but the bundle was compiled for at most "
                    f"{self.text_len}; shorten it or recompile with --text-len {text_tokens}"
                )
            rows.append(ids)
            items.append(row)
        input_ids = np.full((len(rows), self.sequence_length), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros_like(input_ids)
        for i, ids in enumerate(rows):
            input_ids[i, -len(ids) :] = ids
            attention_mask[i, -len(ids) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, **self.preprocessor.pixel_feeds(items)}

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
        check_sampling(sampling)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one per prompt")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        positions, limit = self.manifest.max_position_embeddings, self.manifest.runtime.max_new_tokens
        if limit is not None and max_new_tokens > limit:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} runs past the model's {positions} positions after a "
                f"{self.sequence_length}-token prompt; ask for at most {limit}"
            )
        if not prompts:
            return []
        stops = set(self.manifest.stop_token_ids() if stop_token_ids is None else stop_token_ids)
        rng = sampling.rng()
        results: list[Generation] = []
        for start in range(0, len(prompts), self.batch):
            chunk = list(range(start, min(start + self.batch, len(prompts))))
            # Fill a short last chunk with copies of its last row; their outputs are dropped.
            rows = chunk + [chunk[-1]] * (self.batch - len(chunk))
            feeds = self.encode([images[i] for i in rows], [prompts[i] for i in rows], chat)
            kept: list[np.ndarray] = []
            ids, timings = self.generate_ids(feeds, max_new_tokens, sampling, rng, stops, kept_out=kept)
            for row in range(len(chunk)):
                tokens = ids[row]
                text = self.preprocessor.decode(tokens)
                stages = [stage[row].tolist() for stage in kept]
                warned = self.preprocessor.prompt_warnings(prompts[chunk[row]], chat)
                results.append(Generation(tokens, text, timings, kept_ids=stages, warnings=warned))
        return results

    def generate_ids(
        self,
        feeds: dict[str, np.ndarray],
        max_new_tokens: int,
        sampling: SamplingConfig = GREEDY,
        rng: np.random.Generator | None = None,
        stops: set[int] = frozenset(),
        kept_out: list | None = None,
    ) -> tuple[list[list[int]], Timings]:
        """Prefill + decode on compiled-shape feeds; per row the new ids, cut after the first stop token.
        ``rng`` defaults to ``sampling.rng()``; ``kept_out``, if given, receives each stage's [B, keep] kept visual
        ids."""
        check_sampling(sampling)
        self.check_feeds(feeds)
        decode = bound_decode(self.decode, self.manifest.runtime.kv_cache_update == KV_IN_GRAPH)

        start = time.perf_counter()
        feeds = self.run_input_graphs(feeds)
        pipeline_ms = (time.perf_counter() - start) * 1e3
        runtime = self.manifest.runtime
        rows, timings = generation_loop(
            functools.partial(self.run_prefill, kept_out=kept_out),
            decode,
            feeds,
            decode_start(feeds, runtime.decode_position_start, runtime.position_offset_input),
            max_new_tokens,
            sampling,
            rng,
            stops,
        )
        timings.prefill_ms += pipeline_ms
        return rows, timings

    def run_prefill(
        self, feeds: dict[str, np.ndarray], kept_out: list | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The prefill graph on (pipeline-completed) feeds: its logits and every layer's pruned key and value
        (``kept_out``, if given, receives each stage's kept visual ids)."""
        logits, _, kept, cache, valid = split_prefill_outputs(self.prefill.run(**feeds), self.num_stages)
        check_valid_rows(valid)
        if kept_out is not None:
            kept_out.extend(kept)
        return logits, cache

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """:func:`check_prompt_feeds` and :func:`check_finite_feeds` against this bundle's compiled geometry
        (bundles written before the manifest named every visual token id and count fall back to the image token
        and ``num_visual``)."""
        geometry, manifest = self.manifest.geometry, self.manifest
        check_prompt_feeds(
            np.asarray(feeds["input_ids"]),
            np.asarray(feeds["attention_mask"]),
            (self.batch, self.sequence_length),
            manifest.visual_token_ids,
            geometry.get("visual_tokens_per_prompt", geometry["num_visual"]),
            manifest.vocab_size(),
        )
        check_finite_feeds(feeds)

    def run_input_graphs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the bundle's pre-prefill graphs (e.g. vision tower, M-RoPE index) in order, adding their outputs."""
        feeds = dict(feeds)
        for name, session in self.input_graphs.items():
            outputs = session.run(**{key: feeds[key] for key in session.inputs if key in feeds})
            feeds.update(zip((o["name"] for o in self.manifest.graphs[name]["outputs"]), outputs))
        return feeds
