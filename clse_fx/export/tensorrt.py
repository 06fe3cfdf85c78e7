"""The TensorRT target: torch-tensorrt's dynamo path on the pruned ExportedProgram (CUDA only)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clse_fx.compiler import PrunedPrefill
from clse_fx.export.targets import TargetSection
from clse_fx.export.tensorrt_check import check_tensorrt_ready

if TYPE_CHECKING:
    from clse_fx.api import BuildContext

INSTALL_HINT = "install the tensorrt extra on a machine with an NVIDIA GPU: pip install 'clse-fx[tensorrt]'"


def require():
    """torch_tensorrt, or a one-line error saying how to get it."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"--target tensorrt needs a CUDA device, and none is visible; {INSTALL_HINT}")
    try:
        import torch_tensorrt
    except ImportError as error:
        raise RuntimeError(f"--target tensorrt needs torch-tensorrt ({error}); {INSTALL_HINT}") from error
    return torch_tensorrt


def build_engine(pruned: PrunedPrefill, path: str | Path, fp16: bool = False) -> Path:
    """Compile the pruned prefill into one TensorRT engine (no PyTorch fallback) and save it as an
    ExportedProgram that ``torch_tensorrt.load`` reads back. The program must have been traced on CUDA."""
    torch_tensorrt = require()
    args = [a.cuda() for a in pruned.example_args]
    precisions = {torch.float16, torch.float32} if fp16 else {torch.float32}
    compiled = torch_tensorrt.dynamo.compile(
        pruned.program,
        arg_inputs=args,
        enabled_precisions=precisions,
        require_full_compilation=True,
        min_block_size=1,
    )
    path = Path(path)
    torch_tensorrt.save(compiled, str(path), output_format="exported_program", arg_inputs=args)
    return path


def build(context: BuildContext, bundle: Path) -> TargetSection:
    """Add ``prefill.trt.ep`` to the bundle, once the exported graphs pass the readiness check."""
    for graph in sorted(bundle.glob("*.onnx")):
        findings = check_tensorrt_ready(graph)
        if findings:
            raise RuntimeError(f"{graph.name} is not TensorRT-ready: {findings[0]}")
    fp16 = context.options.fp16
    with context.phase("TensorRT engine build", "tensorrt_build"):
        engine = build_engine(context.pruned, bundle / "prefill.trt.ep", fp16=fp16)
    return TargetSection(graphs={"prefill_tensorrt": {"file": engine.name, "precision": "fp16" if fp16 else "fp32"}})
