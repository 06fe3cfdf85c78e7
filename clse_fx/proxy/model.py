"""The accuracy-proxy LLaVA: config, tokenizer, processor and exact train/run-time input encoding.

Geometry: 64x64 images, 4x4 patches -> a 16x16 grid of 256 visual tokens (LLaVA-1.5 has 24x24 = 576;
budgets are scaled by the same ratios). CLIP-style vision tower (features from layer -2, CLS dropped, as in
LLaVA-1.5), a two-layer GELU projector and a GQA Llama decoder, all trained from scratch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clse_fx.demo import IMAGE_TOKEN
from clse_fx.proxy.data import ANSWERS, IMAGE_SIZE, WORDS

PATCH_SIZE = 4
TEXT_LEN = 16  # non-image tokens per prompt (left padded), the compiled --text-len
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The training prompt layout (:func:`prompt`) as a chat template, so ``clse-run --chat`` and
# ``apply_chat_template`` produce exactly what the model was trained on.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def build_tokenizer():
    """The demo's word-level fast tokenizer over the proxy's words (LLaVA's special tokens, left padding), with
    the training prompt layout as its chat template."""
    from clse_fx.demo import build_tokenizer as word_level_tokenizer

    tokenizer = word_level_tokenizer(WORDS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor():
    """The LlavaProcessor the checkpoint ships: CLIP normalisation at 64 px, 256 image tokens per image."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def proxy_config(num_layers: int = 6, hidden_size: int = 128, vision_hidden: int = 64, vision_layers: int = 3):
    """The LlavaConfig of the proxy model."""
    from clse_fx.demo import tiny_llava_config

    return tiny_llava_config(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=4,
        num_kv_heads=2,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        vision_heads=4,
        head_dim=hidden_size // 4,
        max_positions=512,
        tokenizer=build_tokenizer(),
    )


def prompt(question: str) -> str:
    """The prompt template (LLaVA-1.5 style, lower-cased words): the answer is the next token."""
    return f"user : {IMAGE_TOKEN} {question} assistant :"


def answer_ids(tokenizer) -> dict[str, int]:
    """Token id of every answer word."""
    return {word: tokenizer.convert_tokens_to_ids(word) for word in ANSWERS}


def pixel_values(images: list[np.ndarray]) -> np.ndarray:
    """uint8 [H, W, 3] images at the model's size -> normalised float32 [B, 3, H, W] (the processor's output)."""
    array = np.stack(images).astype(np.float32) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2))


def encode(tokenizer, images: list[np.ndarray], questions: list[str], num_visual: int) -> dict[str, np.ndarray]:
    """Feeds in the compiled layout: prompts left padded to TEXT_LEN text tokens plus ``num_visual`` image
    tokens, as :meth:`clse_fx.deploy.engine.Engine.encode` builds them (a test checks they are identical)."""
    length = TEXT_LEN + num_visual
    input_ids = np.full((len(questions), length), tokenizer.pad_token_id, dtype=np.int64)
    attention_mask = np.zeros_like(input_ids)
    for row, question in enumerate(questions):
        text = prompt(question).replace(IMAGE_TOKEN, IMAGE_TOKEN * num_visual)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > length:
            raise ValueError(f"question {question!r} is longer than the compiled {TEXT_LEN} text tokens")
        input_ids[row, -len(ids) :] = ids
        attention_mask[row, -len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values(images)}


def save(model: torch.nn.Module, path: str | Path) -> Path:
    """Save ``model`` (safetensors) and the processor into ``path``."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    build_processor().save_pretrained(path)
    return path
