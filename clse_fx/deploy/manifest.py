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
from typing import Any, BinaryIO

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # a 7B bundle's manifest (with its initializer tables) is well under 1 MiB
HASH_BLOCK = 1 << 20  # L2-sized: larger blocks hashed no faster here
# 2: typed manifest with runtime conventions and the preprocessing recipe (format_version 1 had neither).
SCHEMA_VERSION = 2

PREFILL, DECODE = "prefill", "decode"
# The decode step's inputs before every layer's KV buffer: the new token [B, 1], its position [B, 1], each
# row's left-pad count [B] and each layer's filled buffer slots [num_layers] (clse_fx.decode.DecodeStep).
DECODE_STEP_INPUTS = ("input_ids", "position_ids", "pad_counts", "cache_lengths")


def prefill_output_names(num_stages: int, num_layers: int) -> list[str]:
    """The prefill graph's outputs, in order: the last position's logits [B, 1, V], the kept tokens' original
    positions, each stage's kept visual ids, every layer's pruned key and value, then ``valid``: per row, whether
    the prompt is one the graph was built for (the other outputs of an invalid row are meaningless)."""
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
            _check_layout(manifest)
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


def _check_layout(manifest: Manifest) -> None:
    """The plan's stages and layers agree with the graphs' recorded inputs and outputs, the layout the runtime
    splits outputs by (an edited ``plan.stages`` would misread every output after the logits), and the logits
    give the vocabulary size; otherwise a TypeError naming the field."""
    plan = manifest.plan
    pairs = isinstance(plan.stages, list) and all(
        isinstance(stage, list) and len(stage) == 2 and all(is_count(n) for n in stage) for stage in plan.stages
    )
    if not pairs or not isinstance(plan.visual_tokens_per_layer, list):
        raise TypeError("plan.stages is not a list of [layer, keep] pairs, or plan.visual_tokens_per_layer not a list")
    layers = manifest.num_layers
    decode_inputs, decode_outputs = decode_names(layers, manifest.runtime.kv_cache_update == KV_IN_GRAPH)
    expected = {
        f"graphs.{PREFILL}.outputs": (PREFILL, "outputs", prefill_output_names(manifest.num_stages, layers)),
        f"graphs.{DECODE}.inputs": (DECODE, "inputs", decode_inputs),
        f"graphs.{DECODE}.outputs": (DECODE, "outputs", decode_outputs),
    }
    for key, (graph, side, names) in expected.items():
        recorded = manifest.graphs[graph].get(side) if isinstance(manifest.graphs[graph], dict) else None
        if not isinstance(recorded, list) or [v.get("name") if isinstance(v, dict) else v for v in recorded] != names:
            raise TypeError(f"{key} do not match plan.stages and plan.visual_tokens_per_layer")
    shape = manifest.graphs[PREFILL]["outputs"][0].get("shape")
    if not isinstance(shape, list) or not shape or not is_count(shape[-1]) or shape[-1] < 1:
        raise TypeError(f"graphs.{PREFILL}.outputs[0] (logits) has no vocabulary size")


def is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def error_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an error's text (its type's name if it has none), cut to ``limit`` characters: the detail
    of a one-line message that wraps another library's error."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]


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


def file_sha256(file: BinaryIO) -> str:
    """The sha256 of an open file's content from its current position, read in large blocks into one buffer."""
    digest, buffer = hashlib.sha256(), bytearray(HASH_BLOCK)
    view = memoryview(buffer)
    while count := file.readinto(buffer):
        digest.update(view[:count])
    return digest.hexdigest()


def sha256(path: str | Path) -> str:
    with open(path, "rb", buffering=0) as file:
        return file_sha256(file)


def manifest_bytes(bundle: Path) -> bytes:
    """``manifest.json``'s bytes, at most :data:`MAX_MANIFEST_BYTES` (a runtime never reads an unbounded file)."""
    path = bundle / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{bundle} is not a clse-fx bundle (no {MANIFEST}); compile one with clse-compile")
    with open(path, "rb") as file:
        data = file.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError(f"{path} is over {MAX_MANIFEST_BYTES >> 20} MiB, which no manifest is; recompile the bundle")
    return data


def parse_manifest(data: bytes, where: str) -> Manifest:
    """A manifest from its JSON bytes, validated (:meth:`Manifest.from_dict`); undecodable or absurdly nested JSON
    is the same one-line error as a damaged field."""
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{where} is corrupted ({error}); recompile the bundle") from None
    except RecursionError:
        raise ValueError(f"{where} is corrupted (nested too deeply); recompile the bundle") from None
    return Manifest.from_dict(parsed, where)


def check_references(bundle: Path, manifest: Manifest) -> None:
    """Every file a runtime opens by a manifest entry (graphs, their weight files, the tokenizer) stays inside the
    bundle and is listed (so hashed) in ``files``: :func:`bundle_file`."""
    for name, graph in manifest.graphs.items():
        external = graph.get("external_data", []) if isinstance(graph, dict) else None
        if not isinstance(external, list):
            raise ValueError(f"{MANIFEST} entry graphs.{name} is malformed; recompile the bundle")
        for file in [graph.get("file"), *external]:
            bundle_file(bundle, manifest, file, f"graphs.{name}")
    tokenizer = ((manifest.preprocess or {}).get("text") or {}).get("tokenizer")
    if tokenizer is not None:
        bundle_file(bundle, manifest, tokenizer, "preprocess.text.tokenizer")


def read_manifest(bundle: str | Path, verify: bool = True, verify_key: str | Path | None = None) -> Manifest:
    """Load and validate a bundle's manifest. With ``verify``, every listed file must match its hash and every ONNX
    graph's weights the manifest's table (:func:`clse_fx.deploy.verify.open_bundle`); with ``verify_key`` (an
    OpenSSF model-signing public key), the manifest must carry a signature that key verifies."""
    bundle = Path(bundle)
    if verify or verify_key is not None:
        from clse_fx.deploy.verify import open_bundle

        return open_bundle(bundle, verify_key).manifest
    manifest = parse_manifest(manifest_bytes(bundle), str(bundle / MANIFEST))
    check_references(bundle, manifest)
    return manifest
