"""Where an ONNX graph file says its weights lie, read without the onnx package (deploy needs numpy, onnxruntime,
tokenizers and pillow only).

ONNX Runtime's Python API lists no initializers before it has loaded them (and loading them is what must not
happen unchecked), and nothing installed at deploy reads ONNX files except ONNX Runtime itself. So the graph is
parsed with protobuf, which onnxruntime depends on, against a schema built here of the few onnx.proto messages
and fields that hold tensors (onnx.proto's names and field numbers); protobuf skips every other field. The
declarations come from the graph file, which the manifest hashes, so a hand-edited manifest cannot point a
weight at other bytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
# ONNX element types (onnx.proto's TensorProto.DataType) -> bits per element; the 4- and 2-bit types are packed.
# STRING (8) has no fixed width and never lies in external data; the 6-bit float types have no ONNX Runtime kernels.
ELEMENT_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64, 15: 128}
ELEMENT_BITS |= {16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8, 25: 2, 26: 2}


@dataclass(frozen=True)
class Initializer:
    """One external initializer as its graph declares it: the data file (relative to the graph), element type,
    shape, and the byte range in the file. :meth:`entry` is its form in the manifest's initializer table."""

    file: str
    type: int
    shape: tuple[int, ...]
    offset: int
    length: int

    def entry(self) -> dict:
        shape = list(self.shape)
        return {"file": self.file, "type": self.type, "shape": shape, "offset": self.offset, "length": self.length}

    def expected_length(self) -> int:
        """The bytes its type and shape take (packed sub-byte types rounded up to whole bytes)."""
        count = 1
        for dim in self.shape:
            count *= dim
        return -(-count * ELEMENT_BITS[self.type] // 8)


class GraphError(ValueError):
    """A graph file that cannot be read, or that keeps data where a bundle may not."""


@functools.cache
def _model_class() -> type:
    """The message class of the schema subset (built once per process)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    schema = descriptor_pb2.FileDescriptorProto(name="clse_onnx_subset.proto", package="clse_onnx", syntax="proto2")
    messages = {  # message -> (field, number, scalar type or message name, repeated)
        "Entry": [("key", 1, field.TYPE_STRING, False), ("value", 2, field.TYPE_STRING, False)],
        "Tensor": [
            ("dims", 1, field.TYPE_INT64, True),
            ("data_type", 2, field.TYPE_INT32, False),
            ("name", 8, field.TYPE_STRING, False),
            ("external_data", 13, "Entry", True),
            ("data_location", 14, field.TYPE_INT32, False),
        ],
        "Sparse": [("values", 1, "Tensor", False), ("indices", 2, "Tensor", False)],
        "Attribute": [
            ("t", 5, "Tensor", False),
            ("g", 6, "Graph", False),
            ("tensors", 9, "Tensor", True),
            ("graphs", 10, "Graph", True),
            ("sparse_tensor", 22, "Sparse", False),
            ("sparse_tensors", 23, "Sparse", True),
        ],
        "Node": [("attribute", 5, "Attribute", True)],
        "Graph": [
            ("node", 1, "Node", True),
            ("initializer", 5, "Tensor", True),
            ("sparse_initializer", 15, "Sparse", True),
        ],
        "Function": [("node", 7, "Node", True)],
        "Model": [("graph", 7, "Graph", False), ("functions", 25, "Function", True)],
    }
    for name, fields in messages.items():
        message = schema.message_type.add(name=name)
        for field_name, number, kind, repeated in fields:
            label = field.LABEL_REPEATED if repeated else field.LABEL_OPTIONAL
            added = message.field.add(name=field_name, number=number, label=label)
            if isinstance(kind, str):
                added.type, added.type_name = field.TYPE_MESSAGE, f".clse_onnx.{kind}"
            else:
                added.type = kind
    pool = descriptor_pool.DescriptorPool()  # not the default pool, where onnx may have registered its own names
    pool.Add(schema)
    descriptor = pool.FindMessageTypeByName("clse_onnx.Model")
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.22
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(pool).GetPrototype(descriptor)


def declared_initializers(data: bytes, graph: str) -> dict[str, Initializer]:
    """The external initializers that the ONNX model ``data`` (the file ``graph``) declares in its main graph. A
    file protobuf cannot parse, a malformed or repeated declaration, an element type without a fixed width, or
    external data anywhere else (subgraphs, node attributes, sparse tensors, functions: places the manifest's table
    does not cover) is a one-line :class:`GraphError`."""
    from google.protobuf.message import DecodeError

    try:
        model = _model_class().FromString(data)
    except (DecodeError, RecursionError) as error:
        raise GraphError(f"{graph} is not a readable ONNX graph ({error}); recompile the bundle") from None
    declared: dict[str, Initializer] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != EXTERNAL:
            continue
        if tensor.name in declared:
            raise GraphError(f"{graph} declares initializer {tensor.name!r} twice; recompile the bundle")
        declared[tensor.name] = _initializer(tensor, graph)
    if any(tensor.data_location == EXTERNAL for tensor in _nested_tensors(model)):
        raise GraphError(f"{graph} keeps external data outside its main graph's initializers; recompile the bundle")
    return declared


def _initializer(tensor, graph: str) -> Initializer:
    info = {entry.key: entry.value for entry in tensor.external_data}
    where = f"{graph} initializer {tensor.name!r}"
    try:
        offset, length = int(info.get("offset", "0")), int(info["length"])
    except (KeyError, ValueError):
        raise GraphError(f"{where} has no valid external data offset and length; recompile the bundle") from None
    if tensor.data_type not in ELEMENT_BITS:
        raise GraphError(f"{where} has element type {tensor.data_type}, which cannot be stored as external data")
    if not info.get("location") or offset < 0 or length < 0 or any(dim < 0 for dim in tensor.dims):
        raise GraphError(f"{where} has a malformed external data declaration; recompile the bundle")
    return Initializer(info["location"], tensor.data_type, tuple(tensor.dims), offset, length)


def _nested_tensors(model):
    """Every tensor outside the main graph's initializers: in its sparse initializers, node attributes and
    subgraphs (depth first) and in the model's functions."""
    graphs, nodes = [model.graph], [node for function in model.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            nodes.extend(graph.node)
            for sparse in graph.sparse_initializer:
                yield from (sparse.values, sparse.indices)
            if graph is not model.graph:
                yield from graph.initializer
            continue
        for attribute in nodes.pop().attribute:
            yield from (attribute.t, *attribute.tensors)
            for sparse in (attribute.sparse_tensor, *attribute.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            graphs.extend([attribute.g] if attribute.HasField("g") else [])
            graphs.extend(attribute.graphs)
