"""Tiny Qwen2-VL / Qwen2.5-VL / LLaVA-NeXT-Video checkpoints from config classes, reloaded via from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 150, 151, 152, 153
QWEN_FAMILIES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
}
VIDEO_TOKEN = 91
QWEN_TOKENS = {
    "image_token": ("<|image_pad|>", QWEN_IMAGE),
    "video_token": ("<|video_pad|>", QWEN_VIDEO),
    "vision_start_token": ("<|vision_start|>", QWEN_START),
    "vision_end_token": ("<|vision_end|>", QWEN_END),
}


def _widen_and_reload(model, model_class, path):
    """Random init leaves tiny logits; widen the weights so top-k choices are well separated, then reload."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model_class.from_pretrained(path, attn_implementation="sdpa").eval()


def tiny_qwen_config(family: str):
    config_class, _ = QWEN_FAMILIES[family]
    text = dict(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    vision = dict(
        depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, in_channels=3,
    )  # fmt: skip
    if family == "qwen2_5_vl":
        vision.update(hidden_size=32, intermediate_size=64, fullatt_block_indexes=[1], out_hidden_size=64)
        vision.update(window_size=16, tokens_per_second=2)
        vision.pop("embed_dim"), vision.pop("mlp_ratio")
    return config_class(
        text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END,
    )  # fmt: skip


def save_tiny_qwen(path, family: str):
    """The tiny checkpoint, saved with :func:`tiny_processor`'s files (its video processor's aside)."""
    model_class = QWEN_FAMILIES[family][1]
    torch.manual_seed(0)
    tiny_processor(family).save_pretrained(path)
    return _widen_and_reload(model_class(tiny_qwen_config(family)).eval(), model_class, path)


def tiny_llava_next_video_config() -> LlavaNextVideoConfig:
    """48 px frames, 8 px patches, pooled by 2: a 3x3 grid per frame; 4 GQA decoder layers."""
    vision, text = _clip_and_llama(image_size=48)
    return LlavaNextVideoConfig(
        vision_config=vision, text_config=text, image_token_id=90, video_token_id=VIDEO_TOKEN,
        spatial_pool_stride=2, spatial_pool_mode="average", vision_feature_select_strategy="default",
        vision_feature_layer=-2, image_grid_pinpoints=[[48, 96], [96, 48], [96, 96]],
    )  # fmt: skip


def save_tiny_llava_next_video(path):
    torch.manual_seed(0)
    model = LlavaNextVideoForConditionalGeneration(tiny_llava_next_video_config()).eval()
    with torch.no_grad():
        model.model.image_newline.normal_(0.0, 0.2)
    tiny_processor("llava_next_video").save_pretrained(path)
    return _widen_and_reload(model, LlavaNextVideoForConditionalGeneration, path)


def qwen_inputs(model, rows: list[list[int]], grid: tuple[int, int, int], modality: str = "image") -> dict:
    """Processor-style inputs for rows that each hold one image (or video) of ``grid`` (patches, pre-merge)."""
    vision = model.config.vision_config
    channels = 3 * vision.temporal_patch_size * vision.patch_size**2
    ids = torch.tensor(rows)
    token = QWEN_IMAGE if modality == "image" else QWEN_VIDEO
    patches = len(rows) * grid[0] * grid[1] * grid[2]
    pixels = torch.randn(patches, channels, generator=torch.Generator().manual_seed(0))
    prefix = "" if modality == "image" else "_videos"
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        f"pixel_values{prefix}": pixels,
        f"{modality}_grid_thw": torch.tensor([grid] * len(rows)),
        "mm_token_type_ids": (ids == token).int() * (1 if modality == "image" else 2),
    }


VIDEO_LLAVA_IMAGE, VIDEO_LLAVA_VIDEO = 92, 93


