"""CLSE-M: pruned visual tokens merged into kept ones (ToMe-style), in the graph and in the oracle."""

import pytest
import torch

from clse_fx.compiler import prune_prefill
from clse_fx.deploy.session import OnnxSession
from clse_fx.export.onnxruntime import export_onnx, input_names
from clse_fx.export.tensorrt_check import check_tensorrt_ready
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import _tome_merge, reference_prune
from clse_fx.scoring import merge_into_kept

from .conftest import prompt_ids


def test_hand_checked_merge():
    # Kept tokens a=(1,0) size 1 and b=(0,1) size 2; dropped c=(3,1) size 1 is closer to a, d=(0,4) size 2 to b.
    kept = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    dropped = torch.tensor([[[3.0, 1.0], [0.0, 4.0]]])
    merged, sizes = merge_into_kept(
        kept, dropped, torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]]), kept, dropped
    )
    assert sizes.tolist() == [[2.0, 4.0]]
    # a' = (1*(1,0) + 1*(3,1)) / 2 = (2, 0.5); b' = (2*(0,1) + 2*(0,4)) / 4 = (0, 2.5)
    assert torch.allclose(merged, torch.tensor([[[2.0, 0.5], [0.0, 2.5]]]))
    # The oracle's eager, row-by-row form agrees (kept = positions 0 and 2 of [a, c, b, d]).
    z = torch.tensor([[[1.0, 0.0], [3.0, 1.0], [0.0, 1.0], [0.0, 4.0]]])
    eager, eager_sizes = _tome_merge(z, z, torch.tensor([[1.0, 1.0, 2.0, 2.0]]), torch.tensor([[0, 2]]))
    assert torch.allclose(eager, merged) and torch.equal(eager_sizes, sizes)


def test_ties_join_the_first_kept_token():
    kept = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    dropped = torch.tensor([[[2.0, 0.0]]])
    _, sizes = merge_into_kept(kept, dropped, torch.ones(1, 2), torch.ones(1, 1), kept, dropped)
    assert sizes.tolist() == [[2.0, 1.0]]


@pytest.fixture(scope="module")
def inputs(tiny_llava):
    ids = prompt_ids(tiny_llava, [[5, "img", 7, 8, 9, 10, 11], [5, 7, 8, 9, 10, "img", 11]])
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


@pytest.mark.parametrize("metric", ["hidden", "keys"])
@pytest.mark.parametrize("stages", ["2:9", "1:20,2:10,3:4"])
def test_pass_equals_reference_with_merging(tiny_llava, inputs, metric, stages):
    plan = plan_budget(None, 4, 36, stages=stages)
    merged = PruneConfig(plan=plan, merge="tome", merge_metric=metric)
    out = prune_prefill(tiny_llava, merged, inputs)()
    ref = reference_prune(tiny_llava, merged, **inputs)
    assert (out.logits - ref.logits[:, -1:]).abs().max() <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip(out.kept, ref.kept))
    for (key, value), (ref_key, ref_value) in zip(out.cache, ref.cache):
        assert (key - ref_key).abs().max() <= 1e-5 and (value - ref_value).abs().max() <= 1e-5
    # Merging changes what later layers see, and the kept set itself is the same as without merging at stage 1.
    dropped = reference_prune(tiny_llava, PruneConfig(plan=plan), **inputs)
    assert (dropped.logits - ref.logits).abs().max() > 1e-2
    assert torch.equal(dropped.kept[0], ref.kept[0])


def test_merging_graph_exports_and_is_tensorrt_ready(tiny_llava, inputs, tmp_path):
    prune = PruneConfig(plan=plan_budget(None, 4, 36, stages="1:20,3:6"), merge="tome")
    pruned = prune_prefill(tiny_llava, prune, inputs)
    path = export_onnx(pruned, tmp_path / "merge.onnx")
    assert check_tensorrt_ready(path) == []
    engine = OnnxSession(path).run(**dict(zip(input_names(pruned), pruned.example_args)))
    assert abs(engine[0] - pruned().logits.numpy()).max() <= 1e-4
