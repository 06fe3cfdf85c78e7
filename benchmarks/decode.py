"""Decode ms/token from token 1 to 200 and tokens/s, ONNX Runtime on this CPU: the bundle's decode loop
(preallocated KV buffers bound once, one slot written per step) against the old loop that concatenated every
layer's cache each step; at batch 1 and a compiled batch, pruned vs unpruned KV cache.

`python -m benchmarks.decode` (about 2 minutes on 2 cores) writes benchmarks/results/decode.json.

The model is the latency benchmark's width (LLaVA-1.5 shapes at 1/8 width, 576 visual tokens + 40 text) with 8
decoder layers instead of 32: the cache-copy cost and the per-step compute both scale with depth, so their ratio,
which is what the figures show, does not depend on it. Both loops run the same exported decode step (this
version's graph; the old loop feeds it caches with every slot filled), so they differ only in the runtime: the
old graph also concatenated inside the graph, so the old loop measured here is faster than the old bundle was.
Times are this thread's CPU time (ONNX Runtime with one intra-op thread runs every kernel on the calling
thread), not wall-clock time: other processes share this machine's 2 cores, and wall-clock figures varied up to
5x with their load. The two loops run in lockstep (:func:`lockstep`) and each token's time is the fastest of two
runs. Tokens/s is batch x tokens over the summed per-token times. The first token of the bundle's loop includes
binding the buffers.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from transformers import LlavaForConditionalGeneration

from benchmarks import geometry
from clse_fx.compiler import prune_prefill
from clse_fx.decode import export_decode
from clse_fx.deploy.loop import KVBuffers
from clse_fx.deploy.manifest import DECODE_STEP_INPUTS, decode_names
from clse_fx.deploy.session import OnnxSession, bound_decode
from clse_fx.export.onnxruntime import export_program
from clse_fx.plan import PruneConfig, plan_budget

HERE = Path(__file__).parent
LAYERS, TEXT_LEN, BUDGET = 8, 40, 192
REPEATS = 2
WINDOW = 10  # tokens per end of the flatness ratio (medians, against noise from other processes)


def build_model() -> LlavaForConditionalGeneration:
    config = geometry.llava_config(**geometry.LLAVA_LATENCY)
    config.text_config.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def caches(model) -> tuple[dict[str, list[np.ndarray]], np.ndarray, int]:
    """Each layer's key and value after the pruned and the unpruned prefill at batch 1, the last logits row and the
    prompt length."""
    inputs = geometry.prompt(model, TEXT_LEN)
    prune = PruneConfig(plan=plan_budget(BUDGET, LAYERS, 576))
    with torch.no_grad():
        pruned = prune_prefill(model, prune, inputs)
        unpruned = prune_prefill(model, prune, inputs, settings=dataclasses.replace(pruned.settings, stages=()))
        outs = {"pruned": pruned(), "unpruned": unpruned()}
    flat = {name: [t.numpy() for pair in out.cache for t in pair] for name, out in outs.items()}
    return flat, outs["pruned"].logits[:, -1].numpy(), inputs["input_ids"].shape[1]


def lockstep(session: OnnxSession, cache: list[np.ndarray], first: np.ndarray, seq: int, steps: int):
    """Both runtimes decode ``steps`` tokens in lockstep (each step of one, then the same step of the other, in
    alternating order), so load from other processes hits both alike. The old runtime: every layer's cache
    grows by concatenation each step and is fed whole with session.run. The bundle's: generation_loop's
    components, :class:`KVBuffers` bound once through the Engine's decode callable, one slot written a step.
    Per token, each one's ms (step, KV write or concatenation, token pick) and the tokens."""
    names = list(session.inputs)[len(DECODE_STEP_INPUTS) :]
    batch = len(first)
    pad_counts = np.zeros(batch, np.int64)
    decode, kv = bound_decode(session), KVBuffers(cache, steps)
    state = {"old": (first.argmax(axis=-1), list(cache)), "new": first.argmax(axis=-1)}
    ms: dict[str, list[float]] = {"old": [], "new": []}
    ids: dict[str, list[np.ndarray]] = {"old": [], "new": []}

    def old(step):
        token, past = state["old"]
        lengths = np.array([key.shape[2] for key in past[::2]], np.int64)
        position = np.full((batch, 1), seq + step, np.int64)
        logits, *new = session.run(
            input_ids=token[:, None],
            position_ids=position,
            pad_counts=pad_counts,
            cache_lengths=lengths,
            **dict(zip(names, past)),
        )
        state["old"] = logits[:, -1].argmax(axis=-1), [np.concatenate([p, n], axis=2) for p, n in zip(past, new)]
        return state["old"][0]

    def new(step):
        position = np.full((batch, 1), seq + step, np.int64)
        logits, *written = decode(state["new"][:, None], position, pad_counts, kv.filled.copy(), kv.buffers)
        kv.write(written)
        state["new"] = logits[:, -1].argmax(axis=-1)
        return state["new"]

    runs = {"old": old, "new": new}
    for step in range(steps):
        for name in ("old", "new") if step % 2 == 0 else ("new", "old"):
            start = time.thread_time()
            ids[name].append(runs[name](step))
            ms[name].append((time.thread_time() - start) * 1e3)
    same = np.array_equal(np.stack(ids["old"]), np.stack(ids["new"]))
    return np.array(ms["old"]), np.array(ms["new"]), same


