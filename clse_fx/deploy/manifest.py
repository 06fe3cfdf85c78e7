"""The bundle manifest: the one contract between the compiler (``clse_fx.export`` writes it) and deploy
(``clse_fx.deploy`` reads it), with a schema version.

It holds the one definition of the graph names, the prefill's flat output layout, the run-time conventions
(left padding, where decode positions start) and the limits. :func:`read_manifest` validates a bundle's
``manifest.json`` against this schema on load, so an old or foreign manifest is a one-line error and not a
``KeyError`` deep in a generation loop. Only the standard library is imported here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
# 2: typed manifest with runtime conventions and the preprocessing recipe (format_version 1 had neither).
SCHEMA_VERSION = 2

PREFILL, DECODE = "prefill", "decode"
# The decode step's inputs before every layer's KV buffer: the new token [B, 1], its position [B, 1], each
# row's left-pad count [B] and each layer's filled buffer slots [num_layers] (clse_fx.decode.DecodeStep).
DECODE_STEP_INPUTS = ("input_ids", "position_ids", "pad_counts", "cache_lengths")


def prefill_output_names(num_stages: int, num_layers: int) -> list[str]:
    """The prefill graph's outputs, in order: logits, the kept tokens' original positions, each stage's kept
    visual ids, every layer's pruned key and value, then ``valid``: per row, whether the prompt is one the
    graph was built for (the other outputs of an invalid row are meaningless)."""
    cache = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["logits", "positions", *(f"kept_{i}" for i in range(num_stages)), *cache, "valid"]


# Who writes each decode step's new key/value into the KV buffers (runtime.kv_cache_update). KV_RUNTIME: the
# decode graph outputs them (new.{i}.*, [B, Hkv, 1, D]) and the runtime writes them at slot cache_lengths[i].
# KV_IN_GRAPH: the graph writes them there itself (ONNX Runtime's GroupQueryAttention) and outputs each buffer
# (present.{i}.*, shaped as past.{i}.*); a runtime binds every present output to its past input's memory, so
# the write happens in place, or, where it cannot bind outputs (Triton), copies that slot from the returned one.
KV_RUNTIME, KV_IN_GRAPH = "runtime", "in-graph"


def decode_names(num_layers: int, in_graph: bool = False) -> tuple[list[str], list[str]]:
    """Input and output names of the decode-step graph: ``past.{i}.key/value`` are layer i's KV buffers
    [B, Hkv, capacity, D] (capacity dynamic, the first ``cache_lengths[i]`` slots filled); then the logits and
    per layer ``new.{i}.*``, or ``present.{i}.*`` for a graph that writes the cache itself (``in_graph``,
    :data:`KV_IN_GRAPH`)."""
    per_layer = [(i, kind) for i in range(num_layers) for kind in ("key", "value")]
    inputs = [*DECODE_STEP_INPUTS, *(f"past.{i}.{kind}" for i, kind in per_layer)]
    written = "present" if in_graph else "new"
    return inputs, ["logits", *(f"{written}.{i}.{kind}" for i, kind in per_layer)]


def split_prefill_outputs(flat: list | tuple, num_stages: int) -> tuple[Any, Any, list, list, Any]:
    """The prefill's flat outputs as (logits, positions, kept per stage, flat key/value cache, valid rows)."""
    logits, positions, *rest, valid = flat
    return logits, positions, list(rest[:num_stages]), list(rest[num_stages:]), valid


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
class RuntimeSection:
    """How a runtime must drive the graphs (what a standalone numpy + onnxruntime loop needs to know).

    Prompts are left padded to ``sequence_length``; the decode step's ``pad_counts`` is each row's number of
    left-pad tokens; decode positions continue after the unpruned prompt, at ``decode_position_start`` plus,
    where the pipeline outputs ``rope_deltas`` (M-RoPE), that row's delta. ``max_new_tokens`` is what the
    model's positions leave after the prompt (null: unbounded). ``kv_cache_update``: who writes each step's new
    key/value into the KV buffers, :data:`KV_RUNTIME` or :data:`KV_IN_GRAPH` (bundles written before the field
    are the former)."""

    padding: str
    decode_position_start: int
    position_offset_input: str | None
    max_new_tokens: int | None
    kv_cache_update: str = KV_RUNTIME


GEOMETRY_KEYS = ("batch", "text_len", "images", "num_visual", "visual_tokens_per_prompt", "layout", "sequence_length")


