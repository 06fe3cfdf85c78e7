"""Accuracy of pruned engines on the procedural VQA test split.

Each configuration (score, merge, plan) is compiled with :func:`clse_fx.compile` and its prefill engine
(the bundle's ``prefill.onnx``) runs on ONNX Runtime over the test split; the answer is the greedy first
token (every answer is one word), read from the same run that returns the kept visual tokens of each stage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clse_fx.deploy.manifest import split_prefill_outputs
from clse_fx.proxy.data import QUESTION_TYPES, Item
from clse_fx.proxy.model import TEXT_LEN, encode

GRID_BANDS = 4  # accuracy by the queried object's row is reported per band of grid rows


@dataclass(frozen=True)
class Method:
    """A pruning method: a score type, optionally with CLSE-M token merging; ``one_shot_layer`` places its
    single-stage plan (None: at the three-stage plan's first layer)."""

    name: str
    score: str
    merge: str = "none"
    merge_metric: str = "hidden"
    one_shot_layer: int | None = None


METHODS = (
    Method("CLSE (clse_attn)", "clse_attn"),
    Method("CLSE spectral only (clse)", "clse"),
    Method("attention only (FastV-style)", "attn"),
    Method("L2 magnitude", "l2"),
    Method("random", "random"),
    Method("uniform grid", "uniform"),
    Method("CLSE-M (merge, hidden)", "clse_attn", "tome", "hidden"),
    Method("CLSE-M (merge, keys)", "clse_attn", "tome", "keys"),
    # The peers: DART one-shot at the first stage layer (its layer 2 of 32, scaled to this depth, needs layer K-1),
    # CDPruner one-shot before layer 0, as its authors prune (before the decoder).
    Method("DART (duplication)", "dart"),
    Method("CDPruner (conditional DPP)", "cdpruner", one_shot_layer=0),
)
# LLaVA-1.5's 192 / 128 / 64 of 576 visual tokens, as shares of the visual tokens.
BUDGETS = {"192/576": 1 / 3, "128/576": 2 / 9, "64/576": 1 / 9}


def accuracy_report(predictions: Sequence[str], items: Sequence[Item]) -> dict:
    """Share of exact (case- and space-insensitive) answer matches: overall and per question type."""
    if len(predictions) != len(items):
        raise ValueError(f"got {len(predictions)} predictions for {len(items)} questions; pass one per question")
    if not items:
        raise ValueError("no questions to score; pass a non-empty split")
    hits = [p.strip().lower() == i.answer for p, i in zip(predictions, items)]
    by_type = {}
    for kind in QUESTION_TYPES:
        chosen = [h for h, i in zip(hits, items) if i.kind == kind]
        if chosen:
            by_type[kind] = sum(chosen) / len(chosen)
    return {"overall": sum(hits) / len(hits), "by_type": by_type}


def target_band(item: Item, grid: int, bands: int = GRID_BANDS) -> int | None:
    """Band (0 = top) of grid rows holding the queried object's centre; None when no single object is queried."""
    if item.target is None:
        return None
    row = int(item.target.y * grid // item.image.shape[0])
    return row * bands // grid


def accuracy_by_band(correct: Sequence[bool], items: Sequence[Item], grid: int, bands: int = GRID_BANDS) -> list:
    """Accuracy over the questions whose queried object lies in each band of grid rows (None if a band is empty)."""
    totals, hits = [0] * bands, [0] * bands
    for ok, item in zip(correct, items):
        band = target_band(item, grid, bands)
        if band is not None:
            totals[band] += 1
            hits[band] += bool(ok)
    return [h / t if t else None for h, t in zip(hits, totals)]


def plans(
    num_layers: int, num_visual: int, budget: float, one_shot_layer: int | None = None
) -> dict[str, list[tuple[int, int]]]:
    """The three-stage plan of ``budget`` (the product's LLaVA schedule scaled to depth) and a single-stage
    plan at ``one_shot_layer`` (default: the first stage layer) with the same average visual tokens per layer."""
    from clse_fx.plan import plan_budget

    three = plan_budget(budget, num_layers, num_visual)
    layer = three.stages[0][0] if one_shot_layer is None else one_shot_layer
    total = three.avg_visual_tokens * num_layers - layer * num_visual
    keep = max(1, round(total / (num_layers - layer)))
    return {"3-stage": [tuple(s) for s in three.stages], "1-stage": [(layer, keep)]}


def predict_words(logits: np.ndarray, tokenizer) -> list[str]:
    """Greedy answer word per row from [B, S, V] (or [B, V]) logits: the argmax at the last position."""
    last = logits[:, -1] if logits.ndim == 3 else logits
    return tokenizer.convert_ids_to_tokens(last.argmax(-1).tolist())


@dataclass
class RunResult:
    """One configuration's outcome on the test split."""

    method: str
    score: str
    merge: str
    merge_metric: str
    budget: str
    plan: str
    stages: list
    avg_visual_tokens: float
    accuracy: float
    by_type: dict
    predictions: list  # per question: the answer word
    correct: list  # per question
    keep_counts: list  # per stage: how often each visual position was kept, over the split
    compile_s: float
    run_s: float


def run_engine(session, feeds: list[dict[str, np.ndarray]], total: int, num_stages: int, num_visual: int, tokenizer):
    """Run a prefill engine over batched feeds holding ``total`` questions (the rest is padding): the answer
    words and, per stage, how often each visual position was kept."""
    words: list[str] = []
    counts = np.zeros((num_stages, num_visual), dtype=np.int64)
    for batch in feeds:
        rows = min(len(batch["input_ids"]), total - len(words))
        logits, _, kept_ids, _, _ = split_prefill_outputs(session.run(**batch), num_stages)
        words += predict_words(logits[:rows], tokenizer)
        for stage, kept in enumerate(kept_ids):
            counts[stage] += np.bincount(kept[:rows].reshape(-1), minlength=num_visual)
    return words, counts


def batched_feeds(tokenizer, items: Sequence[Item], num_visual: int, batch: int) -> list[dict[str, np.ndarray]]:
    """The split as engine feeds of the compiled batch size (the last batch padded with copies of its last row)."""
    feeds = []
    for start in range(0, len(items), batch):
        chunk = list(items[start : start + batch])
        chunk += [chunk[-1]] * (batch - len(chunk))
        feeds.append(encode(tokenizer, [i.image for i in chunk], [i.question for i in chunk], num_visual))
    return feeds


def evaluate_config(
    model, processor, items: Sequence[Item], method: Method, budget: str, plan: str, stages, workdir: Path, batch: int
) -> RunResult:
    """Compile one configuration's prefill engine, run it over ``items`` and score it."""
    import clse_fx
    from clse_fx.deploy.session import OnnxSession
    from clse_fx.export.onnxruntime import export_onnx
    from clse_fx.models import adapter_for

    num_visual = adapter_for(model).tokens_per_image()
    start = time.perf_counter()
    result = clse_fx.compile(
        model,
        stages=list(stages),
        score=method.score,
        merge=method.merge,
        merge_metric=method.merge_metric,
        batch=batch,
        text_len=TEXT_LEN,
        verify=False,
    )
    session = OnnxSession(export_onnx(result.pruned, workdir / "prefill.onnx"), threads=1)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    feeds = batched_feeds(processor.tokenizer, items, num_visual, batch)
    words, counts = run_engine(session, feeds, len(items), len(stages), num_visual, processor.tokenizer)
    report = accuracy_report(words, items)
    return RunResult(
        method=method.name,
        score=method.score,
        merge=method.merge,
        merge_metric=method.merge_metric,
        budget=budget,
        plan=plan,
        stages=[list(s) for s in stages],
        avg_visual_tokens=result.manifest.plan.avg_visual_tokens,
        accuracy=report["overall"],
        by_type=report["by_type"],
        predictions=words,
        correct=[w == i.answer for w, i in zip(words, items)],
        keep_counts=counts.tolist(),
        compile_s=round(compile_s, 1),
        run_s=round(time.perf_counter() - start, 1),
    )


def sweep(model_dir: str | Path, items: Sequence[Item], cache: Path, batch: int = 20, progress=print) -> list[dict]:
    """Every method x budget x plan (CLSE-M on the three-stage plan) plus the unpruned engine, cached per
    configuration in ``cache`` (JSON), so an interrupted sweep resumes."""
    from clse_fx.api import load_checkpoint
    from clse_fx.models import adapter_for

    model, processor = load_checkpoint(model_dir)
    adapter = adapter_for(model)
    num_visual, num_layers = adapter.tokens_per_image(), adapter.num_layers
    configs = [(METHODS[0], "unpruned", "none", [(1, num_visual)])]
    for method in METHODS:
        for budget, ratio in BUDGETS.items():
            for plan, stages in plans(num_layers, num_visual, ratio, method.one_shot_layer).items():
                if method.merge == "none" or plan == "3-stage":
                    configs.append((method, budget, plan, stages))
    cache.mkdir(parents=True, exist_ok=True)
    results = []
    for method, budget, plan, stages in configs:
        key = f"{method.score}-{method.merge}-{method.merge_metric}-{budget.replace('/', 'of')}-{plan}"
        file = cache / f"{key}.json"
        if file.is_file():
            results.append(json.loads(file.read_text()))
            continue
        run = evaluate_config(model, processor, items, method, budget, plan, stages, cache, batch)
        if budget == "unpruned":
            run.method, run.score = "unpruned", "none"
        file.write_text(json.dumps(asdict(run)))
        results.append(asdict(run))
        progress(f"{run.method:32s} {budget:8s} {plan:8s} acc {run.accuracy:.3f} ({run.compile_s}+{run.run_s} s)")
    return results
