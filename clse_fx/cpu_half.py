"""Float16 matrix products on the CPU computed in float32, for the compile's eager runs of a float16 model.

PyTorch's CPU kernels for float16 matrix products run at a half to a third of float32's speed on x86 CPUs
without float16 units (a 600 x 4096 x 4096 product on this project's 2-core EPYC: 1.6-4.3 s against 0.8-1.5 s):
at 7B the reference pruner, the exported program and the decode step the compile checks against took most of
its time.
Inside :func:`float32_matmuls` each float16 ``mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` on the CPU with at least
:data:`MIN_ROWS` rows widens its operands to float32 and rounds its result back to float16. PyTorch's float16
kernels accumulate in float32 too, so the result differs by summation order only; both sides of each check run
the same way, and ONNX Runtime's CPU bundles compute float16 weights in float32 as well. No setting of PyTorch's
does this for float16 on the CPU (``torch.set_float32_matmul_precision`` is for float32), hence the dispatch mode.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Each product's left operand: its rows decide whether widening pays (mm / bmm: args[0]; addmm / baddbmm: args[1])
LEFT_OPERAND = {aten.mm.default: 0, aten.bmm.default: 0, aten.addmm.default: 1, aten.baddbmm.default: 1}
# Widening reads and writes the whole right operand (the weight) once per product: with few rows (a decode step's
# one token) PyTorch's own float16 kernel is bandwidth-bound and 20x faster than widening (4.5 against 100 ms for
# one row by an 11008 x 4096 weight here); from about 64 rows on the compute dominates and float32 wins.
MIN_ROWS = 128


def _half_on_cpu(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float16 and value.device.type == "cpu"


class Float32Matmuls(TorchDispatchMode):
    """Float16 CPU matrix products of :data:`MIN_ROWS` rows or more in float32, rounded back to float16."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        left = LEFT_OPERAND.get(func)
        if left is not None and _half_on_cpu(args[left]) and args[left].shape[-2] >= MIN_ROWS:
            wide = [arg.float() if _half_on_cpu(arg) else arg for arg in args]
            return func(*wide, **kwargs).to(torch.float16)
        return func(*args, **kwargs)


def float32_matmuls(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """:class:`Float32Matmuls` for a float16 model on the CPU, else nothing."""
    return Float32Matmuls() if _half_on_cpu(next(model.parameters())) else contextlib.nullcontext()