@dataclass
class Manifest:
    architecture: str
    dtype: str  # the model's parameters (scores are float32 inside the graph whatever it is)
    device: str  # where the program was traced and verified
    source: dict
    target: str
    plan: PlanSection
    geometry: dict  # GEOMETRY_KEYS, plus the pruned length, one grid's shape and the family's entries
    image_token_id: int
    visual_token_ids: list[int]  # every id that marks a visual position (image and video placeholders)
    pad_token_id: int
    eos_token_id: int | list[int] | None
    max_position_embeddings: int | None  # caps prompt + generation
    kv_cache_bytes: KVCacheSection
    runtime: RuntimeSection
    versions: dict[str, str]
    preprocess: dict | None = None  # the family's recipe from pixels and text (clse_fx.deploy.preprocess)
    flops: dict[str, int] | None = None  # pruned and unpruned prefill (docs/method.md#cost)
    parity: dict[str, float | bool] = field(default_factory=dict)
    graphs: dict[str, dict] = field(default_factory=dict)  # name -> file and signature
    pipeline: list[str] = field(default_factory=list)  # graphs the runtime runs, in order, before the prefill
    opset: int | None = None
    quantization: dict | None = None  # weight-only int8/int4 (clse_fx.export.quantize): formats, bits, bytes
    tensorrt_readiness: dict[str, list[str]] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)  # the compile's peak memory at each phase's end
    files: dict[str, dict] = field(default_factory=dict)  # bundle file -> sha256 and bytes (written last)
    schema_version: int = SCHEMA_VERSION

    @property
    def batch(self) -> int:
        return self.geometry["batch"]

    @property
    def sequence_length(self) -> int:
        return self.geometry["sequence_length"]

    @property
    def num_stages(self) -> int:
        return len(self.plan.stages)

    @property
    def num_layers(self) -> int:
        return len(self.plan.visual_tokens_per_layer)

    def vocab_size(self) -> int:
        """The model's vocabulary size: the last dimension of the prefill's logits."""
        return int(self.graphs[PREFILL]["outputs"][0]["shape"][-1])

    def stop_token_ids(self) -> list[int]:
        """The model's end-of-sequence token ids."""
        eos = self.eos_token_id
        return [] if eos is None else eos if isinstance(eos, list) else [eos]

    def to_dict(self) -> dict:
        """The JSON form; optional sections a compile did not produce (e.g. FLOPs without verification) are left
        out, other fields are written as they are (an unknown EOS id is null)."""
        optional = {"flops", "opset", "tensorrt_readiness", "preprocess", "quantization"}
        return {key: value for key, value in asdict(self).items() if value is not None or key not in optional}

    @classmethod
    def from_dict(cls, data: object, where: str = MANIFEST) -> Manifest:
        """Validate a manifest's JSON form against this schema; anything else is a one-line ValueError."""
        if not isinstance(data, dict) or "schema_version" not in data and "format_version" not in data:
            raise ValueError(f"{where} is not a clse-fx bundle manifest; compile a bundle with clse-compile")
        version = data.get("schema_version", data.get("format_version"))
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{where} has manifest schema {version} but this clse-fx reads schema {SCHEMA_VERSION}; "
                "recompile the bundle with this version's clse-compile"
            )
        try:
            sections = {"plan": PlanSection, "kv_cache_bytes": KVCacheSection, "runtime": RuntimeSection}
            typed = {key: _section(section, data[key]) for key, section in sections.items() if key in data}
            manifest = _section(cls, {**data, **typed})
            missing = [key for key in GEOMETRY_KEYS if key not in manifest.geometry]
            if missing:
                raise KeyError(f"geometry.{missing[0]}")
            if PREFILL not in manifest.graphs or DECODE not in manifest.graphs:
                raise KeyError(f"graphs.{PREFILL if PREFILL not in manifest.graphs else DECODE}")
            _check_numbers(manifest)
            if manifest.runtime.kv_cache_update not in (KV_RUNTIME, KV_IN_GRAPH):
                raise TypeError(f"runtime.kv_cache_update is {manifest.runtime.kv_cache_update!r}")
        except (KeyError, TypeError) as error:
            detail = error.args[0] if error.args else error
            raise ValueError(f"{where} is invalid ({detail}); recompile the bundle") from None
        return manifest


