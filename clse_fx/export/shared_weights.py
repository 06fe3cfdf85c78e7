"""Store every weight of a bundle's ONNX graphs once: one external-data file that all graphs point into.

The prefill and the decode step hold the same decoder weights (and the optimizer folds the same transposes in
both), so exported separately the bundle stores them twice. ONNX external data is a file, an offset and a length
per initializer, so graphs can share one file: each distinct tensor (by content) is written once, and every
initializer that holds it points at that copy. Tensors are read and hashed one at a time (peak memory: the largest
tensor), the per-graph data files are removed, and each graph is saved again without weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHTS_FILE = "weights.data"
ALIGNMENT = 64  # offsets aligned for memory-mapped loads


def share_weights(paths: list[Path], name: str = WEIGHTS_FILE) -> Path:
    """Rewrite the graphs at ``paths`` (one directory) so their external initializers live once in ``name`` next to
    them; returns its path. Graphs without external initializers are left as they are."""
    import onnx

    folder = paths[0].parent
    target = folder / name
    stored: dict[bytes, tuple[int, int]] = {}  # content key -> (offset, length) in the shared file
    replaced: set[Path] = set()
    with open(target, "wb") as out:
        for path in paths:
            model = onnx.load(str(path), load_external_data=False)
            tensors = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
            for tensor in tensors:
                info = {entry.key: entry.value for entry in tensor.external_data}
                source = folder / info["location"]
                with open(source, "rb") as f:
                    f.seek(int(info.get("offset", 0)))
                    data = f.read(int(info["length"]))
                shape = f"{tensor.data_type}:{list(tensor.dims)}".encode()
                key = hashlib.blake2b(data, digest_size=32).digest() + shape
                if key not in stored:
                    out.write(b"\0" * (-out.tell() % ALIGNMENT))
                    stored[key] = (out.tell(), len(data))
                    out.write(data)
                del tensor.external_data[:]
                offset, length = stored[key]
                for field, value in (("location", name), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = field, value
                replaced.add(source)
            if tensors:
                onnx.save(model, str(path))
    for source in replaced - {target}:
        source.unlink()
    return target
