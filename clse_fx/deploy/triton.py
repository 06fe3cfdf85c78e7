"""A Triton Inference Server model repository for a bundle.

One ONNX Runtime model per graph of the bundle: ``clse_<name>`` for each graph of the manifest's ``pipeline``
(the graphs run before the prefill, e.g. Qwen2-VL's vision tower and M-RoPE index; LLaVA bundles have none,
their vision tower is inside ``prefill.onnx``), ``clse_prefill`` and ``clse_decode``, every dimension static
as compiled (the decode graph's KV buffer capacity is -1); and ``clse_generate``, a Python-backend model
that runs the generation loop of ``clse_fx.deploy.engine`` over them through BLS calls. Serve it with
``tritonserver --model-repository DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from clse_fx.deploy.files import staged_directory
from clse_fx.deploy.manifest import KV_IN_GRAPH, PREFILL, Manifest, read_manifest, split_prefill_outputs

GENERATE = "clse_generate"
TRITON_TYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
}
# The optional scalar inputs of clse_generate: name, Triton type.
GENERATE_OPTIONS = [
    ("max_new_tokens", "TYPE_INT32"),
    ("do_sample", "TYPE_BOOL"),
    ("temperature", "TYPE_FP32"),
    ("top_k", "TYPE_INT32"),
    ("seed", "TYPE_INT64"),
]
README = """\
# Triton model repository for a clse-fx bundle

    tritonserver --model-repository {repo}

- {models}: ONNX Runtime models with the static shapes the bundle was compiled for
  ({pipeline}); `max_batch_size: 0`, so every request carries the full compiled batch.
- `{generate}`: a Python-backend model that runs {order}, then decode token by token, through BLS calls to
  the models above. Inputs: {inputs}, as `clse_fx.deploy.engine.Engine.encode` makes them (fill a short batch
  with copies of a row), and the optional scalars max_new_tokens (default {max_new_tokens}, at most {limit}),
  do_sample, temperature, top_k and seed. Outputs: `output_ids` [batch, longest answer], -1 after each row's
  end, and `output_lengths` [batch]; decode the ids with the bundle's tokenizer.
"""


def model_name(graph: str) -> str:
    """The Triton model that serves one of the bundle's graphs."""
    return f"clse_{graph}"


def _dims(shape: list) -> str:
    return ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape)


def _tensors(kind: str, entries: list[dict]) -> str:
    blocks = []
    for entry in entries:
        lines = [f'    name: "{entry["name"]}"', f"    data_type: {entry['data_type']}"]
        lines.append(f"    dims: [ {_dims(entry['shape'])} ]")
        if entry.get("optional"):
            lines.append("    optional: true")
        blocks.append("  {\n" + "\n".join(lines) + "\n  }")
    return f"{kind} [\n" + ",\n".join(blocks) + "\n]\n"


def _typed(entries: list[dict]) -> list[dict]:
    try:
        return [dict(entry, data_type=TRITON_TYPES[entry["dtype"]]) for entry in entries]
    except KeyError as error:
        raise ValueError(f"tensor type {error.args[0]} has no Triton equivalent; recompile in float32") from error


def _graphs(manifest: dict) -> dict[str, dict]:
    """The graphs in the order they run: the pipeline's, prefill, decode."""
    names = [*manifest.pipeline, "prefill", "decode"]
    missing = [name for name in names if name not in manifest.graphs]
    if missing:
        raise ValueError(f"the bundle has no {', '.join(missing)} graph; recompile it with an ONNX target")
    return {name: manifest.graphs[name] for name in names}


def onnx_config(graph: str, entry: dict, target: str, precision: str = "fp32") -> str:
    """config.pbtxt of one ONNX graph: the onnxruntime backend, on the GPU (TensorRT accelerated for the
    tensorrt target) unless the bundle targets the CPU."""
    gpu = target in ("onnxruntime-gpu", "tensorrt")
    text = (
        f'name: "{model_name(graph)}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
        + _tensors("input", _typed(entry["inputs"]))
        + _tensors("output", _typed(entry["outputs"]))
        + f"instance_group [ {{ count: 1 kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]\n"
    )
    if target == "tensorrt":
        text += (
            'optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt"\n'
            f'  parameters {{ key: "precision_mode" value: "{precision.upper()}" }} }} ] }} }}\n'
        )
    return text