# Manifest numbers a runtime sizes arrays and loops by: each must be an int in its range (a hand-edited batch of
# -1 would answer nothing, 10**12 tokens would allocate terabytes).
MAX_SEQUENCE_LENGTH = 1 << 20
NUMBER_RANGES = {
    "geometry.batch": (1, 4096),
    "geometry.text_len": (1, MAX_SEQUENCE_LENGTH),
    "geometry.images": (1, 4096),
    "geometry.num_visual": (1, MAX_SEQUENCE_LENGTH),
    "geometry.visual_tokens_per_prompt": (1, MAX_SEQUENCE_LENGTH),
    "geometry.sequence_length": (2, MAX_SEQUENCE_LENGTH),
    "runtime.decode_position_start": (1, MAX_SEQUENCE_LENGTH),
    "runtime.max_new_tokens": (0, MAX_SEQUENCE_LENGTH),
    "image_token_id": (0, 1 << 31),
    "pad_token_id": (0, 1 << 31),
}


def _check_numbers(manifest: Manifest) -> None:
    """Each of :data:`NUMBER_RANGES` an int in its range (``runtime.max_new_tokens`` may be null), or a TypeError
    naming the field."""
    for key, (low, high) in NUMBER_RANGES.items():
        section, _, name = key.rpartition(".")
        owner = getattr(manifest, section) if section else manifest
        value = owner.get(name) if isinstance(owner, dict) else getattr(owner, name)
        if value is None and key == "runtime.max_new_tokens":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise TypeError(f"{key} is {value!r}, not an integer in [{low}, {high}]")
    if manifest.sequence_length <= manifest.geometry["visual_tokens_per_prompt"]:
        raise TypeError("geometry.sequence_length leaves no room for text after the visual tokens")


def bundle_file(bundle: Path, manifest: Manifest, name: object, entry: str) -> Path:
    """The bundle file ``name`` that the manifest's ``entry`` refers to, after checking that it stays inside the
    bundle: a relative path that resolves (links followed) under ``bundle`` to a regular file listed (so hashed)
    in ``files``. Anything else is a one-line ValueError naming the entry (FileNotFoundError for a listed file that
    is gone): a bundle reads only itself."""
    root = bundle.resolve()
    path = Path(name) if isinstance(name, str) and name else None
    problem = None
    if path is None:
        problem = "is not a file name"
    elif path.is_absolute() or ".." in path.parts:
        problem = f"names {name!r} outside the bundle"
    elif not (bundle / path).resolve().is_relative_to(root):
        problem = f"names {name!r}, a link that leads outside the bundle"
    elif name not in manifest.files:
        problem = f"names {name!r}, which is not listed (so not hash-checked) in the manifest's files"
    elif not (bundle / path).exists():
        raise FileNotFoundError(f"bundle file {name} is missing from {bundle}; recompile the bundle")
    elif not (bundle / path).is_file():
        problem = f"names {name!r}, which is not a regular file in the bundle"
    if problem:
        raise ValueError(f"{MANIFEST} entry {entry} {problem}; recompile the bundle")
    return bundle / path


def _section(cls: type, data: object):
    """``cls`` from a JSON object, naming the first missing or unknown field."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} must be an object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names - {"format_version"})
    if unknown:
        raise KeyError(f"unknown field {unknown[0]}")
    required = [f.name for f in dataclasses.fields(cls) if _required(f)]
    absent = [name for name in required if name not in data]
    if absent:
        raise KeyError(f"missing field {absent[0]}")
    return cls(**{key: value for key, value in data.items() if key in names})


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle: str | Path, verify: bool = True) -> Manifest:
    """Load and validate a bundle's manifest; with ``verify``, check every listed file exists and matches its
    hash."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{bundle} is not a clse-fx bundle (no {MANIFEST}); compile one with clse-compile")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupted ({error}); recompile the bundle") from error
    manifest = Manifest.from_dict(data, str(path))
    for name, graph in manifest.graphs.items():  # every file a runtime opens: inside the bundle, listed, hashed
        for file in [graph.get("file"), *graph.get("external_data", [])]:
            bundle_file(bundle, manifest, file, f"graphs.{name}")
    tokenizer = ((manifest.preprocess or {}).get("text") or {}).get("tokenizer")
    if tokenizer is not None:
        bundle_file(bundle, manifest, tokenizer, "preprocess.text.tokenizer")
    if verify:
        for name, entry in manifest.files.items():
            file = bundle_file(bundle, manifest, name, f"files.{name}")  # never read a FIFO or a file outside
            if not isinstance(entry, dict) or sha256(file) != entry.get("sha256"):
                raise ValueError(f"bundle file {name} does not match its manifest hash (corrupted?); recompile")
    return manifest
