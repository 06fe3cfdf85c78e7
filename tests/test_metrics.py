"""FLOP counts (clse_fx.metrics): counted on fake tensors, they equal FlopCounterMode's count of a real call."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from clse_fx.api import example_inputs, make_plan
from clse_fx.compiler import prune_prefill
from clse_fx.metrics import prefill_flops, unpruned_prefill_flops
from clse_fx.options import CompileOptions
from clse_fx.passes.strip_asserts import remove_asserts
from clse_fx.trace import example_args, trace_prefill


def _real_count(fn, *args) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def test_fake_tensor_counts_equal_a_real_calls(tiny_llava):
    options = CompileOptions(keep=8, batch=2)
    inputs = example_inputs(tiny_llava, options)
    pruned = prune_prefill(tiny_llava, make_plan(tiny_llava, options, inputs), inputs)
    traced = remove_asserts(trace_prefill(tiny_llava, inputs))
    pruned_flops, unpruned_flops = prefill_flops(pruned), unpruned_prefill_flops(tiny_llava, inputs)
    assert pruned_flops == _real_count(pruned.program.module(), *pruned.example_args)
    assert unpruned_flops == _real_count(traced, *example_args(tiny_llava, inputs))
    assert unpruned_flops > pruned_flops > 0
