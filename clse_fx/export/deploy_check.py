"""Compile-time verification through the deploy path, on inputs with the statistics of real images.

The builders' parity checks feed random example tensors straight into each graph. Real images differ in two ways
that have hidden bugs: large flat regions (many visual tokens with equal hidden states, saturated scores, exact
ties in the top-K) and the preprocessor's array layout (a transposed HWC -> CHW view). So every built target also
runs, the way users run it (a bundle through :class:`~clse_fx.deploy.engine.Engine`'s sessions and input graphs,
the torch-compile target through its compiled module), on a constant image and on an image of flat rectangles
with edges, and its kept visual ids and last logits are compared with the eager reference pruner's on the same
inputs. A divergence fails the compile, naming the target and the stage.
"""

from __future__ import annotations

import functools
import gc
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from clse_fx.compiler import PrefillOutputs
from clse_fx.cpu_half import float32_matmuls
from clse_fx.deploy.loop import SamplingConfig, decode_start, generation_loop
from clse_fx.deploy.manifest import split_prefill_outputs
from clse_fx.deploy.session import as_array
from clse_fx.reference import reference_prune
from clse_fx.resident import page_out_weights
from clse_fx.trace import graph_inputs

# Largest |last-position logits - reference| allowed, relative to the reference's largest |logit|: float32 engines
# agree to ~1e-5 (ONNX Runtime, Inductor); half precision rounds each layer. A wrong layout or gather is O(1).
LOGITS_RELATIVE_BOUND = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}
# How close to the cut (relative) a token's reference score must be for a target to keep it instead of another:
# engines round differently, so tokens whose scores are that close to the K-th best may legitimately trade places
# (most in half precision); a token far from the cut kept or dropped by one side only is a divergence.
NEAR_TIE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def near_tie_flips(have: torch.Tensor, want: torch.Tensor, scores: torch.Tensor, tolerance: float) -> int | None:
    """How many visual ids one side keeps and the other does not, per stage and summed over rows, when every such
    id's reference score is within ``tolerance`` (relative) of that row's cut; None when one is not (a divergence).
    ``have``/``want`` [B, keep] kept ids, ``scores`` [B, N] the reference's scores by visual id."""
    flips = 0
    for row_have, row_want, row_scores in zip(have.tolist(), want.tolist(), scores):
        differing = sorted(set(row_have) ^ set(row_want))
        if not differing:
            continue
        cut = row_scores[row_want].min()
        close = (row_scores[differing] - cut).abs() <= tolerance * max(1.0, float(cut.abs()))
        if not bool(close.all()):
            return None
        flips += len(differing) // 2
    return flips


def constant_image(pixels: torch.Tensor) -> torch.Tensor:
    """Every pixel the same value: patches differ only by the vision tower's position embeddings, so spectral scores
    saturate and tie (31 of 36 tokens on the tests' tiny LLaVA) and the tie rule decides at the cut."""
    return torch.full_like(pixels, 0.25)


