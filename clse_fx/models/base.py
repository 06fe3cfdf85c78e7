"""What clse-fx needs to know about a model family, split by concern, and the registry of supported families.

One file per family (as HF Optimum keeps one export config per architecture) defines up to three small
classes, so passes, the reference pruner and exporters stay generic:

- :class:`ModelAdapter`: structure and token layout (where the decoder layers are, which tokens are visual,
  their grid, the graph inputs and positions): what tracing, the passes and the reference need;
- :class:`ExampleInputs`: processor-style inputs of a compiled geometry, to trace and verify with;
- :class:`DeployRecipe`: what a bundle needs beyond the prefill (graphs run before it, the geometry the
  runtime checks processor outputs against).

Every method a family must provide is abstract, so an incomplete family cannot be instantiated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from clse_fx.models.recipes import text_recipe
from clse_fx.plan import LLAVA_SCHEDULE, Layout, ReferenceSchedule
from clse_fx.static_ops import visual_mask


@dataclass
class InputGraph:
    """A graph the runtime runs before the prefill: it turns processor outputs into prefill inputs (e.g. the
    vision tower's features). ``traced``: export by TorchScript tracing, which records data-dependent Python
    (``.tolist()`` over a fixed grid) as constants, where torch.export would need them symbolic."""

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    traced: bool = False


class ModelAdapter(ABC):
    """A family's structure and token layout. Subclasses set the class attributes and the abstract methods."""

    schedule: ClassVar[ReferenceSchedule] = LLAVA_SCHEDULE
    # Module path of the decoder-layer list inside the top-level model, as named in nn_module_stack.
    layers_path: ClassVar[str] = ""
    # Graph inputs after (input_ids, attention_mask), in order; absent ones (no image) are left out.
    graph_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # The pixel input of each modality a family takes (one modality per compile).
    modalities: ClassVar[dict[str, str]] = {"image": "pixel_values", "video": "pixel_values_videos"}

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def modality(self, inputs: dict) -> str | None:
        """The modality of processor ``inputs`` ("image" or "video"), or None for text only."""
        present = [modality for modality, name in self.modalities.items() if inputs.get(name) is not None]
        if len(present) > 1:
            raise ValueError("a prompt with both images and a video has no single layout; compile one modality")
        return present[0] if present else None

    def decoder(self) -> nn.Module:
        """The text decoder (has ``.layers``, ``.norm`` and ``.rotary_emb``); transformers' MLLMs keep it here."""
        return self.model.model.language_model

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @abstractmethod
    def visual_token_ids(self) -> tuple[int, ...]:
        """Token ids that mark visual positions in ``input_ids``."""

    @abstractmethod
    def tokens_per_image(self, image_size: tuple[int, int] | None = None) -> int:
        """Scored visual tokens one image becomes at ``image_size`` (H, W) pixels, or at the family's
        default resolution."""

    def tokens_per_frame(self, image_size: tuple[int, int] | None = None) -> int:
        """Scored visual tokens of one video frame (the same as an image's unless video frames are pooled)."""
        return self.tokens_per_image(image_size)

    @abstractmethod
    def visual_layout(self, num_visual: int, **inputs: torch.Tensor) -> Layout:
        """How one row's ``num_visual`` visual tokens are laid out: grid segments (T, H, W) the spectral filter
        scores and extra segments always kept (``clse_fx.plan.Layout``; ``grid_layout(T, H, W)`` for one grid)."""

    def prompt_layout(self, inputs: dict[str, torch.Tensor]) -> Layout | None:
        """The layout of the visual tokens in processor-style ``inputs`` (every row the same), or None without
        any: :meth:`visual_count` on the ids, then :meth:`visual_layout` from the other inputs."""
        count = self.visual_count(inputs["input_ids"])
        extra = {name: value for name, value in inputs.items() if name != "input_ids"}
        return self.visual_layout(count, **extra) if count else None

    def prepare_graph_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Processor outputs -> the tensors the traced prefill takes (e.g. precomputed position ids)."""
        return inputs

    def graph_constants(self, inputs: dict[str, torch.Tensor]) -> dict:
        """Keyword arguments of the prefill that the compiled geometry fixes, traced as Python values rather
        than taken as graph inputs (e.g. LLaVA-NeXT's image sizes, which decide its tiled grid's shape)."""
        return {}

    def decode_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[B, 1] decode positions -> what the decoder's rotary embedding takes (e.g. one id per M-RoPE axis)."""
        return position_ids

    def rope_deltas(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] offset of each row's decode positions from the prompt length (non-zero under M-RoPE)."""
        return torch.zeros(inputs["input_ids"].shape[0], dtype=torch.long, device=inputs["input_ids"].device)

    def graph_input_dims(self, name: str) -> dict[int, str] | None:
        """Which dims of an extra graph input are the "batch" and "seq" dims (None: fully static)."""
        return None

    def prefill_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor):
        """The unmodified model's prefill logits for the graph inputs, at the last position (:meth:`last_logits`)."""
        return self.last_logits(self.model.model(input_ids=input_ids, attention_mask=attention_mask, **extra))

    def last_logits(self, outputs) -> torch.Tensor:
        """The LM head on the last position of the model's final (normed) hidden states: [B, 1, V]. Generation
        reads no other (transformers' generate asks ``logits_to_keep=1``), and the head over every kept token costs
        as much as several decoder layers where the vocabulary is large (152064 for Qwen2-VL). Selected here with
        the position dimension dropped, rather than through ``logits_to_keep``, whose [B, 1, H] slice makes export
        guard the batch to be other than 1."""
        return self.lm_head()(outputs.last_hidden_state[:, -1])[:, None]

    @property
    def num_layers(self) -> int:
        return len(self.decoder().layers)

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: which positions hold visual tokens."""
        return visual_mask(input_ids, self.visual_token_ids())

    def visual_count(self, input_ids: torch.Tensor) -> int:
        """Visual tokens per row (0 for text-only prompts): every row must hold the same number, since engines
        have fixed shapes (the plan checks the count against its own: ``PruneConfig.stage_specs``)."""
        counts = self.visual_mask(input_ids).sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"rows have different visual-token counts {counts.tolist()}; batch rows with equal images")
        return int(counts[0])


class ExampleInputs(ABC):
    """Processor-style inputs of a compiled geometry for one family."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter, self.model = adapter, adapter.model

    @abstractmethod
    def example_inputs(
        self,
        batch: int,
        text_len: int,
        images: int,
        generator: torch.Generator,
        frames: int = 1,
        image_size: tuple[int, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Processor-style inputs of the compiled shape: per row ``text_len`` text tokens with ``images`` image
        (or video) blocks after the first token. Only shapes are baked into engines; image positions are data.
        ``frames``: frames per video (video models); ``image_size``: (H, W) pixels where the resolution varies."""

    def example_rows(self, batch: int, text_len: int, block: list[int], generator: torch.Generator) -> torch.Tensor:
        """[batch, text_len + len(block)] ids: random text with ``block`` (visual placeholders) after token 0."""
        text_config = self.model.config.get_text_config()
        special = set(self.adapter.visual_token_ids()) | {text_config.pad_token_id}
        vocab = torch.tensor([i for i in range(text_config.vocab_size) if i not in special])
        rows = []
        for _ in range(batch):
            text = vocab[torch.randint(len(vocab), (text_len,), generator=generator)].tolist()
            rows.append(text[:1] + block + text[1:])
        return torch.tensor(rows)

    def video_example(
        self, batch: int, text_len: int, tokens: int, frames: int, size: int, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """One ``frames``-frame video of ``size`` px per row, written as ``tokens`` video placeholders."""
        block = [self.model.config.video_token_id] * tokens
        input_ids = self.example_rows(batch, text_len, block, generator)
        pixels = torch.randn(batch, frames, 3, size, size, generator=generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values_videos": pixels}


class DeployRecipe(ABC):
    """What a family's bundle needs besides the prefill and decode graphs."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter, self.model = adapter, adapter.model

    def input_graphs(self, inputs: dict[str, torch.Tensor]) -> list[InputGraph]:
        """Graphs a bundle runs before the prefill, in order, for prompts like ``inputs`` (none by default:
        the prefill takes the processor's tensors)."""
        return []

    @abstractmethod
    def compiled_geometry(self, inputs: dict[str, torch.Tensor]) -> dict:
        """Manifest entries that pin the visual input's shape (the runtime checks processor outputs against them)."""

    def preprocess(self, processor, inputs: dict[str, torch.Tensor], items: int) -> dict | None:
        """The manifest's preprocessing recipe (``clse_fx.deploy.preprocess``) read from the transformers
        ``processor``, for prompts like ``inputs`` with ``items`` images or videos each; None when the family
        has no pixel recipe for this modality yet (its bundles then run from token ids and pixels only)."""
        modality = self.adapter.modality(inputs)
        pixels = self.pixel_recipe(processor, modality, inputs) if modality else None
        if pixels is None or getattr(processor, "tokenizer", None) is None:
            return None
        placeholder, item_text, after_items = self.placeholder(processor, modality)
        placeholder_id = processor.tokenizer.convert_tokens_to_ids(placeholder)
        tokens = int((inputs["input_ids"][0] == placeholder_id).sum()) // items
        text = text_recipe(processor, placeholder, item_text, tokens) | {"after_items": after_items}
        section = {"modality": modality, "text": text}
        frames = self.frames(inputs) if modality == "video" else None
        return section | {"pixels": pixels} | ({"frames": frames} if frames else {})

    def pixel_recipe(self, processor, modality: str, inputs: dict[str, torch.Tensor]) -> dict | None:
        """The ``pixels`` part of :meth:`preprocess` for ``modality`` (None: not written for this family)."""
        return None

    def placeholder(self, processor, modality: str) -> tuple[str, str, str]:
        """The text a prompt names one item with, and what is put before a prompt that names none: an item's
        text (once per item), then what follows the items."""
        token = processor.video_token if modality == "video" else processor.image_token
        return token, token, "\n"

    def frames(self, inputs: dict[str, torch.Tensor]) -> int:
        """Frames per compiled video."""
        return int(inputs[self.adapter.modalities["video"]].shape[1])


@dataclass(frozen=True)
class Family:
    """One supported model family: the architectures (transformers class names) and its three classes."""

    architectures: tuple[str, ...]
    adapter: type[ModelAdapter]
    examples: type[ExampleInputs]
    deploy: type[DeployRecipe]


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for arch in family.architectures:
        _FAMILIES[arch] = family
    return family


def registered_families() -> list[Family]:
    return list({id(family): family for family in _FAMILIES.values()}.values())


def supported_architectures() -> list[str]:
    return sorted(_FAMILIES)


def _family(model: nn.Module) -> Family:
    name = type(model).__name__
    if name not in _FAMILIES:
        raise ValueError(f"unsupported architecture {name}; clse-fx supports: {', '.join(supported_architectures())}")
    return _FAMILIES[name]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The structure/layout adapter for ``model``'s class; unsupported classes raise a ValueError naming the
    supported ones."""
    return _family(model).adapter(model)


def examples_for(model: nn.Module) -> ExampleInputs:
    """Example-input builder for ``model``'s family."""
    return _family(model).examples(adapter_for(model))


def deploy_recipe_for(model: nn.Module) -> DeployRecipe:
    """Deploy recipe for ``model``'s family."""
    return _family(model).deploy(adapter_for(model))
