"""ONNX export of the pruned prefill (static shapes), validation, and an ONNX Runtime session."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from clse_fx.compiler import PrunedPrefill

OPSET = 18
# Ops TensorRT's ONNX parser rejects or that make shapes data-dependent; the compiled graph must have none.
FORBIDDEN_OPS = {"DFT", "STFT", "NonZero", "Unique", "Loop", "If"}


def output_names(pruned: PrunedPrefill) -> list[str]:
    stages = len(pruned.settings.stages)
    layers = pruned.settings.prune.plan.num_layers
    cache = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return ["logits", "positions"] + [f"kept_{i}" for i in range(stages)] + cache


def input_names(pruned: PrunedPrefill) -> list[str]:
    return ["input_ids", "attention_mask", "pixel_values"][: len(pruned.example_args)]


def export_onnx(pruned: PrunedPrefill, path: str | Path) -> Path:
    """Write ``pruned`` as a checked ONNX file with named, static-shape inputs and outputs."""
    import onnx

    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            pruned.program,
            (),
            input_names=input_names(pruned),
            output_names=output_names(pruned),
            opset_version=OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    bad = sorted({node.op_type for node in model.graph.node} & FORBIDDEN_OPS)
    if bad:
        raise RuntimeError(f"the exported graph has ops engines cannot run with static shapes: {', '.join(bad)}")
    return path


def graph_signature(path: str | Path) -> dict[str, list[dict]]:
    """Names, element types and shapes of an ONNX file's inputs and outputs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        return [
            {
                "name": v.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": [d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


class OnnxSession:
    """An ONNX Runtime session that checks feeds against the shapes the graph was compiled for."""

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime

        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        self.inputs = {i.name: i.shape for i in self.session.get_inputs()}

    def run(self, **feeds: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        arrays = {}
        for name, shape in self.inputs.items():
            if name not in feeds:
                raise ValueError(f"{self.path.name} needs input {name!r} of shape {shape}")
            array = feeds[name].numpy() if isinstance(feeds[name], torch.Tensor) else np.asarray(feeds[name])
            if list(array.shape) != list(shape):
                raise ValueError(
                    f"{name} has shape {list(array.shape)} but {self.path.name} was compiled for {list(shape)}; "
                    "recompile with matching --batch/--text-len/--image-size"
                )
            arrays[name] = array
        return self.session.run(None, arrays)
