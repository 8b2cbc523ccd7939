"""Shared fixtures: tiny offline processor, stock and Vedas checkpoints, processor batches."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

import vedas_hf  # noqa: F401  (registers the Auto classes)
from vedas_hf import (
    VedasQwen2_5_VLConfig,
    VedasQwen2_5_VLForConditionalGeneration,
    VedasQwen2VLConfig,
    VedasQwen2VLForConditionalGeneration,
)
from vedas_hf.testing import build_tiny_processor, make_tiny_checkpoint, make_tiny_images, make_tiny_stock_checkpoint


# backbone -> (stock model class, Vedas model class, Vedas config class)
BACKBONE_CLASSES = {
    "qwen2_vl": (Qwen2VLForConditionalGeneration, VedasQwen2VLForConditionalGeneration, VedasQwen2VLConfig),
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, VedasQwen2_5_VLForConditionalGeneration, VedasQwen2_5_VLConfig),
}


@pytest.fixture(scope="session", params=list(BACKBONE_CLASSES))
def backbone(request):
    """Every test that builds a model runs once per backbone."""
    return request.param


@pytest.fixture(scope="session")
def stock_class(backbone):
    return BACKBONE_CLASSES[backbone][0]


@pytest.fixture(scope="session")
def vedas_class(backbone):
    return BACKBONE_CLASSES[backbone][1]


@pytest.fixture(scope="session")
def config_class(backbone):
    return BACKBONE_CLASSES[backbone][2]


@pytest.fixture(scope="session")
def processor(backbone):
    return build_tiny_processor(backbone=backbone)


@pytest.fixture(scope="session")
def stock_dir(tmp_path_factory, backbone):
    return make_tiny_stock_checkpoint(tmp_path_factory.mktemp("stock"), seed=0, backbone=backbone)


@pytest.fixture(scope="session")
def vedas_dir(tmp_path_factory, backbone):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("vedas"), backbone=backbone, seed=0, replay_top_k=3,
                                router_top_k=4)


def make_batch(processor, questions, images):
    """Left-padded processor batch; `images[i]` is None (text only) or a list of PIL images."""
    prompts, flat_images = [], []
    for question, row_images in zip(questions, images):
        content = [{"type": "image"} for _ in row_images or []] + [{"type": "text", "text": question}]
        prompts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        flat_images.extend(row_images or [])
    processor.tokenizer.padding_side = "left"
    return processor(text=prompts, images=flat_images or None, return_tensors="pt", padding=True)


def _images_of_rows(batch, image_token_id, merge_size):
    """First image index and image count of every row (images belong to rows in order)."""
    tokens_per_image = (batch["image_grid_thw"].prod(-1) // merge_size**2).tolist()
    spans, image = [], 0
    for row_tokens in (batch["input_ids"] == image_token_id).sum(dim=1).tolist():
        first, seen = image, 0
        while seen < row_tokens:
            seen += tokens_per_image[image]
            image += 1
        spans.append((first, image - first))
    return spans


def split_batch(batch, row, image_token_id, merge_size=2):
    """Row `row` of a processor batch, with its own images and without padding columns."""
    keep = batch["attention_mask"][row].bool()
    out = {k: batch[k][row : row + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "image_grid_thw" in batch:
        first, count = _images_of_rows(batch, image_token_id, merge_size)[row]
        if count:
            grids = batch["image_grid_thw"]
            offsets = torch.cat([grids.new_zeros(1), grids.prod(-1).cumsum(0)]).tolist()
            out["image_grid_thw"] = grids[first : first + count]
            out["pixel_values"] = batch["pixel_values"][offsets[first] : offsets[first + count]]
    return out


@pytest.fixture
def images():
    return make_tiny_images(4, sizes=((32, 32), (48, 32), (32, 64), (40, 40)), seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
