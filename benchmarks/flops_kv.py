"""Prefill FLOPs and KV-cache bytes at LLaVA-1.5-7B scale, counted on weightless (meta-device) graphs."""

from __future__ import annotations

import torch

from benchmarks import geometry
from clse_fx.compiler import pass_settings, prune_prefill
from clse_fx.metrics import count_flops, kv_cache_bytes, kv_cache_tokens, prefill_flops, unpruned_prefill_flops
from clse_fx.models import adapter_for, examples_for
from clse_fx.plan import PruneConfig, plan_budget, scored_count

PAPER = {"flops_ratio_192": 2.28, "kv_ratio_192": 5.59}


def llava_7b(budgets: tuple[int, ...] = (192, 128, 64), text_len: int = 40) -> dict:
    """FLOP and KV ratios for LLaVA-1.5-7B, with the vision tower's share stated separately."""
    model = geometry.build(geometry.LLAVA_7B, device="meta")
    meta = geometry.prompt(model, text_len, device="meta")
    vision_flops = count_flops(lambda px: model.model.get_image_features(pixel_values=px), meta["pixel_values"])
    rows = family_rows(model, budgets, geometry.prompt(model, text_len), meta)
    for row in rows:
        row["llm_flops_ratio"] = (row["flops_unpruned"] - vision_flops) / (row["flops_pruned"] - vision_flops)
        # The paper's 5.59x is reproduced at this many text tokens (uniform policy).
        row["kv_ratio_at_50_text_tokens"] = (50 + 576) / (50 + row["stages"][-1][1])
    return {
        "model": "LLaVA-1.5-7B geometry (meta device, no weights)",
        "text_tokens": text_len,
        "visual_tokens": 576,
        "vision_tower_flops": vision_flops,
        "paper": PAPER,
        "rows": rows,
    }


def family_rows(model, budgets, cpu_inputs: dict, meta_inputs: dict) -> list[dict]:
    """Prefill FLOPs (the compiled program vs the traced unpruned prefill, docs/method.md#cost) and fp16 KV bytes
    under both policies, per budget, on weightless graphs; ``cpu_inputs`` are the same prompt with readable ids
    (for the plan)."""
    adapter = adapter_for(model)
    num_visual = scored_count(adapter.prompt_layout(cpu_inputs))  # grid tokens (docs/method.md#token-layouts)
    other = cpu_inputs["input_ids"].shape[1] - num_visual  # text, vision start/end markers and extra tokens
    text_cfg = model.config.get_text_config()
    unpruned_flops = unpruned_prefill_flops(model, meta_inputs)
    rows = []
    for keep in budgets:
        prune = PruneConfig(plan=plan_budget(keep, adapter.num_layers, num_visual, schedule=adapter.schedule))
        pruned = prune_prefill(model, prune, meta_inputs, settings=pass_settings(model, prune, cpu_inputs))
        flops = prefill_flops(pruned)
        plan = prune.plan
        kv_full, kv_uniform, kv_per_layer = (
            kv_cache_bytes(text_cfg, kv_cache_tokens(plan, other, policy), 1, 2)
            for policy in ("unpruned", "uniform", "per-layer")
        )
        rows.append(
            {
                "budget": keep,
                "stages": [list(s) for s in plan.stages],
                "avg_visual_tokens": plan.avg_visual_tokens,
                "flops_unpruned": unpruned_flops,
                "flops_pruned": flops,
                "flops_ratio": unpruned_flops / flops,
                "kv_bytes_unpruned_fp16": kv_full,
                "kv_bytes_pruned_fp16": kv_uniform,
                "kv_ratio_uniform": kv_full / kv_uniform,
                "kv_ratio_per_layer": kv_full / kv_per_layer,
            }
        )
    return rows


def qwen2_vl_7b(budgets=(0.334, 0.223, 0.112), text_len: int = 40, side: int = 24) -> dict:
    """Qwen2-VL-7B decoder FLOPs and KV at a side x side merged grid (672 px for 24). The vision tower is its
    own graph (it is not pruned), so these are decoder figures; M-RoPE ids come from the static index graph."""
    from clse_fx.models.qwen2_vl import MRopeIndex

    model = geometry.qwen2_vl_7b()
    adapter = adapter_for(model)
    step = 28  # patch 14 x merge 2
    cpu = examples_for(model).example_inputs(
        1, text_len, 1, torch.Generator().manual_seed(0), image_size=(side * step,) * 2
    )
    position_ids, _ = MRopeIndex(adapter.visual_token_ids(), (1, side, side))(cpu["input_ids"], cpu["attention_mask"])
    meta = {
        "input_ids": cpu["input_ids"].to("meta"),
        "attention_mask": cpu["attention_mask"].to("meta"),
        "image_grid_thw": cpu["image_grid_thw"],
        "position_ids": position_ids.to("meta"),
        "image_embeds": torch.empty(side * side, model.config.text_config.hidden_size, device="meta"),
    }
    return {
        "model": f"Qwen2-VL-7B geometry (meta device), {side}x{side} merged grid, decoder only",
        "text_tokens": text_len,
        "visual_tokens": side * side,
        "rows": family_rows(model, budgets, cpu, meta),
    }


