"""Shared fixtures: tiny offline processor, stock and Vedas checkpoints, processor batches."""

import pytest
import torch
from transformers import ChameleonForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

import vedas_hf  # noqa: F401  (registers the Auto classes)
from vedas_hf import (
    VedasChameleonConfig,
    VedasChameleonForConditionalGeneration,
    VedasQwen2_5_VLConfig,
    VedasQwen2_5_VLForConditionalGeneration,
    VedasQwen2VLConfig,
    VedasQwen2VLForConditionalGeneration,
)
from vedas_hf.data import chat_prompt
from vedas_hf.testing import build_tiny_processor, make_tiny_checkpoint, make_tiny_images, make_tiny_stock_checkpoint


# backbone -> (stock model class, Vedas model class, Vedas config class)
BACKBONE_CLASSES = {
    "qwen2_vl": (Qwen2VLForConditionalGeneration, VedasQwen2VLForConditionalGeneration, VedasQwen2VLConfig),
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, VedasQwen2_5_VLForConditionalGeneration, VedasQwen2_5_VLConfig),
    "chameleon": (ChameleonForConditionalGeneration, VedasChameleonForConditionalGeneration, VedasChameleonConfig),
}
QWEN_BACKBONES = ("qwen2_vl", "qwen2_5_vl")


def qwen_only(backbone, what: str):
    """Skip a test of a Qwen-only mechanism (M-RoPE, patch rows, `image_grid_thw`) on the Chameleon backbone."""
    if backbone not in QWEN_BACKBONES:
        pytest.skip(f"Qwen-only: {what}")


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


@pytest.fixture(scope="session")
def small_config(config_class, backbone):
    """`small_config(num_hidden_layers=4, vocab_size=100, image_token_id=None, **fields)`: a Vedas config of the
    backbone with these language-model sizes (nested `text_config` for Qwen, flat for Chameleon)."""
    def build(num_hidden_layers=4, vocab_size=100, image_token_id=None, **fields):
        if backbone in QWEN_BACKBONES:
            extra = {} if image_token_id is None else {"image_token_id": image_token_id}
            text = {"num_hidden_layers": num_hidden_layers, "vocab_size": vocab_size}
            return config_class(text_config=text, **extra, **fields)
        vocabulary = {} if image_token_id is None else {"<image>": image_token_id}
        return config_class(num_hidden_layers=num_hidden_layers, vocab_size=vocab_size, vocabulary_map=vocabulary,
                            **fields)
    return build


def make_batch(processor, questions, images):
    """Left-padded processor batch; `images[i]` is None (text only) or a list of PIL images. Qwen processors also
    return `mm_token_type_ids`; Chameleon's does not."""
    prompts, flat_images = [], []
    for question, row_images in zip(questions, images):
        content = [{"type": "image"} for _ in row_images or []] + [{"type": "text", "text": question}]
        prompts.append(chat_prompt(processor, [{"role": "user", "content": content}]))
        flat_images.extend(row_images or [])
    processor.tokenizer.padding_side = "left"
    return processor(text=prompts, images=flat_images or None, return_tensors="pt", padding=True)


def _images_of_rows(batch, image_token_id, merge_size):
    """First image index and image count of every row (images belong to rows in order)."""
    if "image_grid_thw" in batch:
        tokens_per_image = (batch["image_grid_thw"].prod(-1) // merge_size**2).tolist()
    else:  # Chameleon: every image has the same number of codes
        images = batch["pixel_values"].shape[0]
        tokens_per_image = [int((batch["input_ids"] == image_token_id).sum()) // images] * images
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
    out = {k: batch[k][row : row + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in batch}
    if "pixel_values" in batch and "image_grid_thw" not in batch:  # Chameleon: one pixel_values entry per image
        first, count = _images_of_rows(batch, image_token_id, merge_size)[row]
        if count:
            out["pixel_values"] = batch["pixel_values"][first : first + count]
    elif "image_grid_thw" in batch:
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