def generate_settings(manifest: Manifest, max_new_tokens: int, limit: int) -> dict:
    """What ``clse_generate`` reads at load: its inputs, each graph's model and tensor names, stops, limits."""
    named = {
        graph: {
            "model": model_name(graph),
            "inputs": [t["name"] for t in entry["inputs"]],
            "outputs": [t["name"] for t in entry["outputs"]],
        }
        for graph, entry in _graphs(manifest).items()
    }
    # The request brings every input of the pipeline and the prefill that no earlier graph produces.
    inputs: list[str] = []
    produced: set[str] = set()
    for graph in [*manifest.pipeline, "prefill"]:
        inputs += [name for name in named[graph]["inputs"] if name not in produced and name not in inputs]
        produced.update(named[graph]["outputs"])
    # clse_generate asks the prefill for the logits, the cache and the row validity (not positions or kept ids).
    _, _, _, cache, valid = split_prefill_outputs(named[PREFILL]["outputs"], manifest.num_stages)
    return {
        "inputs": inputs,
        "pipeline": [named[graph] for graph in manifest.pipeline],
        "prefill": dict(named[PREFILL], outputs=["logits", *cache, valid]),
        "decode": named["decode"],
        "decode_writes_kv_cache": manifest.runtime.kv_cache_update == KV_IN_GRAPH,
        "shape": [manifest.batch, manifest.sequence_length],
        "decode_position_start": manifest.runtime.decode_position_start,
        "position_offset_input": manifest.runtime.position_offset_input,
        "visual_token_ids": manifest.visual_token_ids,
        "visual_tokens_per_prompt": manifest.geometry["visual_tokens_per_prompt"],
        "vocab_size": manifest.vocab_size(),
        "stop_token_ids": manifest.stop_token_ids(),
        "max_new_tokens": min(max_new_tokens, limit),
        "max_new_tokens_limit": limit,
    }


def generate_config(manifest: dict, settings: dict) -> str:
    """config.pbtxt of the Python-backend generation model."""
    consumed = [t for graph, entry in _graphs(manifest).items() if graph != "decode" for t in entry["inputs"]]
    by_name = {t["name"]: t for t in reversed(consumed)}  # as its first consumer declares it
    inputs = _typed([by_name[name] for name in settings["inputs"]])
    inputs += [{"name": n, "data_type": t, "shape": [1], "optional": True} for n, t in GENERATE_OPTIONS]
    batch = manifest.geometry["batch"]
    outputs = [
        {"name": "output_ids", "data_type": "TYPE_INT64", "shape": [batch, "answer"]},
        {"name": "output_lengths", "data_type": "TYPE_INT64", "shape": [batch]},
    ]
    return (
        f'name: "{GENERATE}"\nbackend: "python"\nmax_batch_size: 0\n'
        + _tensors("input", inputs)
        + _tensors("output", outputs)
        + "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    )


def _link(source: Path, target: Path) -> None:
    """Hard-link (no copy of large graphs), or copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_triton_repo(
    bundle: str | Path, output_dir: str | Path, force: bool = False, max_new_tokens: int = 32, limit: int = 256
) -> Path:
    """Write the Triton model repository of a bundle atomically to ``output_dir``; returns it."""
    from clse_fx.deploy import loop

    bundle = Path(bundle)
    manifest = read_manifest(bundle, verify=True)
    graphs = _graphs(manifest)
    precision = manifest.graphs.get("prefill_tensorrt", {}).get("precision", "fp32")
    target = manifest.target
    settings = generate_settings(manifest, max_new_tokens, limit)
    with staged_directory(output_dir, force) as staging:
        for graph, entry in graphs.items():
            version = staging / model_name(graph) / "1"
            version.mkdir(parents=True)
            (version.parent / "config.pbtxt").write_text(onnx_config(graph, entry, target, precision))
            source = bundle / entry["file"]
            _link(source, version / "model.onnx")
            for name in entry.get("external_data", []):  # weights of graphs over 2 GiB
                _link(source.parent / name, version / name)
        version = staging / GENERATE / "1"
        version.mkdir(parents=True)
        (version.parent / "config.pbtxt").write_text(generate_config(manifest, settings))
        shutil.copyfile(Path(__file__).with_name("triton_model.py"), version / "model.py")
        shutil.copyfile(loop.__file__, version / "clse_runtime.py")
        (version / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        (staging / "README.md").write_text(
            README.format(
                repo=Path(output_dir).resolve(),
                models=", ".join(f"`{model_name(g)}`" for g in graphs),
                pipeline=f"run in order: {', '.join(graphs)}"
                if manifest.pipeline
                else "no graph runs before the prefill: the vision tower is inside it",
                order=", ".join(f"`{model_name(g)}`" for g in graphs if g != "decode"),
                generate=GENERATE,
                inputs=", ".join(settings["inputs"]),
                max_new_tokens=settings["max_new_tokens"],
                limit=limit,
            )
        )
    return Path(output_dir)
