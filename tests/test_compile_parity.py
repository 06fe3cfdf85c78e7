"""The rewritten graph against the oracles: the eager reference pruner and the unmodified model (and FLOP counts
against a real call's)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from clse_fx.compiler import prune_prefill
from clse_fx.metrics import prefill_flops, unpruned_prefill_flops
from clse_fx.passes.strip_asserts import remove_asserts
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import reference_prune
from clse_fx.scoring import SCORE_TYPES
from clse_fx.trace import example_args, trace_prefill

from .conftest import prompt_ids


def _inputs(model, layout, images=1, seed=0):
    """Prompts from ``layout``; pad tokens are masked out of attention_mask (left padding)."""
    ids = prompt_ids(model, layout)
    size = model.config.vision_config.image_size
    inputs = {"input_ids": ids, "attention_mask": (ids != model.config.text_config.pad_token_id).long()}
    if images:
        generator = torch.Generator().manual_seed(seed)
        inputs["pixel_values"] = torch.randn(ids.shape[0] * images, 3, size, size, generator=generator)
    return inputs


def _check_against_reference(model, prune, inputs):
    pruned = prune_prefill(model, prune, inputs)
    out = pruned()
    ref = reference_prune(model, prune, **inputs)
    # The compiled prefill gives the last position's logits (what generation reads); the reference gives all.
    assert out.logits.shape == ref.logits[:, -1:].shape
    assert (out.logits - ref.logits[:, -1:]).abs().max() <= 1e-5
    assert torch.equal(out.positions, ref.positions)
    assert len(out.kept) == len(ref.kept) and all(torch.equal(a, b) for a, b in zip(out.kept, ref.kept))
    # The KV cache after prefill, under the configured policy, matches the reference's layer by layer.
    assert len(out.cache) == len(ref.cache)
    for (key, value), (ref_key, ref_value) in zip(out.cache, ref.cache):
        assert key.shape == ref_key.shape and value.shape == ref_value.shape
        assert (key - ref_key).abs().max() <= 1e-5 and (value - ref_value).abs().max() <= 1e-5
    return pruned, out.logits


TWO_ROWS = [[5, "img", 7, 8, 9, 10, 11], [5, 7, 8, 9, 10, "img", 11]]


@pytest.mark.parametrize(
    ("stages", "score"),
    # Every score through three stages (CDPruner's unrolled greedy steps compile slowly: tests/test_peer_scores.py
    # runs it from layer 0 on); one stage, mid-decoder, with the default score.
    [("1:20,2:10,3:4", score) for score in SCORE_TYPES if score != "cdpruner"] + [("2:9", "clse_attn")],
)
def test_pass_equals_reference_batch2_different_positions(tiny_llava, stages, score):
    kv_policy = "per-layer" if score in ("l2", "random") else "uniform"  # both policies across the matrix
    prune = PruneConfig(plan=plan_budget(None, 4, 36, stages=stages), score=score, kv_policy=kv_policy)
    _check_against_reference(tiny_llava, prune, _inputs(tiny_llava, TWO_ROWS))


def _real_flops(fn, *args) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def test_pass_equals_reference_batch1_scheduled_budget(tiny_llava):
    """Also: FLOPs, counted on fake tensors (clse_fx.metrics), are the count of a real call of each graph."""
    prune, inputs = PruneConfig(plan=plan_budget(8, 4, 36)), _inputs(tiny_llava, [[5, 7, "img", 8, 9, 10]])
    pruned, _ = _check_against_reference(tiny_llava, prune, inputs)
    unpruned = remove_asserts(trace_prefill(tiny_llava, inputs))  # the cached trace
    assert prefill_flops(pruned) == _real_flops(pruned.program.module(), *pruned.example_args)
    flops = unpruned_prefill_flops(tiny_llava, inputs)
    assert flops == _real_flops(unpruned, *example_args(tiny_llava, inputs)) > prefill_flops(pruned)


def test_pass_equals_reference_two_images(tiny_llava):
    layout = [[5, "img", 7, "img", 8], [5, 7, "img", "img", 8]]
    prune = PruneConfig(plan=plan_budget(None, 4, 72, stages="1:30,3:10"))
    _check_against_reference(tiny_llava, prune, _inputs(tiny_llava, layout, images=2))


def test_pass_equals_reference_left_padding(tiny_llava):
    pad = tiny_llava.config.text_config.pad_token_id
    layout = [[pad, pad, 5, "img", 7, 8], [5, 7, "img", 8, 9, 10]]
    prune = PruneConfig(plan=plan_budget(None, 4, 36, stages="1:12"))
    inputs = _inputs(tiny_llava, layout)
    assert inputs["attention_mask"][0, :2].sum() == 0
    _check_against_reference(tiny_llava, prune, inputs)


def test_pass_equals_reference_odd_grid_without_gqa(odd_llava):
    prune = PruneConfig(plan=plan_budget(10, 5, 25), kv_policy="per-layer")
    _check_against_reference(odd_llava, prune, _inputs(odd_llava, [[5, "img", 7, 8], [5, 7, 8, "img"]]))


def test_prompt_without_image_is_unpruned(tiny_llava):
    prune = PruneConfig(plan=plan_budget(None, 4, 36, stages="1:4"))
    inputs = _inputs(tiny_llava, [[5, 7, 8, 9, 10, 11], [11, 10, 9, 8, 7, 5]], images=0)
    pruned, logits = _check_against_reference(tiny_llava, prune, inputs)
    with torch.no_grad():
        plain = tiny_llava(**inputs, logits_to_keep=1).logits
    assert (logits - plain).abs().max() <= 1e-5


@pytest.mark.parametrize("stages", ["1:36", "1:36,2:36,3:36"])
def test_budget_of_all_visual_tokens_changes_no_output(tiny_llava, stages):
    inputs = _inputs(tiny_llava, TWO_ROWS)
    prune = PruneConfig(plan=plan_budget(None, 4, 36, stages=stages))
    pruned = prune_prefill(tiny_llava, prune, inputs)
    out = pruned()
    with torch.no_grad():
        plain = tiny_llava(**inputs, logits_to_keep=1).logits
    assert (out.logits - plain).abs().max() <= 1e-5
    assert torch.equal(out.positions, torch.arange(inputs["input_ids"].shape[1]).expand(2, -1))
    assert all(torch.equal(k, torch.arange(36).expand(2, -1)) for k in out.kept)
