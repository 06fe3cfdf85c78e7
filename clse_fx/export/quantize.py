"""Weight-only int8 / int4 quantization of a bundle's ONNX graphs, one tensor at a time (``--weight-format``).

Every ``MatMul`` whose right operand is a 2-D weight becomes ONNX Runtime's ``MatMulNBits`` and every ``Gather``
from a 2-D table (the token embedding) ``GatherBlockQuantized``: weights in blocks of ``block_size`` along the
reduction (hidden) axis, each block with its own scale and zero point. The packing is ONNX Runtime's own
(``quantize_matmul_{4,8}bits``, the kernels behind its ``MatMulNBitsQuantizer``); that tool loads the whole model
into memory (a 7B graph does not fit twice on a 24 GB machine), so the graph rewrite here keeps each quantized
weight lazy: it is computed from the memory-mapped float weight when the graph is written, and dropped after.

Which bits a weight gets depends on its role (:class:`WeightRoles`): the decoder layers take the format's bits;
the LM head, the embedding table and everything outside the decoder (vision tower, projector) stay at 8 bits
under int4, where 4 bits cost the most accuracy for the fewest bytes (the layout OpenVINO's and ONNX Runtime
GenAI's int4 exports use as well).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clse_fx.export.float32_compute import FLOAT16_TOO, compute_in_float32
from clse_fx.export.shared_weights import WEIGHTS_FILE, share_weights

CONTRIB_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class WeightFormat:
    """Bits per role, the quantization block and ``MatMulNBits``'s accuracy level (4: int8 activations and int8
    dot products, the fast path on CPUs with VNNI / AMX; the weights are dequantized per block)."""

    decoder_bits: int
    other_bits: int = 8
    block_size: int = 128
    accuracy_level: int = 4


FORMATS = {"int8": WeightFormat(decoder_bits=8), "int4": WeightFormat(decoder_bits=4)}  # options.WEIGHT_FORMATS


@dataclass(frozen=True)
class WeightRoles:
    """Where a weight sits in the model, by its parameter name (graphs name weights after the module path,
    under a wrapper prefix: ``gm.model.`` in the prefill, ``model.`` in the decode step): decoder-layer weights
    start with ``decoder_prefix``; everything else is the embedding, the LM head or "other"."""

    decoder_prefix: str

    def bits(self, name: str, weight_format: WeightFormat) -> int:
        """The bits ``name`` is quantized to."""
        scoped = f".{name}"
        in_decoder = f".{self.decoder_prefix}." in scoped
        return weight_format.decoder_bits if in_decoder else weight_format.other_bits


def roles_for(model) -> WeightRoles:
    """The :class:`WeightRoles` of a transformers model (its decoder found by the family adapter)."""
    from clse_fx.models import adapter_for

    decoder = adapter_for(model).decoder().layers
    path = next(name for name, module in model.named_modules() if module is decoder)
    return WeightRoles(decoder_prefix=path)


class _Quantized:
    """One weight's quantized parts (packed blocks, scales, zero points), computed on first use and released after
    the last of the three is written: a graph holds many, and only one should be in memory at a time. The source
    weight's file mapping is closed once it is read (:func:`_release`)."""

    def __init__(self, weight, bits: int, block_size: int, transpose: bool, dtype: np.dtype) -> None:
        self.weight, self.bits, self.block_size, self.transpose, self.dtype = weight, bits, block_size, transpose, dtype
        self.parts: tuple[np.ndarray, ...] | None = None
        self.taken = 0

    def part(self, index: int) -> np.ndarray:
        if self.parts is None:
            self.parts = quantize_blocks(self.weight.numpy(), self.bits, self.block_size, self.transpose, self.dtype)
            _release(self.weight)
        part = self.parts[index]
        self.taken += 1
        if self.taken % 3 == 0:
            self.parts = None
        return part


def _release(tensor) -> None:
    """Close an external tensor's file mapping (a no-op for tensors in memory). onnx_ir maps the whole weights file
    for each tensor it reads and keeps it mapped as long as the tensor lives (graphs hold reference cycles, so
    until the garbage collector runs): the pages read stay resident, and a 7B graph's read once per graph came to
    twice the weights' bytes of RSS."""
    release = getattr(tensor, "release", None)
    if release is not None:
        release()