def example_family(name: str, model, budgets, text_len: int, vision, **geometry_args) -> dict:
    """FLOP and KV rows for a family's own example prompt (one image or video of ``geometry_args``), with the
    vision tower's FLOPs (``vision(meta_inputs)``) stated separately and taken out for the LLM-only ratio."""
    adapter = adapter_for(model)
    cpu = examples_for(model).example_inputs(1, text_len, 1, torch.Generator().manual_seed(0), **geometry_args)
    meta = {key: tensor if key == "image_sizes" else tensor.to("meta") for key, tensor in cpu.items()}
    vision_flops = count_flops(lambda: vision(meta))
    rows = family_rows(model, budgets, cpu, meta)
    for row in rows:
        row["llm_flops_ratio"] = (row["flops_unpruned"] - vision_flops) / (row["flops_pruned"] - vision_flops)
    layout = adapter.prompt_layout(cpu)
    return {
        "model": f"{name} geometry (meta device), vision tower included",
        "text_tokens": text_len,
        "visual_tokens": adapter.visual_count(cpu["input_ids"]),
        "scored_visual_tokens": scored_count(layout),
        "layout": [list(segment) for segment in layout],
        "vision_tower_flops": vision_flops,
        "rows": rows,
    }


def video_family(name: str, model, budgets, text_len: int, frames: int) -> dict:
    """A video family at ``frames`` frames, its video tower's FLOPs stated separately."""
    return example_family(
        name,
        model,
        budgets,
        text_len,
        lambda meta: model.model.get_video_features(pixel_values_videos=meta["pixel_values_videos"]),
        frames=frames,
    )


def llava_next_video_7b(budgets=(194,), text_len: int = 40, frames: int = 8) -> dict:
    """LLaVA-NeXT-Video-7B, ``frames`` frames of 12x12 pooled tokens."""
    name = f"LLaVA-NeXT-Video-7B, {frames} frames x 12x12"
    return video_family(name, geometry.llava_next_video_7b(), budgets, text_len, frames)


def video_llava_7b(budgets=(194,), text_len: int = 40, frames: int = 8) -> dict:
    """Video-LLaVA-7B, ``frames`` frames of [CLS, 16x16 grid] (2056 video tokens, 2048 scored), beside the
    paper's Video-LLaVA figures at budget 194."""
    name = f"Video-LLaVA-7B, {frames} frames x (CLS + 16x16)"
    result = video_family(name, geometry.video_llava_7b(), budgets, text_len, frames)
    result["paper_video_llava_194"] = {
        "flops_ratio": 9.35, "kv_ratio": 8.70, "prefill_speedup": 2.73, "throughput": 2.28, "visual_tokens": 2048
    }  # fmt: skip
    return result


def anyres_7b(name: str, model, budgets, image_size: tuple[int, int], text_len: int = 40) -> dict:
    """An any-resolution family (LLaVA-NeXT, LLaVA-OneVision) at one ``image_size``."""
    adapter = adapter_for(model)
    return example_family(
        f"{name} at {image_size[0]}x{image_size[1]} px",
        model,
        budgets,
        text_len,
        lambda meta: adapter.packed_image_features(meta["pixel_values"], image_size),
        image_size=image_size,
    )


def llava_next_7b(budgets=(640, 320, 160)) -> dict:
    """LLaVA-NeXT-7B at 672 x 672 px (576 base + 48x48 tiled tokens + 48 newlines); budgets as the LLaVA-NeXT
    pruning literature quotes them (about 22%, 11% and 5.6% of its 2880 grid tokens)."""
    return anyres_7b("LLaVA-NeXT-7B", geometry.llava_next_7b(), budgets, (672, 672))


def llava_onevision_7b(budgets=(0.334, 0.223, 0.112)) -> dict:
    """LLaVA-OneVision-7B at 768 x 768 px (729 base + 54x54 tiled tokens + 54 newlines); budgets as shares of the
    grid tokens, LLaVA-1.5's 192/128/64 of 576."""
    return anyres_7b("LLaVA-OneVision-7B", geometry.llava_onevision_7b(), budgets, (768, 768))


if __name__ == "__main__":
    import json

    with torch.no_grad():
        print(json.dumps(llava_7b(budgets=(192,)), indent=2))