def _clip_and_llama(image_size: int) -> tuple[CLIPVisionConfig, LlamaConfig]:
    """The tiny CLIP tower (8 px patches) and 4-layer GQA Llama decoder of the LLaVA-family test models."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
        patch_size=8, projection_dim=32,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return vision, text


def tiny_video_llava_config():
    """32 px images and frames, 8 px patches: a 4x4 grid (plus a CLS token per video frame); 4 GQA layers."""
    from transformers import VideoLlavaConfig

    vision, text = _clip_and_llama(image_size=32)
    return VideoLlavaConfig(
        vision_config=vision, text_config=text, image_token_index=VIDEO_LLAVA_IMAGE,
        video_token_index=VIDEO_LLAVA_VIDEO, vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_seq_length=16, video_seq_length=17 * 4,
    )  # fmt: skip


def save_tiny_video_llava(path):
    from transformers import VideoLlavaForConditionalGeneration

    torch.manual_seed(0)
    model = VideoLlavaForConditionalGeneration(tiny_video_llava_config()).eval()
    tiny_processor("video_llava").save_pretrained(path)
    return _widen_and_reload(model, VideoLlavaForConditionalGeneration, path)


LLAVA_NEXT_IMAGE = 94


def tiny_llava_next_config():
    """32 px tiles of 8 px patches (4x4 grids), tiled up to 64 x 64 px; 4 GQA decoder layers."""
    from transformers import LlavaNextConfig

    vision, text = _clip_and_llama(image_size=32)
    return LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=LLAVA_NEXT_IMAGE,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]],
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )  # fmt: skip


def save_tiny_llava_next(path):
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(tiny_llava_next_config()).eval()
    with torch.no_grad():  # the newline embedding starts at zero; give it a value so misplacing it shows
        model.model.image_newline.normal_(0.0, 0.2)
    tiny_processor("llava_next").save_pretrained(path)  # bundles compiled from this checkpoint pick it up
    return _widen_and_reload(model, LlavaNextForConditionalGeneration, path)


ONEVISION_IMAGE, ONEVISION_VIDEO = 95, 96


def tiny_llava_onevision_config():
    """LLaVA-NeXT's tiny geometry (4x4 grids of 32 px tiles), tiled grids capped at 2 tiles' worth (anyres_max_2)
    so the shrinking shows; video frames pooled to 2x2; 4 GQA decoder layers."""
    from transformers import LlavaOnevisionConfig

    vision = dict(
        model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, image_size=32, patch_size=8,
    )  # fmt: skip
    text = dict(
        model_type="qwen2", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=ONEVISION_IMAGE, video_token_index=ONEVISION_VIDEO,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [96, 96]], vision_aspect_ratio="anyres_max_2",
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )  # fmt: skip


def save_tiny_llava_onevision(path):
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(tiny_llava_onevision_config()).eval()
    with torch.no_grad():
        model.model.image_newline.normal_(0.0, 0.2)
    tiny_processor("llava_onevision").save_pretrained(path)
    return _widen_and_reload(model, LlavaOnevisionForConditionalGeneration, path)


# Tiny processors: a word-level tokenizer with the family's image/video tokens at the ids above, a chat
# template, and the family's transformers processor and image processor sized to its tiny config.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def tiny_tokenizer(image_id: int, video_id: int | None = None, vocab_size: int = 100, named: dict | None = None):
    """``clse_fx.demo``'s words (pad 0, bos 1, eos 2, unk 3 first) with "<image>" (and "<video>") at the given
    ids; the ids left over are unused tokens, up to ``vocab_size``. ``named``: other special tokens instead
    ({"image_token": ("<|image_pad|>", 150), ...}: the tokenizer attribute, the token and its id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from clse_fx.demo import WORDS

    if named is None:
        named = {"image_token": ("<image>", image_id)} | ({"video_token": ("<video>", video_id)} if video_id else {})
    specials = dict(named.values())
    words = dict.fromkeys(["<pad>", "<s>", "</s>", "<unk>"] + [w for w in WORDS if w.strip()])
    table = dict(enumerate(words)) | {i: token for token, i in specials.items()}
    vocab = {table.get(i, f"<unused{i}>"): i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit()] + [pre_tokenizers.Split(t, behavior="isolated") for t in specials]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={name: token for name, (token, _) in named.items()}, padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def tiny_processor(family: str, image_processor=None, tokenizer=None):
    """The family's transformers processor for its tiny checkpoint. Processors with a video processor are built
    without it (transformers' video processors need torchvision, not installed here: ``clse_fx`` then reads the
    frame settings from the image processor, which they share) and save their tokenizer and image processor.
    Qwen2-VL / Qwen2.5-VL: the PIL image processor at the tiny tower's sizes (4 px patches, 2 x 2 merge, 2-frame
    temporal patches) and a tokenizer with Qwen's vision tokens at the tiny config's ids (vocabulary 200).
    ``image_processor`` and ``tokenizer`` replace the tiny ones of the families with a video processor (larger
    checkpoints of the same family: benchmarks/peer_cpu.py)."""
    from unittest import mock

    import transformers
    from transformers.processing_utils import ProcessorMixin

    clip = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family in QWEN_FAMILIES:
        image = transformers.Qwen2VLImageProcessorPil(
            patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 1024, "longest_edge": 65536}
        )
        make = transformers.Qwen2VLProcessor if family == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
        tokens, kwargs = tiny_tokenizer(QWEN_IMAGE, vocab_size=200, named=QWEN_TOKENS), {}
    elif family == "llava_next":
        image = transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=tiny_llava_next_config().image_grid_pinpoints,
        )  # fmt: skip
        return transformers.LlavaNextProcessor(image, tiny_tokenizer(LLAVA_NEXT_IMAGE), **clip)
    elif family == "llava_next_video":
        image = transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48},
            image_grid_pinpoints=tiny_llava_next_video_config().image_grid_pinpoints,
        )  # fmt: skip
        make, tokens = transformers.LlavaNextVideoProcessor, tiny_tokenizer(90, VIDEO_TOKEN)
        kwargs = clip
    elif family == "llava_onevision":
        image = transformers.LlavaOnevisionImageProcessorPil(
            size={"height": 32, "width": 32}, image_grid_pinpoints=tiny_llava_onevision_config().image_grid_pinpoints
        )
        make, tokens = transformers.LlavaOnevisionProcessor, tiny_tokenizer(ONEVISION_IMAGE, ONEVISION_VIDEO)
        kwargs = dict(num_image_tokens=16, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2")
    elif family == "video_llava":
        image = transformers.VideoLlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        make, tokens = transformers.VideoLlavaProcessor, tiny_tokenizer(VIDEO_LLAVA_IMAGE, VIDEO_LLAVA_VIDEO)
        kwargs = clip
    else:
        raise ValueError(family)
    image, tokens = image_processor or image, tokenizer or tokens
    # The argument check looks the video processor class up, which fails without torchvision.
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *args: None):
        processor = make(image_processor=image, video_processor=None, tokenizer=tokens, **kwargs)

    def save_pretrained(path, **ignored):
        """As a Hub checkpoint holds it, minus the video processor's file: tokenizer, image processor and the
        processor's own settings (processor_config.json)."""
        processor.tokenizer.save_pretrained(path)
        processor.image_processor.save_pretrained(path)
        settings = {"processor_class": make.__name__, **kwargs}
        (Path(path) / "processor_config.json").write_text(json.dumps(settings, indent=2))

    processor.save_pretrained = save_pretrained
    return processor
