"""``CompileOptions``: every choice of one compile, checked in one place before any model is loaded.

Imports nothing heavy, so the CLI can build and check options (and answer argument errors) at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clse_fx.deploy.files import check_output_dir
from clse_fx.export.targets import TARGETS
from clse_fx.plan import check_budget_given, check_score_layers, parse_stages

DTYPES = ("float32", "float16", "bfloat16")
WEIGHT_FORMATS = ("int8", "int4")  # --weight-format, optimum-cli's name for it (clse_fx/export/quantize.py)
QUANTIZING_TARGETS = ("onnxruntime", "onnxruntime-gpu")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class CompileOptions:
    """What to prune (budget, score, merging), the fixed input geometry to compile for, and what to build.

    ``keep``: average visual tokens per layer (e.g. 128) or a ratio of the visual tokens (e.g. 0.25);
    ``stages``: explicit ``[(layer, keep), ...]`` or ``"1:330,11:210"`` instead of a budget (not both).
    ``dtype`` / ``device``: cast and move the model (in place, as ``nn.Module.to`` does) before tracing; the
    scores stay float32 inside the graph whatever the dtype. Geometry: ``batch`` rows of ``text_len``
    non-image tokens with ``images`` images (``frames`` frames per video; ``image_size`` (H, W) where the
    family's resolution varies). ``weight_format``: int8 / int4 weight-only quantization of the ONNX graphs
    (``clse_fx.export.quantize``; checked against the unquantized program by lossy measures; ``accept_lossy``
    keeps a bundle under their floors, recording the misses, instead of failing the compile). ``output_dir``:
    the bundle to write (None: build and check the pruned program only); ``verify``: measure parity with the
    reference pruner and FLOPs; ``optimize_onnx``: run onnxscript's optimizer on the ONNX graphs (off: about
    twice as fast to export, but larger graphs that TensorRT's parser rejects, since shape values it folds to
    constants stay computed; for quick iterations); ``dump_graph``: a file that receives the graph before and
    after every pass; ``sign_key``: an EC private key (PEM) to sign the bundle's manifest with
    (:mod:`clse_fx.deploy.signing`).
    """

    keep: float | None = None
    stages: str | tuple[tuple[int, int], ...] | None = None
    score: str = "clse_attn"
    kv_policy: str = "uniform"
    merge: str = "none"
    merge_metric: str = "hidden"
    batch: int = 1
    text_len: int = 32
    images: int = 1
    frames: int = 1
    image_size: tuple[int, int] | None = None
    target: str = "onnxruntime"
    dtype: str | None = None  # float32 | float16 | bfloat16; None: the model's own
    weight_format: str | None = None  # int8 | int4: weight-only quantized ONNX graphs; None: weights in ``dtype``
    accept_lossy: bool = False  # keep a quantized bundle that misses the lossy floors (the misses are recorded)
    device: str | None = None  # cpu | cuda; None: where the model is
    output_dir: Path | None = None
    force: bool = False
    fp16: bool = False
    verify: bool = True
    optimize_onnx: bool = True  # onnxscript's graph optimizer on exported graphs (off: faster, larger graphs)
    max_new_tokens: int = 32  # the torch-compile target's static KV cache: prompt plus this many tokens
    dump_graph: str | None = None
    source: Path | None = None  # the checkpoint directory, recorded (with its hash) in the manifest
    sign_key: Path | None = None  # sign the bundle's manifest with this EC private key (OpenSSF model-signing)

    def __post_init__(self) -> None:
        check_budget_given(self.keep, self.stages)
        # score, KV policy and merging are checked where they take effect: PruneConfig.
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.weight_format is not None and self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {self.weight_format!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
        if self.weight_format is not None and self.target not in QUANTIZING_TARGETS:
            raise ValueError(
                f"--weight-format quantizes ONNX Runtime graphs; the {self.target} target has none: use --target "
                f"onnxruntime, or drop --weight-format"
            )
        if self.accept_lossy and (self.weight_format is None or not self.verify):
            raise ValueError(
                "--accept-lossy keeps a --weight-format bundle that misses the lossy floors; it needs --weight-format "
                "and the checks (drop --no-verify), or drop --accept-lossy"
            )
        if self.device is not None and self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        required = TARGETS[self.target].device
        if required is not None and self.device not in (None, required):
            raise ValueError(f"the {self.target} target runs on {required}; drop --device {self.device}")
        if self.batch < 1 or self.text_len < 1 or self.images < 0 or self.frames < 1 or self.max_new_tokens < 1:
            raise ValueError("batch, text length, frames and max new tokens must be >= 1 and images >= 0")
        if self.images == 0:
            raise ValueError("compiling without an image has nothing to prune; pass --images 1 or more")
        if self.output_dir is not None:
            object.__setattr__(self, "output_dir", Path(self.output_dir))
            if not TARGETS[self.target].writes_bundle:
                raise ValueError(f"the {self.target} target builds an in-process module; drop the output dir")
            check_output_dir(self.output_dir, self.force)
        if self.source is not None:
            object.__setattr__(self, "source", Path(self.source).resolve())
        if self.sign_key is not None:
            if self.output_dir is None:
                raise ValueError("signing (--sign) needs a bundle to sign; give an output directory")
            from clse_fx.deploy.signing import signer

            signer(self.sign_key)  # the library and the key, checked before any model is loaded
        if self.stages is not None:  # parsed here so a malformed --stages fails before any model is loaded
            stages = parse_stages(self.stages) if isinstance(self.stages, str) else self.stages
            object.__setattr__(self, "stages", tuple(tuple(stage) for stage in stages))
            check_score_layers(self.score, self.stages)
