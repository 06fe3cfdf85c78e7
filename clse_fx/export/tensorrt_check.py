"""Static TensorRT readiness check of an ONNX graph: what TensorRT 10's ONNX parser would reject.

There is no TensorRT here to try a build, so the rules are written down from onnx-tensorrt's operator
support matrix (docs/operators.md) and TensorRT's layer limits, and checked node by node. A finding
names the node, its op, the model layer it was traced from, and what to change.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

# Ops marked "N" in onnx-tensorrt's support matrix.
UNSUPPORTED_OPS = {
    "Bernoulli", "BitShift", "BlackmanWindow", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det",
    "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "MatMulInteger", "MaxRoiPool", "MaxUnpool",
    "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement",
    "OptionalHasElement", "QLinearConv", "QLinearMatMul", "STFT", "SequenceAt", "SequenceConstruct",
    "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss",
    "SplitToSequence", "StringNormalizer", "TfIdfVectorizer", "Unique",
}  # fmt: skip
# Ops whose output shape depends on input values: engines with fixed budgets must not contain them.
DATA_DEPENDENT_OPS = {"NonZero", "Unique", "Compress", "NonMaxSuppression"}
# Ops whose first input TensorRT accepts only in floating types (the matrix lists no integer type).
FLOAT_ONLY_OPS = {"CumSum", "MatMul", "Softmax", "Sqrt", "Exp", "Log", "Sigmoid", "Tanh", "ConstantOfShape"}
# Ops whose data/updates TensorRT takes in numeric types but not BOOL.
NO_BOOL_OPS = {"Scatter", "ScatterElements", "ScatterND", "CumSum"}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
COMPLEX_TYPES = {TensorProto.COMPLEX64, TensorProto.COMPLEX128}
# Inputs TensorRT needs as build-time constants: (op, input index).
CONSTANT_INPUTS = {("TopK", 1), ("CumSum", 1), ("Slice", 3), ("Squeeze", 1), ("Unsqueeze", 1)}
TOPK_MAX_K = 3840
# What to do about an ONNX Runtime contrib op, by op: the in-graph KV decode step's attention, else quantization.
CONTRIB_FIX = {"GroupQueryAttention": "import: the onnxruntime target's decode step; other targets keep a portable one"}
QUANTIZED_FIX = "import; compile without --weight-format for TensorRT"


@dataclass(frozen=True)
class Finding:
    node: str
    op: str
    layer: str
    problem: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}, {self.layer or 'top level'}): {self.problem}"


def _layer(node: onnx.NodeProto) -> str:
    """The deepest module scope the exporter recorded for ``node`` (e.g. ...language_model.layers.3.mlp)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(prop.value)[:-1] if s]
            return scopes[-1] if scopes else ""
    return ""


def check_tensorrt_ready(model: onnx.ModelProto | str | Path) -> list[Finding]:
    """Every node of ``model`` that TensorRT 10's ONNX parser would reject, with the reason."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)  # the rules read the graph, not the weights
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types: dict[str, int] = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        types[value.name] = value.type.tensor_type.elem_type
    constants: dict[str, onnx.TensorProto] = {init.name: init for init in graph.initializer}
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
                types[node.output[0]] = value.data_type
    input_dims = {d.dim_param for v in graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
    value_info = {value.name: value for value in graph.value_info}  # by name: one lookup per node output

    findings: list[Finding] = []
    for node in graph.node:

        def flag(problem: str, node=node) -> None:
            findings.append(Finding(node.name, node.op_type, _layer(node), problem))

        if node.domain not in ("", "ai.onnx"):
            contrib = f"{node.op_type} is an ONNX Runtime contrib op ({node.domain})"
            flag(f"{contrib} that TensorRT's ONNX parser cannot {CONTRIB_FIX.get(node.op_type, QUANTIZED_FIX)}")
        if node.op_type in UNSUPPORTED_OPS:
            flag(f"{node.op_type} is not supported by TensorRT's ONNX parser")
        if node.op_type in DATA_DEPENDENT_OPS:
            flag("output shape depends on input values; use a static-shape formulation")
        for index, name in enumerate(node.input):
            if (node.op_type, index) in CONSTANT_INPUTS and name and name not in constants:
                flag(f"input {index} ({name}) must be a build-time constant")
        if node.op_type in FLOAT_ONLY_OPS and node.input:
            dtype = types.get(node.input[0])
            if dtype is not None and dtype not in FLOAT_TYPES and node.op_type != "ConstantOfShape":
                flag(f"{TensorProto.DataType.Name(dtype)} input, TensorRT takes floating types only; cast first")
        if node.op_type in NO_BOOL_OPS and any(types.get(name) == TensorProto.BOOL for name in node.input[::2]):
            flag("BOOL data, which TensorRT's scatter/cumsum layers do not take; scatter an int or float mask")
        if node.op_type == "ConstantOfShape":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and value.data_type != TensorProto.FLOAT:
                flag(f"{TensorProto.DataType.Name(value.data_type)} fill value, TensorRT takes FLOAT only")
        if node.op_type == "TopK":
            k = constants.get(node.input[1])
            if k is not None and int(onnx.numpy_helper.to_array(k).reshape(-1)[0]) >= TOPK_MAX_K:
                flag(f"K must be below {TOPK_MAX_K} for TensorRT's TopK")
            if any(a.name == "sorted" and a.i == 0 for a in node.attribute):
                flag("TensorRT's TopK returns sorted results only (sorted=0 unsupported)")
        for name in list(node.input) + list(node.output):
            if types.get(name) in COMPLEX_TYPES:
                flag(f"{name} is a complex tensor")
        for value in (value_info[name] for name in node.output if name in value_info):
            for dim in value.type.tensor_type.shape.dim:
                # Expressions of the graph's declared input dims (e.g. "past_0 + 1") are fine for
                # optimisation profiles; "unk__" marks where ONNX shape inference gave up, not TensorRT.
                symbols = set(re.findall(r"[A-Za-z_]\w*", dim.dim_param)) - input_dims
                if symbols and not dim.dim_param.startswith("unk__"):
                    flag(f"{value.name} has a data-dependent dimension {dim.dim_param}")
    return findings
