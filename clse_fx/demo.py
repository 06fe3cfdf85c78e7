"""A tiny, randomly initialised LLaVA checkpoint for demos and tests (no downloads needed).

It is built from the real `transformers` config classes, with a word-level tokenizer made with
`tokenizers` and a real `LlavaProcessor`, and saved with `save_pretrained`, so everything downstream
loads it through the same `from_pretrained` path as a published checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
WORDS = (
    "user assistant : what is the colour of shape left right top bottom red green blue yellow circle square "
    "triangle star how many are there in image a an yes no one two three four describe picture ? . , \n"
).split(" ")


PROXY_MODEL = Path(__file__).parent / "assets" / "proxy_llava"


def proxy_model_dir() -> Path:
    """The shipped trained proxy LLaVA (see ``clse_fx.proxy``): the CLI's ``--demo`` model."""
    if not (PROXY_MODEL / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the shipped proxy checkpoint is missing from {PROXY_MODEL}; reinstall clse-fx or retrain it "
            "with python -m clse_fx.proxy.train (command in its training.json)"
        )
    return PROXY_MODEL


def build_tokenizer(words: Sequence[str] = WORDS):
    """A word-level fast tokenizer over ``words`` with LLaVA's special tokens (ids: specials first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(SPECIAL_TOKENS + [w for w in words if w]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(IMAGE_TOKEN, behavior="isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )


def tiny_llava_config(
    image_size: int = 48,
    patch_size: int = 8,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int | None = None,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    head_dim: int | None = None,
    max_positions: int = 4096,
    tokenizer=None,
):
    """A LlavaConfig with a small CLIP vision tower and a small GQA Llama decoder (LLaVA-1.5's layout)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tokenizer = tokenizer or build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        # By default != hidden_size / heads, so shape mix-ups fail loudly.
        head_dim=head_dim or 2 * hidden_size // num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def save_tiny_llava(path: str | Path, seed: int = 0, **config_kwargs) -> Path:
    """Build a random tiny LLaVA with tokenizer and processor, save it to ``path``, return the path."""
    import torch  # here, not at module level: the CLI resolves --demo without importing torch
    from transformers import LlavaForConditionalGeneration

    config = tiny_llava_config(**config_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Random init leaves tiny logits; widen the weights so scores and top-k choices are well separated.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    path = Path(path)
    model.save_pretrained(path)
    llava_processor(config, build_tokenizer()).save_pretrained(path)
    return path


def llava_processor(config, tokenizer):
    """LLaVA-1.5's processor for ``config``: CLIP preprocessing at the tower's size, one placeholder per patch."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = config.vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
