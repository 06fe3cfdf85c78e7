"""Markdown tables and PNG plots from a benchmark results dict (the docs' copies: benchmarks/docs.py)."""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("qwen2_vl_7b", "llava_next_video_7b", "video_llava_7b", "llava_next_7b", "llava_onevision_7b")


def _family_table(family: dict) -> list[str]:
    visual = f"{family['visual_tokens']} visual"
    if family.get("scored_visual_tokens", family["visual_tokens"]) != family["visual_tokens"]:
        visual += f" ({family['scored_visual_tokens']} scored, the rest always kept)"
    lines = [
        f"### FLOPs and KV cache, {family['model']}, {family['text_tokens']} text + {visual}",
        "",
        "| budget | stages (layer: keep) | avg visual/layer | prefill FLOPs | FLOPs lower | LLM-only FLOPs lower "
        "| KV smaller, uniform | KV smaller, per-layer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in family["rows"]:
        stages = ", ".join(f"{layer}: {keep}" for layer, keep in row["stages"])
        llm = f"{row['llm_flops_ratio']:.2f}x" if "llm_flops_ratio" in row else "(decoder only already)"
        lines.append(
            f"| {row['budget']} | {stages} | {row['avg_visual_tokens']:.1f} | {row['flops_unpruned'] / 1e12:.2f} -> "
            f"{row['flops_pruned'] / 1e12:.2f} TFLOP | {row['flops_ratio']:.2f}x | {llm} | "
            f"{row['kv_ratio_uniform']:.2f}x | {row['kv_ratio_per_layer']:.2f}x |"
        )
    paper = family.get("paper_video_llava_194")
    if paper:
        lines += [
            "",
            f"Paper, Video-LLaVA at 194 of {paper['visual_tokens']} visual tokens: FLOPs {paper['flops_ratio']}x, "
            f"KV {paper['kv_ratio']}x, prefill {paper['prefill_speedup']}x, throughput {paper['throughput']}x. "
            "Our plan's decoder layers average more visual tokens than the budget's name (layer 0 sees all 2048, "
            "docs/method.md#average-visual-tokens), hence lower FLOP ratios; the paper's KV figure lies between "
            "our per-layer and uniform policies.",
        ]
    return lines + [""]


def flops_kv_markdown(results: dict) -> str:
    """FLOP and KV tables: LLaVA-1.5-7B against the paper, then every other family at its published geometry."""
    llava = results["llava_7b"]
    lines = [
        f"### FLOPs and KV cache, {llava['model']}, {llava['text_tokens']} text + 576 visual tokens",
        "",
        "| budget | stages (layer: keep) | avg visual/layer | prefill FLOPs | FLOPs lower (paper) "
        "| LLM-only FLOPs lower | KV smaller, uniform (paper) | KV smaller at 50 text tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    paper = llava["paper"]
    for row in llava["rows"]:
        flops_paper = f" ({paper['flops_ratio_192']}x)" if row["budget"] == 192 else ""
        kv_paper = f" ({paper['kv_ratio_192']}x)" if row["budget"] == 192 else ""
        stages = ", ".join(f"{layer}: {keep}" for layer, keep in row["stages"])
        lines.append(
            f"| {row['budget']} | {stages} | {row['avg_visual_tokens']:.1f} | {row['flops_unpruned'] / 1e12:.2f} -> "
            f"{row['flops_pruned'] / 1e12:.2f} TFLOP | {row['flops_ratio']:.2f}x{flops_paper} | "
            f"{row['llm_flops_ratio']:.2f}x | {row['kv_ratio_uniform']:.2f}x{kv_paper} | "
            f"{row['kv_ratio_at_50_text_tokens']:.2f}x |"
        )
    lines.append("")
    for key in FAMILIES:
        if key in results:
            lines += _family_table(results[key])
    return "\n".join(lines).rstrip() + "\n"


def latency_markdown(results: dict) -> str:
    """The CPU latency figures of the 1/8-width LLaVA-1.5 model (a full run only)."""
    lat = results["latency"]
    ms = lat["median_ms"]
    spectral = lat["spectral_fft_free_vs_torch_fft"]
    lines = [
        f"### Latency, {lat['model']}; {lat['device']}; medians of {lat['repeats']} interleaved runs",
        "",
        "| figure | value |",
        "|---|---|",
        f"| prefill, ONNX Runtime unpruned -> pruned (192) | {ms['prefill_unpruned']:.1f} -> "
        f"{ms['prefill_pruned']:.1f} ms ({lat['prefill_speedup']:.2f}x) |",
        f"| FLOPs reduction of the same graphs | {lat['flops_ratio']:.2f}x |",
        f"| prefill speedup / FLOPs reduction (target >= 0.9) | {lat['speedup_over_flops_ratio']:.2f} |",
        f"| decode per token, unpruned -> pruned KV | {ms['decode_per_token_unpruned']:.2f} -> "
        f"{ms['decode_per_token_pruned']:.2f} ms ({lat['decode_speedup']:.2f}x) |",
        f"| eager reference pruner (PyTorch) -> our engine, prefill | {ms['prefill_eager_reference']:.1f} -> "
        f"{ms['prefill_pruned']:.1f} ms ({lat['engine_vs_eager_reference']:.2f}x) |",
        f"| share of pruned prefill in CLSE scoring + gathers (target <= 3%) | "
        f"{100 * lat['clse_share_of_pruned_prefill']:.1f}% |",
        f"| CLSE-M (merge, same plan): prefill; stage share incl. merging | {ms['prefill_merged']:.1f} ms; "
        f"{100 * lat['clse_share_of_merged_prefill']:.1f}% |",
        f"| spectral score 24x24x4096: torch.fft -> FFT-free | {spectral['fft_ms']:.1f} -> "
        f"{spectral['matmul_ms']:.1f} ms ({spectral['speedup']:.1f}x) |",
    ]
    return "\n".join(lines) + "\n"


def compile_markdown(results: dict) -> str:
    """Compile time per phase and peak memory of each measured model."""
    lines = [
        "### Compile time (CPU) and peak memory",
        "",
        "| model | phases | compile total | whole process, with imports and checkpoint load (CPU) | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for name, item in results["compile"].items():
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in item["phases_s"].items())
        process = f"{item['wall_s']:.1f}s" + (f" ({item['cpu_s']:.1f}s)" if "cpu_s" in item else "")
        lines.append(f"| {name} | {phases} | {item['total_s']:.1f}s | {process} | {item['peak_rss_mib']:.0f} MiB |")
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    """Every table of a run (its summary.md)."""
    parts = [flops_kv_markdown(results), *([latency_markdown(results)] if "latency" in results else [])]
    return "\n".join([*parts, compile_markdown(results)])


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["llava_7b"]["rows"]
    # The budget names a schedule; the layers then average a little more (layer 0 sees every token).
    budgets = [f"{r['budget']}\n(average {r['avg_visual_tokens']:.1f})" for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    width = 0.38
    xs = range(len(rows))
    for offset, key, label in (
        (-width / 2, "flops_ratio", "prefill FLOPs lower"),
        (width / 2, "kv_ratio_uniform", "KV cache smaller"),
    ):
        bars = ax.bar([x + offset for x in xs], [r[key] for r in rows], width, label=label)
        ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.set_xticks(list(xs), budgets)
    ax.set_xlabel("--keep budget (average visual tokens per layer)")
    ax.set_ylabel("x vs unpruned")
    ax.set_title("LLaVA-1.5-7B geometry: CLSE savings")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "flops_kv.png", dpi=120)
    plt.close(fig)
    if "latency" in results:
        ms = results["latency"]["median_ms"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = ["prefill_unpruned", "prefill_pruned", "prefill_eager_reference"]
        labels = ["ONNX Runtime\nunpruned", "ONNX Runtime\npruned (192)", "PyTorch eager,\npruned (192, reference)"]
        bars = ax.bar(labels, [ms[n] for n in names])
        ax.bar_label(bars, fmt="%.1f ms", fontsize=8)
        ax.set_ylabel("prefill ms (median)")
        ax.set_title("Prefill latency, 1/8-width LLaVA-1.5 geometry, CPU")
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=120)
        plt.close(fig)
