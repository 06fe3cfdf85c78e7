"""Latency on this machine: ONNX Runtime pruned vs unpruned (prefill and decode), our engine vs the eager
reference pruner, the share of pruned prefill spent in CLSE scoring + gathers, FFT-free vs torch.fft."""

from __future__ import annotations

import ast
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from benchmarks import geometry
from clse_fx.compiler import pass_settings, prune_prefill
from clse_fx.decode import export_decode
from clse_fx.deploy.loop import KVBuffers
from clse_fx.deploy.manifest import DECODE_STEP_INPUTS, decode_names
from clse_fx.deploy.session import OnnxSession
from clse_fx.export.onnxruntime import export_onnx, export_program, input_names
from clse_fx.metrics import prefill_flops, unpruned_prefill_flops
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import reference_prune
from clse_fx.scoring import spectral_energy


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved(cases: dict, repeats: int) -> dict[str, float]:
    """Median ms of each case, running the cases round-robin so machine noise hits all of them alike."""
    for fn in cases.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            samples[name].append(_timed(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def clse_share(onnx_path: Path, feeds: dict, runs: int = 5) -> float:
    """Share of prefill kernel time in nodes traced from the CLSE stages (scoring, top-K, gathers)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    in_stage = set()
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes" and any(
                s.startswith("clse.stage") for s in ast.literal_eval(prop.value)
            ):
                in_stage.add(node.name)
    options = onnxruntime.SessionOptions()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as scratch:
        options.profile_file_prefix = str(Path(scratch) / "profile")
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    total = stage = 0.0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total += event["dur"]
            if event["name"].removesuffix("_kernel_time") in in_stage:
                stage += event["dur"]
    return stage / total


def spectral_speed(repeats: int) -> dict[str, float]:
    """FFT-free circulant form vs torch.fft on a 24x24 grid of 4096 channels (LLaVA-1.5-7B's visual tokens)."""
    z = torch.randn(1, 576, 4096)
    times = interleaved(
        {
            "fft": lambda: spectral_energy(z, (1, 24, 24), impl="fft"),
            "matmul": lambda: spectral_energy(z, (1, 24, 24), impl="matmul"),
        },
        repeats,
    )
    return {"fft_ms": times["fft"], "matmul_ms": times["matmul"], "speedup": times["fft"] / times["matmul"]}


def run(repeats: int = 10, text_len: int = 40, decode_steps: int = 16, workdir: Path | None = None) -> dict:
    model = geometry.build(geometry.LLAVA_LATENCY)
    inputs = geometry.prompt(model, text_len)
    with torch.no_grad():
        prune = PruneConfig(plan=plan_budget(192, 32, 576))
        pruned = prune_prefill(model, prune, inputs)
        # The unpruned engine: the same passes and static export with no stage inserted.
        unpruned = prune_prefill(model, prune, inputs, settings=dataclasses.replace(pruned.settings, stages=()))
        merge = dataclasses.replace(prune, merge="tome")  # CLSE-M on the same plan
        merged = prune_prefill(model, merge, inputs, settings=pass_settings(model, merge, inputs))
    workdir = Path(workdir or tempfile.mkdtemp())
    programs = {"pruned": pruned, "unpruned": unpruned, "merged": merged}
    paths = {name: export_onnx(prog, workdir / f"{name}.onnx") for name, prog in programs.items()}
    sessions = {name: OnnxSession(path) for name, path in paths.items()}
    feeds = dict(zip(input_names(pruned), (a.numpy() for a in pruned.example_args)))

    # Decode: one graph serves both caches (each layer's KV buffer capacity is a dynamic dimension).
    caches = {name: prog().cache for name, prog in (("pruned", pruned), ("unpruned", unpruned))}
    decode_path = export_program(
        export_decode(model, caches["pruned"]), workdir / "decode.onnx", *decode_names(len(caches["pruned"]))
    )
    decode = OnnxSession(decode_path)

    def decode_loop(cache):
        # As the bundle's runtime decodes: KV buffers allocated once and bound once, one slot written a step.
        kv = KVBuffers([t.numpy() for pair in cache for t in pair], decode_steps)
        run = decode.bind(dict(zip(list(decode.inputs)[len(DECODE_STEP_INPUTS) :], kv.buffers)))
        seq = feeds["input_ids"].shape[1]
        token = np.ones((1, 1), dtype=np.int64)
        for step in range(decode_steps):
            logits, *new = run(
                input_ids=token,
                position_ids=np.full((1, 1), seq + step),
                pad_counts=np.zeros(1, dtype=np.int64),
                cache_lengths=kv.filled.copy(),
            )
            kv.write(new)

    with torch.no_grad():
        times = interleaved(
            {
                "prefill_pruned": lambda: sessions["pruned"].run(**feeds),
                "prefill_unpruned": lambda: sessions["unpruned"].run(**feeds),
                "prefill_merged": lambda: sessions["merged"].run(**feeds),
                "prefill_eager_reference": lambda: reference_prune(model, prune, **inputs),
                "decode_pruned": lambda: decode_loop(caches["pruned"]),
                "decode_unpruned": lambda: decode_loop(caches["unpruned"]),
            },
            repeats,
        )
    flops = {"pruned": prefill_flops(pruned), "unpruned": unpruned_prefill_flops(model, inputs)}
    speedup = times["prefill_unpruned"] / times["prefill_pruned"]
    flops_ratio = flops["unpruned"] / flops["pruned"]
    return {
        "model": "LLaVA-1.5 geometry at 1/8 width (32 layers, 576 visual tokens), random weights, float32",
        "device": f"CPU ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}",
        "text_tokens": text_len,
        "plan": [list(s) for s in prune.plan.stages],
        "repeats": repeats,
        "median_ms": {
            "prefill_pruned": times["prefill_pruned"],
            "prefill_unpruned": times["prefill_unpruned"],
            "prefill_eager_reference": times["prefill_eager_reference"],
            "prefill_merged": times["prefill_merged"],
            "decode_per_token_pruned": times["decode_pruned"] / decode_steps,
            "decode_per_token_unpruned": times["decode_unpruned"] / decode_steps,
        },
        "prefill_speedup": speedup,
        "flops_ratio": flops_ratio,
        "speedup_over_flops_ratio": speedup / flops_ratio,
        "engine_vs_eager_reference": times["prefill_eager_reference"] / times["prefill_pruned"],
        "decode_speedup": times["decode_unpruned"] / times["decode_pruned"],
        "clse_share_of_pruned_prefill": clse_share(paths["pruned"], feeds),
        # CLSE-M: the same plan with pruned tokens merged into kept ones; its stage nodes include the merge.
        "clse_share_of_merged_prefill": clse_share(paths["merged"], feeds),
        "merge_extra_time_share": (times["prefill_merged"] - times["prefill_pruned"]) / times["prefill_merged"],
        "spectral_fft_free_vs_torch_fft": spectral_speed(repeats),
    }


if __name__ == "__main__":
    print(json.dumps(run(repeats=3), indent=2))
