"""ONNX Runtime sessions that check their feeds against the shapes a graph was compiled for."""

from __future__ import annotations

import contextlib
import ctypes
import sys
import warnings
from pathlib import Path

import numpy as np

from clse_fx.deploy.loop import check_finite_feeds, check_token_ids
from clse_fx.deploy.manifest import DECODE_STEP_INPUTS, decode_names, error_line

LOW_PRECISION = ("float16", "bfloat16")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
# ONNX Runtime's input type names -> numpy dtype names (bfloat16 has no numpy dtype: not checked).
ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}
TOKEN_INPUT = "input_ids"  # the token ids of every graph that takes them (prefill, decode step, M-RoPE index)
PIXEL_PREFIX = "pixel_values"  # pixel_values, pixel_values_videos


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


def return_freed_memory() -> None:
    """Make glibc return large freed blocks to the OS. After large frees its mmap threshold adapts upward (to 32
    MB) and freed blocks below it stay in the heap: the CPU provider's per-op float32 casts of float16 weights
    then piled up as anonymous memory (16 GB beside a 7B model's 13 GB of weights; 0.3 GB at 1/8 width, 0 with
    this). A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``) serves every block over 64 KiB by mmap, unmapped
    when freed. No-op where the C library has no mallopt."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 << 10)


class OnnxSession:
    """An ONNX Runtime session that checks feeds against the shapes the graph was compiled for, and refuses token
    ids outside its vocabulary and non-finite pixels (:func:`checked_feeds`)."""

    def __init__(
        self,
        path: str | Path,
        providers: list[str] | None = None,
        threads: int | None = None,
        dtype: str = "float32",
        initializers: dict | None = None,
        weights=None,
        vocab_size: int | None = None,
        prepack: bool = True,
        widen_weights: bool = False,
    ) -> None:
        """``initializers``: OrtValues that replace the graph's stored weights of the same names, kept alive as long
        as the session; ``weights``: the :class:`~clse_fx.deploy.weights.BundleWeights` they map, inside whose
        ``in_use()`` every run happens. ``vocab_size``: the token-id range (default: the graph's logits width).
        ``prepack``: let ONNX Runtime copy weights into its kernels' packed layouts at load (each session its own
        copy; without it, weights are read where they are mapped). ``widen_weights``: a float16 or bfloat16 graph's
        weights become float32 copies once, at load, not cast at every run (:func:`widened_weights_fit`)."""
        import onnxruntime

        self.path = Path(path)
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.initializers, self.weights = initializers or {}, weights
        for name, value in self.initializers.items():
            options.add_initializer(name, value)
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        lean = dtype in LOW_PRECISION and not widen_weights
        if lean and (providers or ["CPUExecutionProvider"])[0] == "CPUExecutionProvider":
            # The CPU provider runs most float16/bfloat16 ops in float32 behind inserted casts, and its extended
            # optimizations fold the casts of the weights into float32 copies: 3x the weights in memory (a 7B
            # model would need 27 GB). At the basic level the weights stay memory-mapped from the bundle's weights
            # file and are cast op by op as they are used (prefill ~25% slower at 1/8 LLaVA-1.5 width, 1.9x less
            # memory); without the arena the per-op casts are returned at once instead of pooled. The default
            # execution order runs the casts of the weights (nodes with no activation inputs) early, so many float32
            # copies were alive at once (peak anonymous memory 1.5x the weights at 1/8 width); priority-based
            # order runs each beside its consumer (0.6x, and faster).
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
            options.execution_order = onnxruntime.ExecutionOrder.PRIORITY_BASED
            options.enable_cpu_mem_arena = False
            return_freed_memory()
        # A bfloat16 bundle's graphs compute in float32 from bfloat16 weights through explicit casts
        # (clse_fx/export/float32_compute.py); constant folding would turn each into a float32 copy at load.
        disabled = ["ConstantFolding"] if dtype == "bfloat16" and lean else None
        with self.using_weights():  # building the session reads (pre-packs) the weights too
            self.session = inference_session(self.path, options, providers or ["CPUExecutionProvider"], disabled)
        self.inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.dtypes = {i.name: ORT_TYPES.get(i.type) for i in self.session.get_inputs()}
        logits = [o.shape[-1] for o in self.session.get_outputs() if o.name == "logits" and o.shape]
        self.vocab_size = vocab_size if vocab_size is not None else next(iter(logits), None)
        if not isinstance(self.vocab_size, int):
            self.vocab_size = None  # a dynamic width: nothing to check ids against

    def using_weights(self):
        """The context every read of the mapped weights runs in (nothing to guard without them)."""
        return self.weights.in_use() if self.weights is not None else contextlib.nullcontext()

    def run(self, **feeds: np.ndarray) -> list[np.ndarray]:
        checked = checked_feeds(self.path.name, self.inputs, feeds, self.dtypes, self.vocab_size)
        with self.using_weights():
            return self.session.run(None, checked)

    def bind(self, fixed: dict[str, np.ndarray], shared: dict[str, str] | None = None):
        """A run function with the ``fixed`` inputs bound once through ONNX Runtime IO binding; each call
        takes the other inputs. On the CPU the bound OrtValues share the arrays' memory, so in-place writes
        to them between calls (the decode loop's KV buffers) are what the next call reads, never copied.
        ``shared`` binds outputs to the memory of ``fixed`` inputs (output name -> input name: a decode graph's
        present KV buffers to its past ones, which ONNX Runtime's GroupQueryAttention then writes in place); a
        call returns the other outputs."""
        import onnxruntime

        shared = shared or {}
        others = {name: shape for name, shape in self.inputs.items() if name not in fixed}
        bound = {name: self.inputs[name] for name in fixed}
        checked = checked_feeds(self.path.name, bound, fixed, self.dtypes, self.vocab_size)
        binding = self.session.io_binding()
        values = {name: onnxruntime.OrtValue.ortvalue_from_numpy(array) for name, array in checked.items()}
        for name, value in values.items():
            if value.data_ptr() != checked[name].ctypes.data:  # a copy would not see the in-place writes
                raise RuntimeError(f"onnxruntime copied bound input {name}; bind C-contiguous CPU arrays")
            binding.bind_ortvalue_input(name, value)
        returned = [output.name for output in self.session.get_outputs() if output.name not in shared]
        for name in returned:  # bound first: get_outputs() lists outputs in the order they were bound
            binding.bind_output(name, "cpu")
        for output, name in shared.items():
            binding.bind_ortvalue_output(output, values[name])

        def run(**feeds: np.ndarray) -> list[np.ndarray]:
            for name, array in checked_feeds(self.path.name, others, feeds, self.dtypes, self.vocab_size).items():
                binding.bind_cpu_input(name, array)
            with self.using_weights():
                self.session.run_with_iobinding(binding)
            # OrtValue.numpy() is a view of memory ONNX Runtime may reuse on the next call: copies, as
            # copy_outputs_to_cpu() makes (which would also copy the shared buffers).
            return [value.numpy().copy() for value in binding.get_outputs()[: len(returned)]]

        run.values = values  # the OrtValues live as long as the function
        return run


def widened_weights_fit(bfloat16_bytes: int, margin: float = 0.25) -> bool:
    """Whether float32 copies of ``bfloat16_bytes`` of weights (twice the bytes) fit in this machine's available
    memory with ``margin`` of it to spare (Linux's MemAvailable; False where it cannot be read).

    A bfloat16 decode step cast from the mapped weights at every token runs 17x slower than from float32 copies
    made once at load (1/8-width LLaVA-1.5 on 2 cores: 348 vs 15-20 ms per token), because every cast allocates
    and fills fresh pages; with the copies, a bfloat16 bundle decodes at float32 speed for about the float32
    bundle's memory. A 7B decoder's copies (27 GB) do not fit a 24 GB machine: there it stays lean and slow."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return False
    return 2 * bfloat16_bytes <= (1 - margin) * available


def inference_session(path: Path, options, providers: list[str], disabled_optimizers: list[str] | None = None):
    """ONNX Runtime's session for the graph at ``path``; a graph it refuses is a one-line ValueError."""
    import onnxruntime

    try:
        return onnxruntime.InferenceSession(
            str(path), options, providers=providers, disabled_optimizers=disabled_optimizers
        )
    except Exception as error:  # ONNX Runtime's errors derive from Exception only
        detail = error_line(error, 200)
        raise ValueError(f"ONNX Runtime cannot load {path.name} ({detail}); recompile the bundle") from None


def checked_feeds(
    graph: str,
    inputs: dict[str, list],
    feeds: dict,
    dtypes: dict[str, str | None] | None = None,
    vocab_size: int | None = None,
) -> dict[str, np.ndarray]:
    """``feeds`` as C-contiguous arrays in ``inputs`` order, each checked against its compiled shape (a str or None
    dim is dynamic) and its ``dtypes`` entry (numpy names; None: not checked, e.g. bfloat16, which numpy lacks); a
    missing input, a shape the graph was not compiled for or another dtype is a one-line error, and so are token
    ids outside ``[0, vocab_size)`` and pixels that are not finite (the checks of Engine and the Triton model,
    :func:`~clse_fx.deploy.loop.check_token_ids` and :func:`~clse_fx.deploy.loop.check_finite_feeds`): a session
    called directly guards itself, and no input aborts the process.

    Every session gets its feeds through here, in the layout graphs are built for: an AOTInductor package reads
    its inputs with the strides it was compiled with and does not check them by default, so a transposed view
    (the preprocessor's HWC -> CHW pixels) would be read in the wrong order, silently."""
    arrays = {}
    for name, shape in inputs.items():
        if name not in feeds:
            raise ValueError(f"{graph} needs input {name!r} of shape {shape}")
        value = feeds[name]
        array = as_array(value)
        fixed = all(not isinstance(want, int) or have == want for have, want in zip(array.shape, shape))
        if not fixed or len(array.shape) != len(shape):
            raise ValueError(
                f"{name} has shape {list(array.shape)} but {graph} was compiled for {list(shape)}; "
                "recompile with matching --batch/--text-len/--image-size"
            )
        want = (dtypes or {}).get(name)
        if want is not None and array.dtype != np.dtype(want):
            raise ValueError(f"{name} has dtype {array.dtype} but {graph} takes {want}; convert it before the call")
        arrays[name] = row_major(array)
    if TOKEN_INPUT in arrays:
        check_token_ids(arrays[TOKEN_INPUT], vocab_size)
    check_finite_feeds({name: array for name, array in arrays.items() if name.startswith(PIXEL_PREFIX)})
    return arrays


def as_array(value) -> np.ndarray:
    """``value`` as a numpy array; torch tensors (the compiler's checks) without importing torch here, bfloat16
    ones widened to float32 (numpy has no bfloat16, and bundles compute in float32 where the model was bfloat16)."""
    if not hasattr(value, "detach"):
        return np.asarray(value)
    tensor = value.detach().cpu()
    return (tensor.float() if str(tensor.dtype) == "torch.bfloat16" else tensor).numpy()


def row_major(array: np.ndarray) -> np.ndarray:
    """``array`` with the strides of a fresh C-order array (itself when it has them). Stricter than
    ``np.ascontiguousarray``, which keeps any stride on a size-1 dimension, a stride AOTInductor's input check
    rejects."""
    expected = tuple(int(np.prod(array.shape[i + 1 :])) * array.itemsize for i in range(array.ndim))
    return array if array.strides == expected else array.copy(order="C")


def bound_decode(session, in_graph: bool = False):
    """The decode callable of :func:`clse_fx.deploy.loop.generation_loop` over a decode-graph session
    (:class:`OnnxSession` or ``AotiSession``): the loop hands it the same KV buffers at every step of a
    generation, so they are bound once per generation (:meth:`OnnxSession.bind`) and each step passes only
    the token, its position, the pad counts and the filled slots. ``in_graph``: the graph writes the KV cache
    itself (manifest ``runtime.kv_cache_update``, :data:`~clse_fx.deploy.manifest.KV_IN_GRAPH`); its present
    outputs are bound to the buffers, written in place, and the callable returns the logits alone."""
    if DECODE_STEP_INPUTS[-1] not in session.inputs:
        raise ValueError(
            f"{session.path.name} predates preallocated KV buffers (no cache_lengths); recompile the bundle"
        )
    names = list(session.inputs)[len(DECODE_STEP_INPUTS) :]
    _, outputs = decode_names(len(names) // 2, in_graph)
    shared = {"shared": dict(zip(outputs[1:], names))} if in_graph else {}  # AotiSession.bind binds no outputs
    bound: dict = {}

    def decode(input_ids, position_ids, pad_counts, cache_lengths, buffers: list[np.ndarray]) -> list[np.ndarray]:
        if bound.get("buffers") is not buffers:
            bound.update(buffers=buffers, run=session.bind(dict(zip(names, buffers)), **shared))
        return bound["run"](**dict(zip(DECODE_STEP_INPUTS, (input_ids, position_ids, pad_counts, cache_lengths))))

    return decode
