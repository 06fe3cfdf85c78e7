"""The TensorRT target: torch-tensorrt's dynamo path on the pruned ExportedProgram (CUDA only)."""

from __future__ import annotations

from pathlib import Path

import torch

from clse_fx.compiler import PrunedPrefill

INSTALL_HINT = "install the tensorrt extra on a machine with an NVIDIA GPU: pip install 'clse-fx[tensorrt]'"


def require_tensorrt():
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
    torch_tensorrt = require_tensorrt()
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