def flat_regions(pixels: torch.Tensor) -> torch.Tensor:
    """A background and two rectangles of other colours (a handful of distinct values, sharp edges). Image tensors
    ([..., C, H, W]) get the rectangles in pixel space; patchified ones ([N, D]) get runs of identical rows."""
    out = torch.full_like(pixels, -0.6)
    if pixels.dim() >= 4:
        h, w = pixels.shape[-2:]
        out[..., : h // 2, w // 4 : 3 * w // 4] = 1.1
        out[..., 1, 3 * h // 5 : 9 * h // 10, : w // 3] = 0.4  # one channel differs: a second colour
        return out
    rows = torch.arange(pixels.shape[0], device=pixels.device)
    return torch.where(((rows // max(1, pixels.shape[0] // 6)) % 2 == 0)[:, None], out, torch.full_like(out, 0.9))


IMAGES = {"constant": constant_image, "flat regions": flat_regions}


def with_pixels(inputs: dict[str, torch.Tensor], make: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """``inputs`` with every pixel tensor replaced by ``make`` of it."""
    return {k: make(v) if k.startswith("pixel") and v.is_floating_point() else v for k, v in inputs.items()}


def as_deploy_feeds(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Processor-style tensors as the preprocessor hands them to an engine: numpy, images as a transposed (HWC
    stored, CHW viewed) array rather than a contiguous one."""
    feeds = {}
    for name, tensor in inputs.items():
        array = as_array(tensor)
        if name.startswith("pixel") and array.ndim >= 4:
            array = np.moveaxis(np.ascontiguousarray(np.moveaxis(array, -3, -1)), -1, -3)
        feeds[name] = array
    return feeds


def _quiet_load(bundle: Path):
    """:meth:`Engine.load` without its warnings (e.g. onnxruntime-gpu's CPU fallback: the user's own first load
    should say it)."""
    from clse_fx.deploy.engine import Engine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Engine.load(bundle)


def bundle_runner(bundle: Path) -> Callable[[dict[str, torch.Tensor]], PrefillOutputs]:
    """The bundle's prefill as :class:`Engine` runs it: loaded (hash-checked) from disk at the first run (after
    :func:`check`'s references: one set of weights in memory at a time), input graphs first."""
    load = functools.cache(functools.partial(_quiet_load, bundle))

    def run(inputs: dict[str, torch.Tensor]) -> PrefillOutputs:
        engine = load()
        feeds = engine.run_input_graphs(as_deploy_feeds(inputs))
        logits, positions, kept, _, valid = split_prefill_outputs(engine.prefill.run(**feeds), engine.num_stages)
        as_tensors = [torch.from_numpy(np.asarray(a)) for a in (logits, positions, valid)]
        return PrefillOutputs(*as_tensors[:2], [torch.from_numpy(k) for k in kept], [], as_tensors[2])

    return run


def module_runner(model, module) -> Callable[[dict[str, torch.Tensor]], PrefillOutputs]:
    """An in-process compiled prefill (the torch-compile target's engine) on processor-style inputs."""
    return lambda inputs: module(*graph_inputs(model, inputs).values()).cpu()


def check(
    target: str, run: Callable[[dict[str, torch.Tensor]], PrefillOutputs], model, prune, inputs, *, own_weights=False
) -> dict:
    """Run ``run`` and the reference pruner on each of :data:`IMAGES`; the figures for the manifest, or a one-line
    RuntimeError at the first stage that keeps a token the reference scores far from its cut (:func:`near_tie_flips`),
    or on logits past :data:`LOGITS_RELATIVE_BOUND`. Near-tie trades are recorded (stage and count) and end that
    image's comparison: what follows ran on another token set. ``own_weights``: ``run`` holds its own copy of the
    weights (a bundle), so the model's mapped ones are handed back to the kernel once the references are in."""
    dtype = next(model.parameters()).dtype
    bound, tolerance = LOGITS_RELATIVE_BOUND.get(dtype, 1e-1), NEAR_TIE.get(dtype, 5e-2)
    stage_layers = [layer for layer, _ in prune.plan.stages]
    figures = {}
    cases = {name: with_pixels(inputs, make) for name, make in IMAGES.items()}
    # The model's runs first, then the bundle's: at 7B one set of weights is in use at a time
    with torch.no_grad(), float32_matmuls(model):
        references = {name: reference_prune(model, prune, **realistic) for name, realistic in cases.items()}
    if own_weights:
        page_out_weights(model)
    for name, realistic in cases.items():
        expected = references.pop(name)
        with torch.no_grad():
            got = run(realistic)
        key, flipped_at = name.replace(" ", "_"), None
        for stage, (have, want) in enumerate(zip(got.kept, expected.kept)):
            flips = near_tie_flips(have.cpu(), want.cpu(), expected.scores[stage].cpu(), tolerance)
            if flips is None:
                raise RuntimeError(
                    f"{target} diverges from the reference pruner on a {name} image: stage {stage} (before layer "
                    f"{stage_layers[stage]}) keeps visual tokens the reference scores far from its cut; the bundle "
                    "was not written (report this with the model and flags)"
                )
            if flips:  # later stages and the logits ran on another token set: not comparable
                flipped_at = stage
                figures[f"deploy_{key}_near_tie_stage"], figures[f"deploy_{key}_near_tie_tokens"] = stage, flips
                break
        figures[f"deploy_{key}_kept_identical"] = flipped_at is None
        if flipped_at is not None:
            continue
        error = float((got.logits[:, -1].float() - expected.logits[:, -1].float().cpu()).abs().max())
        scale = float(expected.logits[:, -1].float().abs().max()) or 1.0
        if error > bound * scale:
            raise RuntimeError(
                f"{target} diverges from the reference pruner on a {name} image: last logits differ by {error:.3g} "
                f"(bound {bound * scale:.3g}); the bundle was not written (report this with the model and flags)"
            )
        figures[f"deploy_{key}_max_abs_last_logits"] = error
    return figures


# A weight-quantized bundle (--weight-format) cannot keep the reference's exact tokens: it is measured against the
# unquantized model instead, teacher-forced over LOSSY_STEPS greedy tokens (prefill included) on each of
# LOSSY_IMAGES, and must reach each floor: the mean cosine of its logits to the reference's, the share of steps whose
# reference token is in its top 5, and the mean over stages of the share of reference-kept visual tokens it keeps
# too. The floors sit under what each format measures on the tests' tiny random LLaVA (hidden size 64, widened
# weights: the hardest case, near-flat logits; int4 0.76 / 0.69 / 0.70 at worst, int8 0.995 / 1.0 / 0.94) and far
# above a wrong weight, scale or layout (cosine ~0 or negative; overlaps at chance, 0.24 there). The constant image
# is left out: its scores tie, so any rounding reorders the cut.
LOSSY_STEPS = 16
LOSSY_FLOORS = {
    "int8": {"logits_cosine": 0.98, "top5_containment": 0.9, "kept_overlap": 0.8},
    "int4": {"logits_cosine": 0.7, "top5_containment": 0.6, "kept_overlap": 0.5},
}
LOSSY_IMAGES = {"flat regions": flat_regions, "noise": lambda pixels: pixels}  # noise: the example's random pixels


class TeacherForcing(SamplingConfig):
    """Greedy decoding that records each step's logits; given ``tokens`` ([B, steps]) it feeds those instead of
    its own picks, so two engines can be compared step by step on the same context."""

    def __init__(self, tokens: np.ndarray | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "logits", [])

    def next_token(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        step = len(self.logits)
        self.logits.append(np.asarray(logits, dtype=np.float32))
        return super().next_token(logits, rng) if self.tokens is None else self.tokens[:, step].astype(np.int64)


def reference_generation(model, prune, case: dict, positions: np.ndarray, steps: int) -> tuple[TeacherForcing, list]:
    """The unquantized model's greedy generation on ``case``: the eager reference pruner's prefill, then the
    model's own decode step (:class:`~clse_fx.decode.DecodeStep`) over its cache; returns the recorded logits and
    tokens, and the kept visual ids per stage."""
    from clse_fx.decode import DecodeStep

    reference = reference_prune(model, prune, **case)
    device, dtype = reference.logits.device, next(model.parameters()).dtype
    step = DecodeStep(model)

    def prefill(feeds):
        return as_array(reference.logits.float()), [as_array(t) for pair in reference.cache for t in pair]

    def decode(*arrays):
        *small, buffers = arrays
        tensors = [torch.from_numpy(np.asarray(a)).to(device) for a in (*small, *buffers)]
        tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]  # bfloat16 buffers come widened
        return [as_array(t.float() if i == 0 else t) for i, t in enumerate(step(*tensors))]

    feeds = as_deploy_feeds(case)
    recorded = TeacherForcing()
    tokens, _ = generation_loop(prefill, decode, feeds, positions, steps, recorded)
    object.__setattr__(recorded, "tokens", np.array(tokens))
    return recorded, [k.cpu() for k in reference.kept]


def lossy_figures(reference: TeacherForcing, got: TeacherForcing, kept_ref: list, kept_got: list) -> dict:
    """Mean and least logits cosine over steps and rows, top-1 agreement and top-5 containment of the reference's
    tokens, each stage's kept-token overlap (least over rows) and their mean."""
    cosines, top1, top5 = [], [], []
    for step, (want, have) in enumerate(zip(reference.logits, got.logits)):
        tokens = reference.tokens[:, step]
        dots = (want * have).sum(-1) / (np.linalg.norm(want, axis=-1) * np.linalg.norm(have, axis=-1) + 1e-12)
        cosines += dots.tolist()
        top1 += (have.argmax(-1) == tokens).tolist()
        best = np.argsort(have, axis=-1)[:, -5:]
        top5 += [bool(token in row) for token, row in zip(tokens, best)]
    figures = {
        "logits_cosine": float(np.mean(cosines)),
        "logits_cosine_min": float(np.min(cosines)),
        "top1_agreement": float(np.mean(top1)),
        "top5_containment": float(np.mean(top5)),
    }
    overlaps = []
    for stage, (want, have) in enumerate(zip(kept_ref, kept_got)):
        shares = [len(set(w) & set(h)) / max(len(w), 1) for w, h in zip(want.tolist(), np.asarray(have).tolist())]
        figures[f"kept_overlap_stage_{stage}"] = float(min(shares))
        overlaps.append(min(shares))
    figures["kept_overlap"] = float(np.mean(overlaps))
    return figures


def check_lossy(
    weight_format: str, bundle: Path, model, prune, inputs: dict, steps: int = LOSSY_STEPS, accept: bool = False
) -> tuple[dict, list[str]]:
    """Measure a weight-quantized bundle against the unquantized model (see :data:`LOSSY_FLOORS`): the figures for
    the manifest (``lossy_<image>_<measure>``) and the floors missed, one line each. A miss raises a one-line
    RuntimeError naming the first unless ``accept`` (``--accept-lossy``), which keeps the bundle and records them."""
    floors = LOSSY_FLOORS[weight_format]
    cases = {name: with_pixels(inputs, make) for name, make in LOSSY_IMAGES.items()}
    engine = _quiet_load(bundle)
    runtime = engine.manifest.runtime
    feeds = {name: engine.run_input_graphs(as_deploy_feeds(case)) for name, case in cases.items()}
    positions = {
        name: decode_start(f, runtime.decode_position_start, runtime.position_offset_input) for name, f in feeds.items()
    }
    # The model's runs first, then the bundle's, one set of weights in memory at a time: the engine (its
    # sessions' packed weights) is let go while the references run and loaded again after (at 7B the two would
    # not fit in 24 GB together).
    del engine, feeds
    gc.collect()
    with torch.no_grad(), float32_matmuls(model):
        references = {
            name: reference_generation(model, prune, case, positions[name], steps) for name, case in cases.items()
        }
    page_out_weights(model)
    engine = _quiet_load(bundle)
    figures, misses = {}, []
    for name, case in cases.items():
        (reference, kept_ref), key = references[name], name.replace(" ", "_")
        got, kept = TeacherForcing(reference.tokens), []
        engine.generate_ids(as_deploy_feeds(case), steps, got, kept_out=kept)
        measured = lossy_figures(reference, got, kept_ref, kept)
        figures.update({f"lossy_{key}_{measure}": value for measure, value in measured.items()})
        misses += [
            f"{measure.replace('_', ' ')} {value:.3f} < {floors[measure]} on a {name} image"
            for measure, value in measured.items()
            if measure in floors and value < floors[measure]
        ]
    if misses and not accept:
        raise RuntimeError(
            f"the {weight_format} bundle is too far from the unquantized model: {misses[0]} (LOSSY_FLOORS); the "
            "bundle was not written (try --weight-format int8, keep it anyway with --accept-lossy, or report this "
            "with the model and flags)"
        )
    return figures, misses