def quantize_blocks(
    weight: np.ndarray, bits: int, block_size: int, transpose: bool = False, dtype: np.dtype | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX Runtime's block quantization of a ``[K, N]`` matrix (``transpose``: given as ``[N, K]``) along K:
    ``(packed uint8 [N, K / block_size, block_size * bits / 8], scales [N, blocks], zero points uint8 [N,
    ceil(blocks * bits / 8)])``, scales in ``dtype`` (default: the weight's float type). Asymmetric, so
    each block's range is used whole."""
    # The kernels behind onnxruntime.quantization.matmul_nbits_quantizer; that module is not imported because it
    # configures the root logger on import.
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    quantize = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    matrix = np.asarray(weight, dtype=np.float32)
    matrix = np.ascontiguousarray(matrix.T if transpose else matrix)
    rows, cols = matrix.shape
    blocks = -(-rows // block_size)
    if blocks * block_size != rows:
        matrix = np.pad(matrix, ((0, blocks * block_size - rows), (0, 0)))
    per_byte = 8 // bits
    packed = np.zeros((cols, blocks, block_size // per_byte), dtype=np.uint8)
    scales = np.zeros((cols, blocks), dtype=np.float32)
    zero_points = np.zeros((cols, -(-blocks // per_byte)), dtype=np.uint8)
    quantize(packed, matrix, scales, zero_points, block_size, cols, rows, False)
    return packed, scales.astype(dtype or np.asarray(weight).dtype), zero_points


def block_for(length: int, preferred: int) -> int | None:
    """The block size for an embedding table's rows of ``length``: the largest power of two from ``preferred`` down
    to 16 that divides it (GatherBlockQuantized takes no padded block), else None. Matrix products keep the
    preferred block and pad the last one (``MatMulNBits`` takes any K): smaller blocks measured 5% slower."""
    size = preferred
    while size >= 16:
        if length % size == 0:
            return size
        size //= 2
    return None


def _lazy_parts(ir, quantized: _Quantized, shapes: list[tuple[int, ...]], name: str) -> list:
    """The three parts of ``quantized`` as lazy initializers (packed codes reshaped to ``shapes[0]``)."""
    types = [ir.DataType.UINT8, ir.DataType.from_numpy(np.dtype(quantized.dtype)), ir.DataType.UINT8]
    values = []
    suffixes = (f"q{quantized.bits}", "scales", "zero_points")
    for index, (suffix, shape, element) in enumerate(zip(suffixes, shapes, types)):
        lazy = ir.LazyTensor(
            functools.partial(lambda i, s: ir.tensor(quantized.part(i).reshape(s)), index, shape),
            dtype=element,
            shape=ir.Shape(shape),
            name=f"{name}.{suffix}",
        )
        values.append(ir.Value(name=lazy.name, shape=lazy.shape, type=ir.TensorType(element), const_value=lazy))
    return values


def _float_type(ir, value) -> np.dtype | None:
    """The numpy float type of ``value`` if ONNX Runtime's quantized ops compute in it (float32, float16)."""
    element = value.dtype
    return element.numpy() if element in (ir.DataType.FLOAT, ir.DataType.FLOAT16) else None


def _stored_weight(ir, value):
    """The 2-D float initializer ``value`` is, or is widened from by one ``Cast`` (bfloat16 weights in a float32
    graph: clse_fx/export/float32_compute.py), if nothing else reads it; with that cast node (or None)."""
    cast = value.producer() if value is not None and not value.is_initializer() else None
    if cast is not None and cast.op_type == "Cast" and len(value.uses()) == 1:
        value = cast.inputs[0]
    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    stored = value is not None and value.is_initializer() and value.const_value is not None
    if not stored or len(value.shape) != 2 or value.dtype not in floats:
        return None, None
    if len(value.uses()) != 1 or value.is_graph_output():
        return None, None
    return value, cast


def _plain_product(node) -> bool:
    """Whether a ``Gemm`` is a plain ``A @ B`` (or ``A @ B.T``): no bias, scale or transposed ``A`` (the exporter
    writes a 2-D ``nn.Linear`` without bias this way: the LM head on the last position)."""
    attributes = node.attributes
    no_bias = len(node.inputs) < 3 or node.inputs[2] is None
    return no_bias and attributes.get_float("alpha", 1.0) == 1.0 and attributes.get_int("transA", 0) == 0


def quantize_graph(model, roles: WeightRoles, weight_format: WeightFormat) -> dict[str, int]:
    """Rewrite ``model`` (an ``onnx_ir.Model``, in place) with quantized MatMul weights and embedding tables;
    returns how many weights were quantized at each width (``{"int4": n, "int8": m}``)."""
    import onnx_ir as ir

    graph = model.graph
    counts: dict[str, int] = {}
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Gather"):
            continue
        gather = node.op_type == "Gather"
        if node.op_type == "Gemm" and not _plain_product(node):
            continue
        table, cast = _stored_weight(ir, node.inputs[0 if gather else 1])
        # What the op computes in (the scales' type): its output's float type, else (graphs exported without shape
        # inference leave some outputs untyped) its activation's, or for a Gather the table's as read.
        typed = [_float_type(ir, value) for value in (node.outputs[0], node.inputs[0])]
        dtype = next((element for element in typed if element is not None), None)
        if table is None or dtype is None:
            continue
        weight = table.const_value
        bits = roles.bits(table.name, weight_format)
        # A Gemm with transB holds the weight as [N, K]: MatMulNBits' own layout, quantized as given.
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1
        cols, rows = weight.shape if transposed else weight.shape[::-1]
        block = block_for(cols, weight_format.block_size) if gather else weight_format.block_size
        if gather:  # [vocab, hidden], blocks along hidden: MatMulNBits' layout of the table's transpose
            if node.attributes.get_int("axis", 0) != 0 or block is None:
                continue
            blocks = cols // block
            quantized = _Quantized(weight, bits, block, True, dtype)
            shapes = [(rows, cols * bits // 8), (rows, blocks), (rows, -(-blocks * bits // 8))]
            codes, scales, zero_points = _lazy_parts(ir, quantized, shapes, table.name)
            inputs, op = [codes, node.inputs[1], scales, zero_points], "GatherBlockQuantized"
            attributes = {"bits": bits, "block_size": block, "gather_axis": 0, "quantize_axis": 1}
        else:  # [K, N] -> N rows of K / block blocks
            blocks = -(-rows // block)
            quantized = _Quantized(weight, bits, block, transposed, dtype)
            shapes = [(cols, blocks, block * bits // 8), (cols, blocks), (cols, -(-blocks * bits // 8))]
            packed, scales, zero_points = _lazy_parts(ir, quantized, shapes, table.name)
            inputs, op = [node.inputs[0], packed, scales, zero_points], "MatMulNBits"
            attributes = {"K": rows, "N": cols, "bits": bits, "block_size": block}
            attributes["accuracy_level"] = weight_format.accuracy_level
        replacement = ir.Node(
            CONTRIB_DOMAIN, op, inputs, [ir.AttrInt64(key, value) for key, value in attributes.items()], name=node.name
        )
        graph.insert_before(node, replacement)
        output, new = node.outputs[0], replacement.outputs[0]
        name, shape, element = output.name, output.shape, output.type
        output.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        new.name, new.shape, new.type = name, shape, element
        if cast is not None:
            graph.remove(cast, safe=True)
        del graph.initializers[table.name]
        for value in inputs:
            if value.const_value is not None:
                graph.register_initializer(value)
        counts[f"int{bits}"] = counts.get(f"int{bits}", 0) + 1
    if counts:
        model.opset_imports[CONTRIB_DOMAIN] = 1
    return counts


def quantize_file(path: Path, roles: WeightRoles, weight_format: WeightFormat) -> dict[str, int]:
    """Quantize the ONNX graph at ``path`` in place, computing in float32 whatever the checkpoint's float type;
    its weights move to ``<path>.data`` (written one tensor at a time, read from the memory-mapped weights the
    graph pointed at). Returns :func:`quantize_graph`'s counts."""
    import onnx_ir as ir

    model = ir.load(path)
    compute_in_float32(model, FLOAT16_TOO)
    counts = quantize_graph(model, roles, weight_format)
    staged = path.with_name(f"{path.name}.quantized")
    ir.save(model, staged, external_data=f"{path.name}.data")
    for value in model.graph.initializers.values():  # those written as they were: read for the save
        _release(value.const_value)
    staged.replace(path)
    return counts


def quantize_bundle(paths: list[Path], roles: WeightRoles, weight_format: str) -> dict:
    """Quantize a bundle's graphs (one directory, their weights in one shared file) to ``weight_format``, then
    store the weights once again (:func:`share_weights`); the manifest's record of what was done, with how many
    weights of each graph went to each width."""
    chosen = FORMATS[weight_format]
    folder = paths[0].parent
    before = (folder / WEIGHTS_FILE).stat().st_size
    counts = {path.stem: quantize_file(path, roles, chosen) for path in paths}
    (folder / WEIGHTS_FILE).unlink()  # every graph now points at its own quantized copy
    after = share_weights(paths).stat().st_size
    sizes = {"before": before, "after": after}
    return {"weight_format": weight_format, **asdict(chosen), "weights": counts, "bytes": sizes}
