"""ONNX Runtime sessions that check their feeds against the shapes a graph was compiled for."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]


def select_providers(target: str) -> list[str]:
    """Execution providers for a bundle's target: GPU ones first for onnxruntime-gpu, with a clear fallback."""
    import onnxruntime

    if target != "onnxruntime-gpu":
        return ["CPUExecutionProvider"]
    available = onnxruntime.get_available_providers()
    chosen = [p for p in GPU_PROVIDERS if p in available]
    if not chosen:
        warnings.warn(
            f"onnxruntime-gpu bundle, but this onnxruntime {onnxruntime.__version__} offers only "
            f"{', '.join(available)}; running on CPU. Install the gpu extra (onnxruntime-gpu) on a CUDA machine.",
            stacklevel=2,
        )
    return chosen + ["CPUExecutionProvider"]


class OnnxSession:
    """An ONNX Runtime session that checks feeds against the shapes the graph was compiled for."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime

        self.path = Path(path)
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self.inputs = {i.name: i.shape for i in self.session.get_inputs()}

    def run(self, **feeds: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, checked_feeds(self.path.name, self.inputs, feeds))


def checked_feeds(graph: str, inputs: dict[str, list], feeds: dict) -> dict[str, np.ndarray]:
    """``feeds`` as arrays in ``inputs`` order, each checked against its compiled shape (a str or None dim is
    dynamic); a missing input or a shape the graph was not compiled for is a one-line error."""
    arrays = {}
    for name, shape in inputs.items():
        if name not in feeds:
            raise ValueError(f"{graph} needs input {name!r} of shape {shape}")
        value = feeds[name]
        # torch tensors (the compiler's parity checks) without importing torch here
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        fixed = all(not isinstance(want, int) or have == want for have, want in zip(array.shape, shape))
        if not fixed or len(array.shape) != len(shape):
            raise ValueError(
                f"{name} has shape {list(array.shape)} but {graph} was compiled for {list(shape)}; "
                "recompile with matching --batch/--text-len/--image-size"
            )
        arrays[name] = array
    return arrays
