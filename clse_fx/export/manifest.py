"""The bundle manifest as typed sections: what the compile pipeline measured and what each target built.

The pipeline assembles one :class:`Manifest` (``clse_fx.api``); each target builder returns a
:class:`TargetSection` that :meth:`Manifest.add` merges in; ``export.bundle.write_manifest`` writes it with
the files' hashes. The JSON keeps the field names below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TargetSection:
    """A target builder's part of the manifest: the graph files it wrote (name -> file, signature), the graphs
    the runtime runs before the prefill (in order), its parity figures and the seconds of each of its phases.
    ``module`` is an in-process result (the torch-compile target's); it is not written."""

    graphs: dict[str, dict] = field(default_factory=dict)
    pipeline: list[str] = field(default_factory=list)
    parity: dict[str, float | bool] = field(default_factory=dict)
    tensorrt_readiness: dict[str, list[str]] | None = None
    opset: int | None = None
    module: object | None = None


@dataclass
class PlanSection:
    """The pruning plan. ``budget`` is ``--keep`` as given (the paper's nominal budget name, or a ratio; null
    for explicit stages); ``avg_visual_tokens`` is what the decoder layers really run on, on average."""

    budget: float | None
    stages: list[list[int]]
    avg_visual_tokens: float
    visual_tokens_per_layer: list[int]
    score: str
    cutoff: float
    temp: float
    seed: int
    kv_policy: str
    merge: str
    merge_metric: str


@dataclass
class KVCacheSection:
    """Bytes of keys and values after prefill, pruned (under the compiled policy) and unpruned."""

    pruned: int
    unpruned: int
    dtype: str


@dataclass
class Manifest:
    architecture: str
    dtype: str  # the model's parameters (scores are float32 inside the graph whatever it is)
    device: str  # where the program was traced and verified
    source: dict
    target: str
    plan: PlanSection
    geometry: dict  # batch, text_len, images, num_visual, grid, sequence_length, pruned_length + the family's
    image_token_id: int
    visual_token_ids: list[int]  # every id that marks a visual position (image and video placeholders)
    pad_token_id: int
    eos_token_id: int | list[int] | None
    max_position_embeddings: int | None  # caps prompt + generation
    kv_cache_bytes: KVCacheSection
    versions: dict[str, str]
    flops: dict[str, int] | None = None  # pruned and unpruned prefill (docs/method.md#cost)
    parity: dict[str, float | bool] = field(default_factory=dict)
    graphs: dict[str, dict] = field(default_factory=dict)
    pipeline: list[str] = field(default_factory=list)  # graphs the runtime runs, in order, before the prefill
    opset: int | None = None
    tensorrt_readiness: dict[str, list[str]] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    def add(self, section: TargetSection) -> None:
        """Merge a target builder's section (builders run in order; later graphs join earlier ones)."""
        self.graphs.update(section.graphs)
        self.pipeline += [name for name in section.pipeline if name not in self.pipeline]
        self.parity.update(section.parity)
        if section.tensorrt_readiness is not None:
            self.tensorrt_readiness = section.tensorrt_readiness
        self.opset = section.opset or self.opset

    def to_dict(self) -> dict:
        """The JSON form; optional sections a compile did not produce (e.g. FLOPs without verification) are left
        out, other fields are written as they are (an unknown EOS id is null)."""
        optional = {"flops", "opset", "tensorrt_readiness"}
        return {key: value for key, value in asdict(self).items() if value is not None or key not in optional}
