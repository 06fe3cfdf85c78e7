"""Does the pruned prefill trace on this PyTorch? `python -m benchmarks.trace_matrix` (about 3 minutes on 2 cores).

Traces LLaVA-1.5-7B geometry and runs the passes and the static re-export (`prune_prefill`, budget 192) at
batch 1 and 8 in float32, bfloat16 and float16:

- at full width on the meta device (no weights): every shape, dtype and symbol of the real model, but SDPA's
  backend selector does not run on meta;
- at 1/8 width on the CPU with real tensors: the same depth, tokens and head ratio, through the CPU backend
  selector, where torch 2.11 specialised the batch (`check_attn_mask_shape`, see clse_fx/trace.py);
- at full width on CUDA (``--device cuda``), through the CUDA selector.

Writes one entry per PyTorch version and device into benchmarks/results/trace_matrix.json, keeping the others,
so running it from several environments builds the support table the `torch` pin is based on.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks import geometry
from clse_fx.compiler import pass_settings, prune_prefill
from clse_fx.plan import PruneConfig, plan_budget

RESULTS = Path(__file__).parent / "results" / "trace_matrix.json"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BATCHES = (1, 8)


def trace_case(model, batch: int, device: str, dtype: torch.dtype) -> dict:
    """One `prune_prefill` at ``batch``: "ok" and its seconds, or the error's first line. On CUDA the program also
    runs once, and its logits must be finite."""
    cpu = geometry.prompt(model, 40, batch=batch)
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in cpu.items()}
    prune = PruneConfig(plan=plan_budget(192, 32, 576))
    start = time.perf_counter()
    try:
        # Settings from the CPU ids: a meta model's input ids cannot be read.
        pruned = prune_prefill(model, prune, inputs, settings=pass_settings(model, prune, cpu))
        seconds = round(time.perf_counter() - start, 1)
        if device == "cuda" and not torch.isfinite(pruned().logits[:, -1]).all():
            return {"result": "ran, but the last logits are not finite", "seconds": seconds}
    except Exception as error:  # the matrix records failures instead of stopping at the first
        return {"result": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"}
    return {"result": "ok", "seconds": seconds} | ({"ran": True} if device == "cuda" else {})


SETUPS = {  # device -> (width, geometry name)
    "meta": (geometry.LLAVA_7B, "LLaVA-1.5-7B"),
    "cpu": (geometry.LLAVA_LATENCY, "LLaVA-1.5-7B at 1/8 width"),
    "cuda": (geometry.LLAVA_7B, "LLaVA-1.5-7B"),
}


def measure(device: str, dtypes: tuple[torch.dtype, ...] = DTYPES) -> dict:
    """Every dtype and batch on ``device``: its rows, with the Python version and GPU name they ran with."""
    width, name = SETUPS[device]
    rows = []
    for dtype in dtypes:
        model = geometry.build(width, device, dtype=dtype)
        for batch in BATCHES:
            with torch.no_grad():
                row = {"geometry": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch}
                row |= trace_case(model, batch, device, dtype)
            rows.append(row)
            print(json.dumps({"device": device, **row}), flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {"python": platform.python_version(), "gpu": gpu, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trace_matrix", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", action="append", choices=sorted(SETUPS), help="where to trace (repeatable; default: meta and cpu)"
    )
    parser.add_argument(
        "--dtype", action="append", choices=[str(d).removeprefix("torch.") for d in DTYPES], help="default: all"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON to merge into (default: {RESULTS})")
    args = parser.parse_args(argv)
    dtypes = tuple(getattr(torch, name) for name in args.dtype) if args.dtype else DTYPES
    devices = args.device or ["meta", "cpu"]
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    entries = results.setdefault(torch.__version__, {})
    for device in devices:
        entries[device] = measure(device, dtypes)
    args.out.write_text(json.dumps(dict(sorted(results.items())), indent=2) + "\n")
    rows = [row for device in devices for row in entries[device]["rows"]]
    traced = sum(row["result"] == "ok" for row in rows)
    print(f"torch {torch.__version__}: {traced} of {len(rows)} traced ({', '.join(devices)})")
    return 0 if traced == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
