"""Visual explanation of a bundle's pruning: the image as the model sees it, and each stage's kept tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PANEL_INCHES = 3.0
DPI = 100


def model_view(pixel_values: np.ndarray, pixels: dict) -> np.ndarray:
    """Undo the pixel recipe's normalisation: [3, H, W] pixel values -> [H, W, 3] floats in [0, 1]."""
    mean = np.array(pixels["image_mean"], dtype=np.float32)[:, None, None]
    std = np.array(pixels["image_std"], dtype=np.float32)[:, None, None]
    return np.clip(pixel_values * std + mean, 0, 1).transpose(1, 2, 0)


def layer_spans(stage_layers: list[int], num_layers: int) -> list[str]:
    """Which decoder layers run on each stage's kept tokens: stage i (before layer K_i) feeds layers K_i..K_{i+1}-1."""
    ends = [*stage_layers[1:], num_layers]
    return [
        f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}" for start, end in zip(stage_layers, ends)
    ]


def overlay_png(
    image: np.ndarray,
    kept: list[np.ndarray],
    grid: tuple[int, int],
    path: str | Path,
    stage_layers: list[int] | None = None,
    num_layers: int | None = None,
) -> Path:
    """Write a PNG: the image, then one panel per stage with the kept grid cells bright and the rest dimmed. With
    ``stage_layers`` (the decoder layer each stage runs before) and ``num_layers``, each panel names the layers that
    run on its tokens, and a legend below says what bright and dimmed mean and which layers see every token.

    The figure is (1 + stages) * 300 px wide and 330 px high, plus a line for the legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows, cols = grid
    height, width = image.shape[:2]
    labelled = stage_layers is not None and num_layers is not None
    legend_inches = 0.35 if labelled else 0.0
    fig, axes = plt.subplots(
        1,
        1 + len(kept),
        figsize=(PANEL_INCHES * (1 + len(kept)), PANEL_INCHES * 1.1 + legend_inches),
        squeeze=False,
    )
    axes = axes[0]
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title(f"input ({rows}x{cols} tokens)", fontsize=9)
    spans = layer_spans(stage_layers, num_layers) if labelled else [None] * len(kept)
    for ax, (stage, ids), span in zip(axes[1:], enumerate(kept), spans):
        mask = np.zeros(rows * cols, dtype=bool)
        mask[np.asarray(ids, dtype=np.int64)] = True
        cell = mask.reshape(rows, cols).repeat(height // rows, 0).repeat(width // cols, 1)
        shown = image * (0.25 + 0.75 * cell[..., None])
        ax.imshow(shown, interpolation="nearest")
        title = f"stage {stage + 1}: {len(ids)} of {rows * cols} kept"
        if span is not None:
            title += f", before layer {stage_layers[stage]}\nseen by {span}"
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    bottom = 0.01
    if labelled:
        first = "layer 0 sees" if stage_layers[0] == 1 else f"layers 0-{stage_layers[0] - 1} see"
        handles = [
            Patch(color="0.85", label="kept: the layers named above the panel see these tokens"),
            Patch(color="0.25", label=f"pruned (dimmed); {first} every token, of {num_layers} decoder layers"),
        ]
        fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
        bottom = legend_inches / (PANEL_INCHES * 1.1 + legend_inches)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=bottom, top=0.86 if labelled else 0.9, wspace=0.04)
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def explain_bundle(bundle: str | Path, image, prompt: str, path: str | Path) -> Path:
    """Run ``bundle``'s prefill engine on one (image, prompt) and write the kept-token overlay PNG to ``path``."""
    from clse_fx.deploy.engine import Engine
    from clse_fx.deploy.manifest import split_prefill_outputs

    engine = Engine.load(bundle)
    if "grid" not in engine.manifest.geometry:
        raise ValueError(
            "explain draws bundles whose visual tokens form one grid; this one's layout has several segments"
        )
    grid = tuple(engine.manifest.geometry["grid"])[-2:]
    if engine.images_per_prompt != 1:
        raise ValueError("--explain needs a bundle compiled for one image per prompt (--images 1)")
    feeds = engine.encode([image] * engine.batch, [prompt] * engine.batch)
    outputs = engine.prefill.run(**feeds)
    kept = [stage[0] for stage in split_prefill_outputs(outputs, engine.num_stages)[2]]
    view = model_view(feeds["pixel_values"][0], engine.preprocessor.pixels_params)
    layers = [layer for layer, _ in engine.manifest.plan.stages]
    return overlay_png(view, kept, grid, path, layers, engine.num_layers)
