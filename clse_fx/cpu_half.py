"""Float16 matrix products on the CPU computed in float32, for the compile's eager runs of a float16 model.

PyTorch's CPU kernels for float16 matrix products run at about a third of float32's speed on x86 CPUs without
float16 units (4.7 against 13.7 GFLOP/s for a 600 x 4096 x 4096 product on this project's 2-core EPYC): at 7B the
reference pruner, the exported program and the decode step the compile checks against took most of its time.
Inside :func:`float32_matmuls` each float16 ``mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` on the CPU widens its
operands to float32 and rounds its result back to float16. PyTorch's float16 kernels accumulate in float32 too,
so the result differs by summation order only; both sides of each check run the same way, and ONNX Runtime's
CPU bundles compute float16 weights in float32 as well. No setting of PyTorch's does this for float16 on the CPU
(``torch.set_float32_matmul_precision`` is for float32), hence the dispatch mode.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


def _half_on_cpu(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float16 and value.device.type == "cpu"


class Float32Matmuls(TorchDispatchMode):
    """Float16 CPU matrix products in float32, rounded back to float16."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS and any(_half_on_cpu(arg) for arg in args):
            wide = [arg.float() if _half_on_cpu(arg) else arg for arg in args]
            return func(*wide, **kwargs).to(torch.float16)
        return func(*args, **kwargs)


def float32_matmuls(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """:class:`Float32Matmuls` for a float16 model on the CPU, else nothing."""
    return Float32Matmuls() if _half_on_cpu(next(model.parameters())) else contextlib.nullcontext()
