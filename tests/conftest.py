"""Shared fixtures: tiny LLaVA checkpoints built from config classes and loaded via from_pretrained."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from clse_fx.demo import save_tiny_llava
from clse_fx.models import adapter_for

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker: the workers already fill the cores, and oversubscribed threads slow
    # every matmul down.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_llava(tiny_llava_dir):
    return LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()


@pytest.fixture(scope="session")
def odd_llava_dir(tmp_path_factory):
    """A 5x5-grid, 5-layer variant: odd grid, no GQA, another depth."""
    return save_tiny_llava(
        tmp_path_factory.mktemp("odd-llava"), seed=1, image_size=40, num_layers=5, num_heads=4, num_kv_heads=4
    )


@pytest.fixture(scope="session")
def odd_llava(odd_llava_dir):
    return LlavaForConditionalGeneration.from_pretrained(odd_llava_dir).eval()


def prompt_ids(model, layout: list[list[int | str]]) -> torch.Tensor:
    """input_ids from per-row layouts: ints are text ids, "img" expands to one image's placeholder tokens."""
    per_image = adapter_for(model).tokens_per_image()
    image_token_id = model.config.image_token_id
    rows = []
    for row in layout:
        ids: list[int] = []
        for item in row:
            ids.extend([image_token_id] * per_image if item == "img" else [item])
        rows.append(ids)
    return torch.tensor(rows)


# The slowest files first (seconds on 2 cores): xdist gives each worker whole files, and a long file started
# last would leave the other worker idle at the end.
SLOW_FILES = ["test_video.py", "test_qwen2_vl.py", "test_generation.py", "test_cli.py", "test_tensorrt_and_targets.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: the order inside each file is kept
