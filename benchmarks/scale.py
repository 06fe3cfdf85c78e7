"""Compile LLaVA-1.5 geometry at growing widths through the CLI, as a user does: `python -m benchmarks.scale`.

Per width (``--width 1/8 --width 1/4 --width 1``; 1 is the full 7B): a float16 checkpoint with random weights
written by ``save_pretrained`` (32 layers, 576 visual tokens, the real 32064-token vocabulary; text and vision
widths scaled), then per weight format (``--weight-format none int8 int4``; none: float16 weights)
``clse-compile CKPT --keep 192 --dtype float16 [--weight-format F --accept-lossy]`` in a child process, then one
prompt through the bundle's ``Engine`` (prefill and 8 decode tokens) in another. Records parameters, checkpoint
bytes, the compile's wall and CPU seconds, its peak RSS (the child's, from ``getrusage``) and the seconds and peak
RSS at the end of each phase (from the manifest), the bundle's bytes, the loaded Engine's peak RSS and time, and
for quantized bundles the lossy figures and any floor missed. Merges into benchmarks/results/scale.json (keyed by
width) and prints the ratios the scale targets are stated in.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch

from benchmarks import geometry

RESULTS = Path(__file__).parent / "results" / "scale.json"
ENGINE_RUN = """
import json, sys, time
import numpy as np
from clse_fx.api import peak_rss_mib
from clse_fx.deploy.engine import Engine
start = time.perf_counter()
engine = Engine.load(sys.argv[1])
loaded = time.perf_counter() - start
m = engine.manifest
ids = np.full((m.batch, m.sequence_length), 5, dtype=np.int64)
ids[:, 1 : 1 + m.geometry["num_visual"]] = m.image_token_id
pixels = np.random.default_rng(0).standard_normal((m.batch, 3, 336, 336)).astype(np.float32)
start = time.perf_counter()
feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": pixels}
tokens, timings = engine.generate_ids(feeds, 9)
print(json.dumps({"load_s": loaded, "generate_s": time.perf_counter() - start, "prefill_ms": timings.prefill_ms,
                  "decode_ms_per_token": timings.decode_ms_per_token,
                  "peak_rss_bytes": int(peak_rss_mib() * 2**20)}))
"""


def width_geometry(width: Fraction) -> dict:
    """LLaVA-1.5-7B's geometry with text and vision widths scaled by ``width`` (heads keep their 128 / 64 dims)."""
    full = geometry.LLAVA_7B
    return dict(
        hidden=int(full["hidden"] * width),
        intermediate=int(full["intermediate"] * width),
        heads=max(1, int(full["heads"] * width)),
        vocab=full["vocab"],
        vision_hidden=int(full["vision_hidden"] * width),
        vision_layers=full["vision_layers"],
    )


def watched(command: list[str]) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    """Run ``command``, sampling its memory every 0.2 s (PSS every 2 s, or as RSS grows): the peak anonymous
    memory (what the kernel cannot drop), the peak file-backed resident memory (memory-mapped weights: clean pages
    the kernel reclaims under pressure and reads again) and the peak proportional set size (PSS: a page mapped
    twice, as ONNX Runtime maps the shared weights file once per session, counts once; RSS counts it twice), in
    MiB. The scale targets are stated in RSS."""
    peaks = {"anon_peak": 0.0, "file_peak": 0.0, "pss_peak": 0.0, "rss_peak": 0.0}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        rss_at_pss = 0.0
        for sample in itertools.count():
            if child.poll() is not None:
                break
            try:
                status = Path(f"/proc/{child.pid}/status").read_text().splitlines()
            except OSError:
                break
            fields = {line.split(":")[0]: line.split()[1] for line in status if line.startswith(("Rss", "Vm"))}
            peaks["rss_peak"] = max(peaks["rss_peak"], int(fields.get("VmHWM", 0)) / 1024)
            peaks["anon_peak"] = max(peaks["anon_peak"], int(fields.get("RssAnon", 0)) / 1024)
            peaks["file_peak"] = max(peaks["file_peak"], int(fields.get("RssFile", 0)) / 1024)
            # smaps_rollup walks every mapped page (~0.1 s at 7B: read at every sample it took half a core from the
            # compile being measured), so it is read every 10th sample, and whenever RSS has grown by 64 MiB
            rss = int(fields.get("VmRSS", 0)) / 1024
            if sample % 10 == 0 or rss > rss_at_pss + 64:
                rss_at_pss = rss
                with contextlib.suppress(OSError):
                    rollup = Path(f"/proc/{child.pid}/smaps_rollup").read_text().splitlines()
                    pss = next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
                    peaks["pss_peak"] = max(peaks["pss_peak"], pss / 1024)
            time.sleep(0.2)
        child.wait()
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(command, child.returncode, out.read(), err.read()), peaks


