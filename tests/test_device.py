"""Device-clean code: every tensor the reference, the pass-built prefill and the decode step create lives on the
device of its inputs. A CPU stand-in for a GPU run: model and inputs stay on the CPU while the default device is
"meta", so any tensor created without an explicit device lands on meta and the run fails ("Cannot copy out of
meta tensor") or returns meta tensors."""

import copy

import pytest
import torch

from clse_fx.compiler import prune_prefill
from clse_fx.decode import DecodeStep, InPlaceDecodeStep, decode_example, equal_lengths
from clse_fx.models.llava import LlavaAdapter
from clse_fx.plan import PruneConfig, plan_budget, scored_count
from clse_fx.reference import reference_generate, reference_prune
from clse_fx.trace import constants_on_device

from .conftest import prompt_ids
from .test_layouts import LAYOUT


def _flat(*values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        else:
            yield from _flat(*value)


@pytest.mark.parametrize(
    ("score", "merge", "kv_policy", "segmented"),
    [
        ("clse_attn", "none", "uniform", False),
        ("uniform", "tome", "per-layer", False),
        ("clse_attn", "none", "uniform", True),
        ("dart", "none", "uniform", False),  # the peers' selections and their row-by-row oracles
        ("cdpruner", "none", "uniform", False),
    ],
)
def test_meta_default_device_changes_nothing(tiny_llava, monkeypatch, score, merge, kv_policy, segmented):
    ids = prompt_ids(tiny_llava, [[5, "img", 7, 8, 9], [5, 7, 8, "img", 9]])
    mask = torch.ones_like(ids)
    mask[0, 0] = 0  # a padded row: the padding mask is gathered too
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    scored = 36
    if segmented:  # the image tokens read as grids plus extra tokens (tests/test_layouts.py's layout)
        monkeypatch.setattr(LlavaAdapter, "visual_layout", lambda self, num_visual, **inputs: LAYOUT)
        scored = scored_count(LAYOUT)
    plan = plan_budget(None, 4, scored, stages="1:20,3:6")
    prune = PruneConfig(plan=plan, score=score, merge=merge, kv_policy=kv_policy)

    def run(model):
        reference = reference_prune(model, prune, **inputs)
        generated = reference_generate(model, prune, ids, pixels, mask, max_new_tokens=3)
        prefill = prune_prefill(model, prune, inputs)()
        step = DecodeStep(model)(*decode_example(prefill.cache))
        in_place = InPlaceDecodeStep(model, equal_lengths(prefill.cache))(*decode_example(prefill.cache))
        return [reference.logits, reference.kept, reference.cache, generated, prefill.logits, prefill.kept] + [
            prefill.cache,
            step,
            in_place,
        ]

    expected = list(_flat(run(tiny_llava)))
    model = copy.deepcopy(tiny_llava)  # its own trace, made under the meta default
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        got = list(_flat(run(model)))
    finally:
        torch.set_default_device(previous)
    assert len(got) == len(expected)
    for have, want in zip(got, expected):
        assert have.device.type == "cpu"
        assert have.shape == want.shape and torch.allclose(have, want, atol=1e-6)


def test_program_constants_live_on_the_inputs_device(tiny_llava):
    """torch.export keeps a tensor built from data (the spectral filter's circulants) as a CPU constant copied to
    the device on every run, which blocks CUDA-graph capture (seen on an H200); `constants_on_device` stores them on
    the device and updates the export's metadata assertions, so the program's only copy is device-side. Checked
    here with "meta" standing in for the GPU."""
    ids = prompt_ids(tiny_llava, [[5, "img", 7, 8, 9]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 48, 48)}
    program = prune_prefill(tiny_llava, PruneConfig(plan=plan_budget(None, 4, 36, stages="1:20")), inputs).program
    assert program.constants, "the spectral stage should hold its filter as constants"
    constants_on_device(program, torch.device("meta"))
    assert {value.device.type for value in program.constants.values()} == {"meta"}
    names = program.graph_signature.inputs_to_lifted_tensor_constants
    checks = [
        node
        for node in program.graph.nodes
        if node.target is torch.ops.aten._assert_tensor_metadata.default
        and any(arg.op == "placeholder" and arg.name in names for arg in node.args[0].all_input_nodes + [node.args[0]])
    ]
    assert checks and {node.kwargs["device"].type for node in checks} == {"meta"}
    assert "device(type='meta')" in program.module().code  # the unlifted module is rebuilt from the graph
