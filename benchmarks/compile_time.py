"""Compile time per phase and peak memory of one compile, run in a child process so its RSS is its own.

`python -m benchmarks.compile_time tiny|demo|latency OUT.json` compiles that model into a bundle and writes the
phase timings; :func:`measure` runs it and adds the child's peak RSS (from wait4's rusage).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(model: str) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "benchmarks.compile_time", model, str(out)])
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise RuntimeError(f"compile benchmark for {model} failed with exit code {child.returncode}")
        result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - start
    result["cpu_s"] = usage.ru_utime + usage.ru_stime  # steadier than wall time on a shared machine
    return result


def _compile(model_name: str) -> dict:
    import onnx
    import torch

    import clse_fx
    from clse_fx.api import peak_rss_mib
    from clse_fx.deploy.manifest import KV_IN_GRAPH

    score = "clse_attn"
    if model_name == "tiny":  # the tests' random tiny LLaVA: CI checks its figures (benchmarks/thresholds.json)
        from clse_fx.api import load_checkpoint
        from clse_fx.demo import save_tiny_llava

        with tempfile.TemporaryDirectory() as scratch:
            model, processor = load_checkpoint(save_tiny_llava(Path(scratch) / "tiny"))
        keep, text_len = 8, 32
    elif model_name == "demo":  # what `clse-compile --demo --keep 64 --score clse` compiles (the README's command)
        from clse_fx.api import load_checkpoint
        from clse_fx.demo import proxy_model_dir

        (model, processor), keep, text_len, score = load_checkpoint(proxy_model_dir()), 64, 32, "clse"
    else:
        from benchmarks import geometry

        model, processor, keep, text_len = geometry.build(geometry.LLAVA_LATENCY), None, 192, 40
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        start = time.perf_counter()
        bundle = Path(scratch) / "bundle"
        result = clse_fx.compile(
            model, keep=keep, score=score, text_len=text_len, output_dir=bundle, processor=processor
        )
        total = time.perf_counter() - start
        nodes = {name: len(onnx.load(str(bundle / f"{name}.onnx")).graph.node) for name in ("prefill", "decode")}
    manifest = result.manifest
    return {
        "model": model_name,
        "peak_rss_mib": peak_rss_mib(),  # its own: the parent's ru_maxrss would count the parent's peak too
        "phases_s": result.timings,
        "total_s": total,
        # Machine-independent figures, checked against benchmarks/thresholds.json in CI.
        "flops_ratio": manifest.flops["unpruned"] / manifest.flops["pruned"],
        "kv_ratio": manifest.kv_cache_bytes.unpruned / manifest.kv_cache_bytes.pruned,
        "onnx_nodes": nodes,
        # The onnxruntime target's decode step is ONNX Runtime's own (GroupQueryAttention writes the KV cache in
        # place): its findings are by design; the tensorrt target keeps the portable step, checked in the tests.
        "tensorrt_findings": sum(
            len(found)
            for graph, found in manifest.tensorrt_readiness.items()
            if not (graph == "decode" and manifest.runtime.kv_cache_update == KV_IN_GRAPH)
        ),
    }


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(_compile(sys.argv[1])))
