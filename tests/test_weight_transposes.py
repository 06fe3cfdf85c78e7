"""The memory-lean ONNX export: ``Transpose(weight)`` folded into lazily computed initializers gives the graph
the optimizer would have made (same ops, same weights, same answers), without holding a transposed copy of
every weight until the save; float16 sessions on the CPU keep the weights memory-mapped and answer as the
default session does."""

from __future__ import annotations

import collections
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest
import torch

from clse_fx.deploy.session import OnnxSession
from clse_fx.export.weight_transposes import defer_weight_transposes


class TwoLinears(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 48), torch.nn.Linear(48, 16, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _export(module, x, optimize: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (x,))
        return torch.onnx.export(program, (), input_names=["x"], output_names=["y"], dynamo=True, optimize=optimize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deferred_transposes_give_the_optimizers_graph_and_answers(tmp_path, dtype):
    torch.manual_seed(0)
    module, x = (
        TwoLinears().to(dtype).eval(),
        torch.randn(2, 3, 16, dtype=dtype),
    )  # 3-D: MatMul(x, Transpose(W)), as in a decoder
    reference = _export(module, x, optimize=True)
    lean = _export(module, x, optimize=False)
    assert defer_weight_transposes(lean.model) == 2
    lazy = [v.const_value for v in lean.model.graph.initializers.values() if isinstance(v.const_value, ir.LazyTensor)]
    assert len(lazy) == 2  # nothing transposed in memory before the save
    lean.optimize()
    paths = {}
    for name, program in (("reference", reference), ("lean", lean)):
        paths[name] = tmp_path / f"{name}.onnx"
        program.save(str(paths[name]), external_data=True)
    graphs = {name: onnx.load(str(path)) for name, path in paths.items()}
    ops = {name: collections.Counter(node.op_type for node in g.graph.node) for name, g in graphs.items()}
    assert ops["lean"] == ops["reference"] and ops["lean"]["Transpose"] == 0
    weights = {
        name: sorted(onnx.numpy_helper.to_array(t).tobytes() for t in g.graph.initializer) for name, g in graphs.items()
    }
    assert weights["lean"] == weights["reference"]  # the same transposed weights, bit for bit
    feeds = {"x": x.numpy()}
    answers = {
        name: OnnxSession(path, dtype=str(dtype).removeprefix("torch.")).run(**feeds)[0] for name, path in paths.items()
    }
    np.testing.assert_array_equal(answers["lean"], answers["reference"])
    expected = module(x).detach().float().numpy()
    np.testing.assert_allclose(answers["lean"].astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def test_float16_cpu_sessions_keep_the_weights_mapped_and_answer_as_the_default(tmp_path):
    torch.manual_seed(0)
    module, x = TwoLinears().half().eval(), torch.randn(2, 3, 16, dtype=torch.float16)
    path = tmp_path / "model.onnx"
    _export(module, x, optimize=True).save(str(path), external_data=True)
    lean = OnnxSession(path, dtype="float16")
    default = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    options = lean.session.get_session_options()
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert not options.enable_cpu_mem_arena
    np.testing.assert_array_equal(lean.run(x=x.numpy())[0], default.run(None, {"x": x.numpy()})[0])
    fp32 = OnnxSession(path).session.get_session_options()  # float32 graphs keep every optimization
    assert fp32.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
