"""AOTInductor packages (the aot-inductor target's ``.pt2`` files) as engine sessions. The one part of deploy
that needs torch (libtorch runs the packages): it is imported only for bundles of that target."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from clse_fx.deploy.session import ORT_TYPES, as_array, checked_feeds


class AotiSession:
    """A loaded AOTInductor package with :class:`~clse_fx.deploy.session.OnnxSession`'s interface: feeds are
    checked against the compiled shapes, outputs come back as numpy arrays."""

    def __init__(self, path: str | Path, graph: dict, device: str = "cpu", vocab_size: int | None = None) -> None:
        """``graph``: the manifest's signature of the package; ``vocab_size``: the token-id range (default: the
        width of its logits). A package indexes its embedding unchecked (an id out of range aborts the process),
        so every feed goes through :func:`~clse_fx.deploy.session.checked_feeds` first."""
        self.path, self.device = Path(path), device
        # A package reads each input with the dtype, shape and strides it was compiled for and checks them only
        # when this is set (read once per process, at a package's first run): a mismatch is then an error,
        # not a silently wrong answer (pytorch/pytorch#122784). Feeds are made contiguous before every run.
        os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
        import torch

        # The C++ package loader that torch._inductor.aoti_load_package wraps: that wrapper imports torch._inductor
        # and torch._dynamo first, 4-5 s of every clse-run on this target, and loading this way takes 0.01 s. Our
        # graphs take and return flat tensor lists, so its pytree (un)flattening has nothing to do.
        self.runner = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        self.inputs = {entry["name"]: entry["shape"] for entry in graph["inputs"]}
        checkable = set(ORT_TYPES.values())  # the dtypes numpy has
        self.dtypes = {
            entry["name"]: entry["dtype"] if entry["dtype"] in checkable else None for entry in graph["inputs"]
        }
        # numpy has no bfloat16: a bfloat16 package's outputs come back widened to float32 (as_array) and its
        # float inputs (the KV buffers the loop feeds back) are narrowed again on the way in.
        self.torch_dtypes = {entry["name"]: getattr(torch, entry["dtype"]) for entry in graph["inputs"]}
        logits = [entry["shape"][-1] for entry in graph["outputs"] if entry["name"] == "logits"]
        self.vocab_size = vocab_size if vocab_size is not None else next(iter(logits), None)

    def run(self, **feeds) -> list[np.ndarray]:
        import torch

        arrays = checked_feeds(self.path.name, self.inputs, feeds, self.dtypes, self.vocab_size)
        tensors = [
            torch.from_numpy(array).to(self.device, dtype=self.torch_dtypes[name]) for name, array in arrays.items()
        ]
        with torch.no_grad():
            outputs = self.runner.boxed_run(tensors)
        return [as_array(output) for output in outputs]

    def bind(self, fixed: dict[str, np.ndarray]):
        """:meth:`OnnxSession.bind`'s interface: a run function that adds the ``fixed`` inputs to each call's.
        On the CPU ``torch.from_numpy`` shares their memory, so nothing is copied; on a GPU they are copied
        to the device every call (the package's inputs are tensors it cannot alias)."""
        return lambda **feeds: self.run(**fixed, **feeds)