def read_gb_per_s(gib: int = 2, threads: int = 2, repeats: int = 5) -> float:
    """This machine's memory read bandwidth as a decode step sees it: ``threads`` threads (ONNX Runtime's) summing
    their halves of a ``gib`` GiB array, the best of ``repeats`` (numpy releases the GIL in the reduction)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    parts = np.array_split(np.ones(gib * 2**30 // 4, dtype=np.float32), threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    return gib * 2**30 / best / 1e9


def decode_weight_bytes(manifest: dict) -> int:
    """The bytes a decode step reads from its weights: every decode initializer but the embedding table, of which
    it reads one row per token."""
    entries = manifest["graphs"]["decode"]["initializers"]
    return sum(e["length"] for name, e in entries.items() if "embed_tokens" not in name)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_checkpoint(width: Fraction, checkpoint: Path) -> int:
    """Save the float16 checkpoint of ``width``; returns its parameter count."""
    model = geometry.build(width_geometry(width), dtype=torch.float16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(checkpoint, max_shard_size="2GB")  # a shard is serialised in memory: keep them small
    del model
    os.sync()  # on disk, as a downloaded checkpoint is: the kernel cannot drop pages not yet written back
    return parameters


def measure(checkpoint: Path, parameters: int, weight_format: str, work: Path) -> dict:
    bundle = work / f"bundle-{weight_format}"
    command = [sys.executable, "-m", "clse_fx.cli", str(checkpoint), "--keep", "192", "--dtype", "float16"]
    command += ["-o", str(bundle), "--force"]
    # A random checkpoint's near-flat logits can miss the int4 floors (docs/compile.md): keep the bundle and record it
    command += [] if weight_format == "none" else ["--weight-format", weight_format, "--accept-lossy"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done, compile_memory = watched(command)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"clse-compile failed for {bundle.name}: {done.stderr.strip().splitlines()[-1]}")
    manifest = json.loads((bundle / "manifest.json").read_text())
    engine, engine_memory = watched([sys.executable, "-c", ENGINE_RUN, str(bundle)])
    if engine.returncode != 0:
        raise RuntimeError(f"the Engine failed on {bundle.name}: {engine.stderr.strip().splitlines()[-1]}")
    checkpoint_bytes, bundle_bytes = directory_bytes(checkpoint), directory_bytes(bundle)
    shutil.rmtree(bundle)  # a 7B bundle is 13 GB: one on disk at a time
    row = {
        "weight_format": weight_format,
        "parameters": parameters,
        "checkpoint_bytes": checkpoint_bytes,
        "compile_wall_s": round(wall, 1),
        "compile_cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
        "compile_peak_rss_bytes": int(compile_memory["rss_peak"] * 2**20),  # its VmHWM (peak RSS)
        "phase_seconds": manifest["timings_s"],
        "phase_peak_rss_mib": manifest.get("peak_rss_mib", {}),
        "bundle_bytes": bundle_bytes,
        "bundle_files": {name: entry["bytes"] for name, entry in manifest["files"].items()},
        "engine": json.loads(engine.stdout.strip().splitlines()[-1]) | {"memory_mib": engine_memory},
        "compile_memory_mib": compile_memory,
        "decode_weight_bytes": decode_weight_bytes(manifest),
    }
    if weight_format != "none":
        row["lossy"] = {k: v for k, v in manifest["parity"].items() if k.startswith("lossy_")}
        row["below_lossy_floors"] = manifest["quantization"]["below_floors"]
    row["compile_peak_rss_over_checkpoint"] = row["compile_peak_rss_bytes"] / checkpoint_bytes
    row["bundle_over_checkpoint"] = row["bundle_bytes"] / checkpoint_bytes
    row["engine_rss_over_checkpoint"] = row["engine"]["peak_rss_bytes"] / checkpoint_bytes
    row["compile_anon_peak_over_checkpoint"] = compile_memory["anon_peak"] * 2**20 / checkpoint_bytes
    row["engine_anon_peak_over_checkpoint"] = engine_memory["anon_peak"] * 2**20 / checkpoint_bytes
    row["engine_pss_peak_over_checkpoint"] = engine_memory["pss_peak"] * 2**20 / checkpoint_bytes
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--width", action="append", type=Fraction, help="e.g. 1/8 (repeatable; default 1/8)")
    parser.add_argument(
        "--weight-format", nargs="+", default=["none"], choices=["none", "int8", "int4"], help="bundles to compile"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON to merge into (default: {RESULTS})")
    args = parser.parse_args(argv)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    bandwidth = round(read_gb_per_s(), 2)  # before any checkpoint is in memory
    for width in args.width or [Fraction(1, 8)]:
        with tempfile.TemporaryDirectory() as work:
            parameters = write_checkpoint(width, Path(work) / "checkpoint")
            for weight_format in args.weight_format:
                row = measure(Path(work) / "checkpoint", parameters, weight_format, Path(work))
                row["read_gb_per_s"] = bandwidth
                key = str(width) if weight_format == "none" else f"{width} {weight_format}"
                results[key] = row
                args.out.write_text(json.dumps(results, indent=2) + "\n")
                print(f"width {width}, weights {weight_format}: {summary(row, results.get(str(width)))}", flush=True)
    return 0


def summary(row: dict, float16: dict | None) -> str:
    """One line of the figures the scale targets are stated in (quantized rows: also against float16's), and the
    decode step's time against reading its weights once at the measured bandwidth."""
    line = (
        f"{row['parameters'] / 1e6:.0f}M parameters, checkpoint {row['checkpoint_bytes'] / 2**30:.2f} GiB; compile "
        f"{row['compile_wall_s']:.0f} s, peak RSS {row['compile_peak_rss_over_checkpoint']:.2f}x the checkpoint "
        f"(anonymous {row['compile_anon_peak_over_checkpoint']:.2f}x); bundle {row['bundle_over_checkpoint']:.2f}x; "
        f"Engine RSS {row['engine_rss_over_checkpoint']:.2f}x (anonymous "
        f"{row['engine_anon_peak_over_checkpoint']:.2f}x, PSS {row['engine_pss_peak_over_checkpoint']:.2f}x); "
        f"TTFT {row['engine']['prefill_ms'] / 1e3:.1f} s, decode {row['engine']['decode_ms_per_token']:.0f} ms/token "
        f"(reading its weights once: {row['decode_weight_bytes'] / row['read_gb_per_s'] / 1e6:.0f} ms at "
        f"{row['read_gb_per_s']} GB/s)"
    )
    if row["weight_format"] == "none" or float16 is None or "decode_ms_per_token" not in float16["engine"]:
        return line
    ttft = row["engine"]["prefill_ms"] / float16["engine"]["prefill_ms"]
    speed = float16["engine"]["decode_ms_per_token"] / row["engine"]["decode_ms_per_token"]
    disk = row["bundle_bytes"] / float16["bundle_bytes"]
    return f"{line}; against float16: bundle {disk:.2f}x, TTFT {ttft:.2f}x, decode speed {speed:.2f}x"


if __name__ == "__main__":
    raise SystemExit(main())
