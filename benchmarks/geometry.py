"""Model geometries the benchmarks use: LLaVA-1.5-7B on the meta device, a reduced-width latency model."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)


def llava_config(
    hidden: int, intermediate: int, heads: int, vocab: int, vision_hidden: int, vision_layers: int, layers: int = 32
) -> LlavaConfig:
    """LLaVA-1.5 geometry: CLIP ViT/14 at 336 px (24x24 = 576 visual tokens), a 32-layer Llama decoder (fewer
    ``layers`` for smoke runs)."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 64),
        image_size=336,
        patch_size=14,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=vocab - 64,  # LLaVA-1.5's <image> is id 32000 of 32064
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = "sdpa"
    return config


# Published LLaVA-1.5-7B: CLIP ViT-L/14-336 (1024 wide, 24 layers) and Vicuna-7B (4096 wide, MHA, 11008 MLP).
LLAVA_7B = dict(hidden=4096, intermediate=11008, heads=32, vocab=32064, vision_hidden=1024, vision_layers=24)
# Same depth, tokens and shape ratios at 1/8 width, so prefill fits 2 cores; a small vocabulary keeps the
# LM head from dominating at this width.
LLAVA_LATENCY = dict(hidden=512, intermediate=1376, heads=8, vocab=4096, vision_hidden=256, vision_layers=4)


def build(
    geometry: dict, device: str = "cpu", seed: int = 0, dtype: torch.dtype = torch.float32
) -> LlavaForConditionalGeneration:
    """The model for ``geometry``, initialised straight in ``dtype`` (a float32 7B model would need 28 GB first);
    on "meta" it holds no weights (FLOP and KV counting, tracing)."""
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlavaForConditionalGeneration(llava_config(**geometry)).eval()
    finally:
        torch.set_default_dtype(default_dtype)


def prompt(model, text_len: int, device: str = "cpu", batch: int = 1) -> dict[str, torch.Tensor]:
    """A LLaVA-style prompt: one text token, the 576 image tokens, then the rest of the text."""
    row = [1] + [model.config.image_token_id] * 576 + [2 + i % 1000 for i in range(text_len - 1)]
    input_ids = torch.tensor([row] * batch)
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": torch.randn(batch, 3, 336, 336, generator=generator).to(device),
    }


def _on_meta(model_class, config):
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return model_class(config).eval()


def qwen2_vl_config(
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    layers: int,
    vision_depth: int,
    vision_hidden: int,
    vision_heads: int,
) -> Qwen2VLConfig:
    """Qwen2-VL geometry: a ViT/14 with 2x2 patch merging into a GQA decoder with M-RoPE (128-wide heads), with
    Qwen2-VL's vision token ids (151652-151656)."""
    text = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, max_position_embeddings=32768, pad_token_id=0,
    )  # fmt: skip
    vision = dict(
        depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden, num_heads=vision_heads, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2,
    )  # fmt: skip
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


# Published Qwen2-VL-7B: a 28-layer decoder 3584 wide (28 heads, 4 KV heads), a 32-layer ViT 1280 wide (675M params).
QWEN2_VL_7B = dict(
    hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064, layers=28, vision_depth=32,
    vision_hidden=1280, vision_heads=16,
)  # fmt: skip


def qwen2_vl_7b() -> Qwen2VLForConditionalGeneration:
    """Published Qwen2-VL-7B, weightless."""
    return _on_meta(Qwen2VLForConditionalGeneration, qwen2_vl_config(**QWEN2_VL_7B))


def llava_next_video_7b() -> LlavaNextVideoForConditionalGeneration:
    """Published LLaVA-NeXT-Video-7B, weightless: CLIP ViT-L/14-336 frames pooled 2x2 (12x12 per frame), Vicuna-7B."""
    base = llava_config(**LLAVA_7B)
    config = LlavaNextVideoConfig(
        vision_config=base.vision_config, text_config=base.text_config, image_token_id=32001, video_token_id=32000,
        spatial_pool_stride=2, spatial_pool_mode="average", vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )  # fmt: skip
    return _on_meta(LlavaNextVideoForConditionalGeneration, config)


def video_llava_7b() -> VideoLlavaForConditionalGeneration:
    """Published Video-LLaVA-7B, weightless: LanguageBind ViT-L/14 at 224 px (16x16 patches, a CLS token kept per
    video frame: 8 x 257 = 2056 video tokens), Vicuna-7B."""
    base = llava_config(**LLAVA_7B)
    vision = base.vision_config
    vision.image_size = 224
    config = VideoLlavaConfig(
        vision_config=vision, text_config=base.text_config, image_token_index=32000, video_token_index=32001,
        vision_feature_select_strategy="default", vision_feature_layer=-2, video_seq_length=2056,
    )  # fmt: skip
    return _on_meta(VideoLlavaForConditionalGeneration, config)


def llava_next_7b() -> LlavaNextForConditionalGeneration:
    """Published LLaVA-NeXT-7B (llava-v1.6-vicuna-7b), weightless: CLIP ViT-L/14-336 tiles, Vicuna-7B."""
    base = llava_config(**LLAVA_7B)
    config = LlavaNextConfig(
        vision_config=base.vision_config, text_config=base.text_config, image_token_index=32000,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )  # fmt: skip
    return _on_meta(LlavaNextForConditionalGeneration, config)


def llava_onevision_7b() -> LlavaOnevisionForConditionalGeneration:
    """Published LLaVA-OneVision-7B (llava-onevision-qwen2-7b-ov), weightless: SigLIP so400m/14 at 384 px (27x27
    per tile, no CLS), anyres_max_9 over 384..2304 px tilings, Qwen2-7B (28 layers, 3584 wide, 4 KV heads)."""
    vision = dict(
        model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
        num_attention_heads=16, image_size=384, patch_size=14,
    )  # fmt: skip
    text = dict(
        model_type="qwen2", vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, pad_token_id=0,
    )  # fmt: skip
    pinpoints = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=151646, video_token_index=151647,
        image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )  # fmt: skip
    return _on_meta(LlavaOnevisionForConditionalGeneration, config)
