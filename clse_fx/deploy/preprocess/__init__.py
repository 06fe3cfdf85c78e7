"""Text and pixels -> a bundle's compiled feeds, with numpy, pillow and tokenizers only.

At compile time the family's deploy recipe (``clse_fx.models``) reads the transformers processor and writes the
manifest's ``preprocess`` section: ``text`` (tokenizer file, the placeholder a prompt names each image or video
with, how many visual tokens it stands for, the chat template rendered around the user's text) and ``pixels``
(a pixel-recipe ``kind`` registered here, one module per kind, with its parameters). Deploy applies them here,
so a bundle runs without torch or transformers; the transformers processors are the oracle in the tests (ids
identical, pixels within 1e-5).

Why not call the processors: they import torch (and their video processors torchvision), which a deployment
image should not need; the few operations they apply are written down in the manifest instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# kind -> recipe(params, items) -> pixel feeds; items: every prompt's in order (PIL images, or videos' frames).
PixelRecipe = Callable[[dict, list], dict[str, np.ndarray]]
PIXEL_RECIPES: dict[str, PixelRecipe] = {}
RECIPE_MODULES = ("clip", "anyres", "qwen2_vl")  # modules of this package that register pixel recipes


def pixel_recipe(kind: str) -> Callable[[PixelRecipe], PixelRecipe]:
    """Register a pixel recipe under ``kind`` (the manifest's ``preprocess.pixels.kind``)."""

    def register(recipe: PixelRecipe) -> PixelRecipe:
        PIXEL_RECIPES[kind] = recipe
        return recipe

    return register


@dataclass(frozen=True)
class TextRecipe:
    """How a prompt becomes token ids. A prompt that does not name its items with ``placeholder`` gets
    ``item_text`` (e.g. "<image>") once per item, then ``after_items`` (e.g. a newline), in front. The chat form
    wraps the prompt in ``chat_prefix`` and ``chat_suffix`` (the tokenizer's chat template for one user
    message, rendered at compile time). Each ``placeholder_id`` in the tokenized prompt stands for
    ``tokens_per_item`` visual tokens, as the processor expands it."""

    tokenizer: str
    placeholder: str
    placeholder_id: int
    tokens_per_item: int
    item_text: str
    after_items: str = ""
    add_special_tokens: bool = True
    chat_prefix: str | None = None
    chat_suffix: str | None = None


class Preprocessor:
    """A bundle's ``preprocess`` section, applied: prompts to ids, items to pixel feeds, ids back to text."""

    def __init__(self, bundle: Path, section: dict) -> None:
        from tokenizers import Tokenizer

        for module in RECIPE_MODULES:
            importlib.import_module(f"{__name__}.{module}")

        self.modality: str = section["modality"]
        self.text = TextRecipe(**section["text"])
        self.pixels_params: dict = section["pixels"]
        if self.pixels_params["kind"] not in PIXEL_RECIPES:
            raise ValueError(
                f"this bundle's pixel recipe {self.pixels_params['kind']!r} is unknown to this clse-fx; "
                "install the clse-fx version that compiled it"
            )
        self.frames: int | None = section.get("frames")
        self.tokenizer = Tokenizer.from_file(str(bundle / self.text.tokenizer))

    def encode_text(self, prompt: str, items: int, chat: bool = False) -> list[int]:
        """One prompt's ids with every placeholder expanded; ``items`` placeholders are put in front (as
        ``item_text``) when the prompt names none."""
        text = self.text
        if not prompt or not prompt.strip():
            raise ValueError(f"empty prompt: give the question to ask about the {self.modality}")
        if text.placeholder not in prompt:
            prompt = text.item_text * items + text.after_items + prompt
        if chat:
            if text.chat_prefix is None:
                raise ValueError(
                    "this bundle's tokenizer has no chat template; ask without chat, with the prompt in the "
                    "model's format"
                )
            prompt = f"{text.chat_prefix}{prompt}{text.chat_suffix}"
        ids = self.tokenizer.encode(prompt, add_special_tokens=text.add_special_tokens).ids
        named = ids.count(text.placeholder_id)
        if named != items:
            raise ValueError(
                f"the prompt names {named} {text.placeholder} but the bundle was compiled for {items} per prompt"
            )
        expanded: list[int] = []
        for token in ids:
            expanded += [token] * text.tokens_per_item if token == text.placeholder_id else [token]
        return expanded

    def prompt_warnings(self, prompt: str, chat: bool = False) -> list[str]:
        """What in ``prompt`` the model cannot read, one line each: words its tokenizer maps to the unknown token,
        and (asked without chat) a prompt not in the model's chat format. Such prompts still run; their answers are
        guesses."""
        found = []
        unknown_id = self.tokenizer.token_to_id(getattr(self.tokenizer.model, "unk_token", None) or "") or None
        if unknown_id is not None:
            encoding = self.tokenizer.encode(prompt, add_special_tokens=False)
            words = [prompt[a:b] for token, (a, b) in zip(encoding.ids, encoding.offsets) if token == unknown_id]
            if words:
                listed = ", ".join(dict.fromkeys(repr(word) for word in words))
                found.append(f"the model's vocabulary has no {listed}: the prompt reaches it as unknown tokens")
        suffix = (self.text.chat_suffix or "").strip()
        if not chat and suffix and not prompt.strip().endswith(suffix):
            found.append(f"the prompt is not in the model's chat format (ending {suffix!r}); pass --chat (chat=True)")
        return found

    def pixel_feeds(self, rows: list[list]) -> dict[str, np.ndarray]:
        """Each prompt's items (PIL images, or a video's frames) -> the pixel feeds of the compiled batch."""
        items = [item for row in rows for item in row]
        return PIXEL_RECIPES[self.pixels_params["kind"]](self.pixels_params, items)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
