"""Reading a transformers processor into the manifest's preprocessing recipe (applied by
``clse_fx.deploy.preprocess`` without transformers): the text part every family shares, and the pixel
parameters of the image-processor kinds the families use."""

from __future__ import annotations

from dataclasses import is_dataclass

# Stands for the user's text when the chat template is rendered at compile time; split around, it gives the
# template's text before and after one user message.
CHAT_SENTINEL = "\x00clse-user-prompt\x00"


def text_recipe(processor, placeholder: str, item_text: str, tokens_per_item: int) -> dict:
    """The ``text`` section: the bundle's tokenizer file, the placeholder and what it expands to, and the chat
    template around one user message (when the tokenizer has one)."""
    tokenizer = processor.tokenizer
    recipe = {
        "tokenizer": "tokenizer.json",
        "placeholder": placeholder,
        "placeholder_id": tokenizer.convert_tokens_to_ids(placeholder),
        "tokens_per_item": tokens_per_item,
        "item_text": item_text,
    }
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": CHAT_SENTINEL}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prefix, sentinel, suffix = rendered.partition(CHAT_SENTINEL)
        if sentinel:  # a template that does not echo the message as given cannot be split; chat is then off
            recipe.update(chat_prefix=prefix, chat_suffix=suffix)
    return recipe


def image_processor_params(image_processor, *names: str) -> dict:
    """The named settings of a transformers image processor as JSON values (sizes as plain dicts, the
    resampling filter as its PIL number)."""
    params = {}
    for name in names:
        value = getattr(image_processor, name)
        if isinstance(value, dict) or is_dataclass(value):  # a SizeDict iterates over its set (key, value) pairs
            value = {key: item for key, item in dict(value).items() if item is not None}
        elif name == "resample":
            value = int(value)
        elif isinstance(value, tuple):
            value = list(value)
        params[name] = value
    return params


CLIP_SETTINGS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)


def clip_pixels(image_processor, output: str, video: bool = False) -> dict:
    """The ``clip`` pixel recipe: resize, centre crop, rescale, normalise, into the graph input ``output``."""
    return {"kind": "clip", "output": output, "video": video, **image_processor_params(image_processor, *CLIP_SETTINGS)}


def anyres_pixels(image_processor, image_size: tuple[int, int], output: str = "pixel_values") -> dict:
    """The ``anyres`` pixel recipe (LLaVA-NeXT, LLaVA-OneVision images) for bundles compiled at ``image_size``
    (H, W): the processor's grid pinpoints, the base image's size and the tile side, as its ``_preprocess``
    derives them, plus the per-tile ``clip`` settings."""
    params = image_processor_params(image_processor, *CLIP_SETTINGS, "image_grid_pinpoints")
    size, crop = params["size"], params["crop_size"] or {}
    base = [size["height"], size["width"]] if "height" in size else [size["shortest_edge"]] * 2
    tile = crop.get("height") or size.get("height") or size["shortest_edge"]
    pinpoints = [list(pinpoint) for pinpoint in params["image_grid_pinpoints"]]
    return {
        "kind": "anyres",
        "output": output,
        "image_size": list(image_size),
        "base_size": base,
        "tile": tile,
        **params,
        "image_grid_pinpoints": pinpoints,
    }


def video_pixels(processor, output: str = "pixel_values_videos") -> dict:
    """The ``clip`` recipe applied per frame, from the processor's video processor; a processor loaded without
    one (its transformers video processors need torchvision) gives its image processor's settings, which the
    LLaVA families' video processors share (resize, crop, rescale, normalise)."""
    source = getattr(processor, "video_processor", None) or processor.image_processor
    return clip_pixels(source, output, video=True)


QWEN2_VL_SETTINGS = (
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "patch_size",
    "temporal_patch_size",
    "merge_size",
)


def qwen2_vl_pixels(image_processor, image_size: tuple[int, int], output: str, video: bool = False) -> dict:
    """The ``qwen2_vl`` pixel recipe (Qwen2-VL, Qwen2.5-VL) for bundles compiled at ``image_size`` (H, W):
    resize to it, rescale, normalise and patchify with the image processor's settings (its video processor,
    which needs torchvision, shares them), into the graph input ``output``."""
    params = image_processor_params(image_processor, *QWEN2_VL_SETTINGS)
    return {"kind": "qwen2_vl", "output": output, "video": video, "image_size": list(image_size), **params}