def summary(per_token: np.ndarray, batch: int) -> dict:
    first, last = statistics.median(per_token[:WINDOW]), statistics.median(per_token[-WINDOW:])
    return {
        "ms_per_token_first": first,
        "ms_per_token_last": last,
        "last_over_first": last / first,
        "tokens_per_s": batch * len(per_token) / (per_token.sum() / 1e3),
        "ms_per_token": [round(float(t), 3) for t in per_token],
    }


def run(tokens: int = 200, batch: int = 4, workdir: Path | None = None) -> dict:
    model = build_model()
    flat, first, seq = caches(model)
    workdir = Path(workdir or tempfile.mkdtemp())
    results: dict = {}
    for b in (1, batch):
        kv = {name: [np.ascontiguousarray(np.repeat(t, b, axis=0)) for t in c] for name, c in flat.items()}
        logits = np.repeat(first, b, axis=0)
        torch_cache = [
            (torch.from_numpy(k), torch.from_numpy(v)) for k, v in zip(kv["pruned"][::2], kv["pruned"][1::2])
        ]
        path = export_program(
            export_decode(model, torch_cache), workdir / f"decode_b{b}.onnx", *decode_names(len(torch_cache))
        )
        session = OnnxSession(path, threads=1)  # runs on this thread, so thread CPU time measures it
        for name in ("pruned", "unpruned"):
            lockstep(session, kv[name], logits, seq, 4)  # warm-up
            # Per token, the fastest of REPEATS lockstep runs: noise from other processes only adds time.
            runs = [lockstep(session, kv[name], logits, seq, tokens) for _ in range(REPEATS)]
            results[f"batch{b}_{name}"] = {
                "kv_slots_per_layer_prompt": [int(k.shape[2]) for k in kv[name][::2]],
                "concat_loop": summary(np.min([r[0] for r in runs], axis=0), b),
                "preallocated": summary(np.min([r[1] for r in runs], axis=0), b),
                "same_tokens": all(r[2] for r in runs),
            }
    return {
        "model": f"LLaVA-1.5 shapes at 1/8 width, {LAYERS} decoder layers, 576 visual + {TEXT_LEN} text tokens, "
        "random weights, float32",
        "device": f"CPU, 1 onnxruntime thread (thread CPU time), onnxruntime {onnxruntime.__version__}",
        "plan": f"keep {BUDGET} of 576 visual tokens ({[list(s) for s in plan_budget(BUDGET, LAYERS, 576).stages]})",
        "tokens": tokens,
        "compiled_batch": batch,
        "window": WINDOW,
        "repeats": REPEATS,
        "results": results,
    }


def table(result: dict) -> str:
    """Per batch and KV cache: ms/token over the first and last ten tokens for each loop, and tokens/s."""
    lines = [
        "| batch, KV | ms/token, tokens 1-10 -> 191-200 (last/first), concat loop | same, preallocated buffers "
        "| tokens/s, concat -> preallocated |",
        "|---|---|---|---|",
    ]

    def trend(s: dict) -> str:
        return f"{s['ms_per_token_first']:.2f} -> {s['ms_per_token_last']:.2f} ({s['last_over_first']:.2f})"

    for key, row in result["results"].items():
        batch, kv = key.removeprefix("batch").split("_")
        concat, buffers = row["concat_loop"], row["preallocated"]
        lines.append(
            f"| {batch}, {kv} ({row['kv_slots_per_layer_prompt'][0]} slots/layer) | {trend(concat)} | {trend(buffers)} "
            f"| {concat['tokens_per_s']:.0f} -> {buffers['tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    start = time.perf_counter()
    result = run()
    result["wall_s"] = time.perf_counter() - start
    text = json.dumps(result, indent=2)  # then each list of numbers on one line
    text = re.sub(r"\[([^\[\]{}\"]*)\]", lambda m: "[" + ", ".join(x.strip() for x in m[1].split(",")) + "]", text)
    (HERE / "results" / "decode.json").write_text(text + "\n")
    print(table(result))
    print(f"({result['wall_s']:.0f} s; same tokens: {all(r['same_tokens'] for r in result['results'].values())})")
