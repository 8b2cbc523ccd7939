"""Offline builders for tiny Qwen2-VL artefacts used by the tests, benchmarks and demos.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in memory on a small generated English
and digits corpus, the processor wraps it with stock Qwen2-VL image/video processors sized for tiny images, and the
checkpoints are randomly initialised stock `Qwen2VLForConditionalGeneration` models (seeded, so reproducible).

All token ids are looked up from the tokenizer by name; none are hard-coded. The special tokens are the ones
Qwen2-VL uses (`SPECIAL_TOKENS`), plus the three Vedas latent tokens (`LATENT_TOKENS`) when requested.

Typical use::

    processor = build_tiny_processor()
    path = make_tiny_stock_checkpoint(tmp_path / "stock", seed=0)
    model = Qwen2VLForConditionalGeneration.from_pretrained(path)
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from .convert import LATENT_TOKENS as _LATENT_TOKENS_BY_FIELD


__all__ = [
    "BPE_VOCAB_SIZE",
    "LATENT_TOKENS",
    "SPECIAL_TOKENS",
    "TINY_CHAT_TEMPLATE",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "make_tiny_checkpoint",
    "make_tiny_images",
    "make_tiny_stock_checkpoint",
    "tiny_qwen2_vl_config_dict",
]

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"

# Qwen2-VL's special tokens, in Qwen2-VL's id order (they follow the BPE vocabulary).
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    "<|im_start|>",
    EOS_TOKEN,
    VISION_START_TOKEN,
    VISION_END_TOKEN,
    "<|vision_pad|>",
    IMAGE_TOKEN,
    VIDEO_TOKEN,
)
# The Vedas latent tokens (start, latent, end), shared with `vedas_hf.convert`.
LATENT_TOKENS: tuple[str, ...] = tuple(_LATENT_TOKENS_BY_FIELD.values())

# Target size of the trained BPE vocabulary, the 256-symbol byte alphabet included (special tokens come on top).
BPE_VOCAB_SIZE = 512

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}"
    "{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)
"""Qwen2-VL style chat template without a default system prompt.

Every message renders as `<|im_start|>{role}\\n{content}<|im_end|>\\n`; `content` is a string or a list of
`{"type": "image"}` / `{"type": "video"}` / `{"type": "text", "text": ...}` items, where an image renders as
`<|vision_start|><|image_pad|><|vision_end|>` (the processor expands `<|image_pad|>` to one token per merged patch).
`add_generation_prompt=True` appends `<|im_start|>assistant\\n`.
"""

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_ORDINALS = ("first", "second", "third", "fourth", "last")
_OPERATIONS = ("plus", "minus", "times", "mod")
_COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
_SHAPES = ("square", "circle", "triangle", "rectangle", "blob", "line")
_PLACES = ("left", "right", "top", "bottom", "middle")
_CORPUS_LINES = 400


def _apply_operation(a: int, operation: str, b: int) -> int:
    """Result of `a operation b` for the corpus's arithmetic words."""
    if operation == "plus":
        return a + b
    if operation == "minus":
        return a - b
    if operation == "times":
        return a * b
    return a % max(b, 1)


def _corpus_line(rng: random.Random) -> str:
    """One line of the built-in corpus: arithmetic, digit or shape/colour question-answer text."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    operation, ordinal = rng.choice(_OPERATIONS), rng.choice(_ORDINALS)
    colour, shape, place = rng.choice(_COLOURS), rng.choice(_SHAPES), rng.choice(_PLACES)
    digit = rng.randint(0, 9)
    templates = (
        f"What is {a} {operation} {b}? Answer: {_apply_operation(a, operation, b)}",
        f"The {ordinal} digit is {digit}, so the answer is {_DIGIT_WORDS[digit]}.",
        f"What colour is the {shape} on the {place}? Answer: {colour}",
        f"How many {colour} {shape}s are there in the image? Answer: {digit}",
        f"What shape is at the {place} of the image? The {shape} is {colour}.",
        f"Compute {a} {operation} {b} step by step. First, {a} {operation} {b} equals "
        f"{_apply_operation(a, operation, b)}. Answer: {_apply_operation(a, operation, b)}",
        f"the first digit is {a // 10} and the second digit is {a % 10}",
        f"Is the {colour} {shape} left of the {rng.choice(_COLOURS)} one? Answer: {rng.choice(('yes', 'no'))}",
    )
    return templates[rng.randrange(len(templates))]


def _tiny_corpus(num_lines: int = _CORPUS_LINES, seed: int = 0) -> list[str]:
    """The deterministic built-in training corpus (English question/answer lines with digits)."""
    rng = random.Random(seed)
    return [_corpus_line(rng) for _ in range(num_lines)] + [" ".join(map(str, range(10))), " ".join(_DIGIT_WORDS)]


def _qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """The Qwen2 pre-tokenizer (regex split, then byte-level mapping), so trained merges match `Qwen2Tokenizer`."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _train_byte_level_bpe(lines: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on `lines`; returns its vocabulary (256-byte alphabet included) and merges."""
    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _qwen2_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def build_tiny_tokenizer(add_latent_tokens: bool = True, padding_side: str = "right") -> Qwen2Tokenizer:
    """A tiny, offline `Qwen2Tokenizer` (the transformers 5 fast tokenizer) with Qwen2-VL's special tokens.

    The byte-level BPE (about `BPE_VOCAB_SIZE` entries, the 256-byte alphabet included, so any text encodes and
    decodes exactly) is trained in memory on a built-in corpus; the special tokens follow it in Qwen2-VL's order:
    `<|endoftext|>` (pad and unk), `<|im_start|>`, `<|im_end|>` (eos), `<|vision_start|>`, `<|vision_end|>`,
    `<|vision_pad|>`, `<|image_pad|>`, `<|video_pad|>`; then, with `add_latent_tokens`, `<|start-latent|>`,
    `<|latent|>`, `<|end-latent|>`. All are special tokens (never split, dropped by `skip_special_tokens`).
    There is no bos token, as in Qwen2-VL.

    It carries `TINY_CHAT_TEMPLATE` and round-trips (padding side included) through `save_pretrained` /
    `AutoTokenizer.from_pretrained` offline. The result is identical on every call.

    Args:
        add_latent_tokens: also add the three Vedas latent tokens.
        padding_side: `"right"` (the tokenizer default, for training batches) or `"left"` (for batched
            generation; `build_tiny_processor` uses it).

    Raises:
        ValueError: for another `padding_side`.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    vocab, merges = _train_byte_level_bpe(_tiny_corpus(), BPE_VOCAB_SIZE)
    extra = list(SPECIAL_TOKENS) + (list(LATENT_TOKENS) if add_latent_tokens else [])
    for token in extra:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=PAD_TOKEN,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[token for token in extra if token != PAD_TOKEN],
        model_max_length=2048,
        padding_side=padding_side,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _check_positive_int(name: str, value: Any) -> None:
    """Raise `ValueError` unless `value` is an int >= 1 (bools rejected)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _pixel_bounds(patch_size: int, merge_size: int, min_pixels: int | None, max_pixels: int | None) -> dict:
    """The processors' `size` dict (pixel-count bounds); the defaults give a merged grid of at least 2x2 and at
    most the area of 16x16 patches (64 merged tokens)."""
    factor = patch_size * merge_size
    min_pixels = (2 * factor) ** 2 if min_pixels is None else min_pixels
    max_pixels = (16 * patch_size) ** 2 if max_pixels is None else max_pixels
    _check_positive_int("min_pixels", min_pixels)
    _check_positive_int("max_pixels", max_pixels)
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels={max_pixels} must be >= min_pixels={min_pixels}.")
    if max_pixels < factor**2:
        raise ValueError(
            f"max_pixels={max_pixels} is below one merged token ((patch_size * merge_size) ** 2 = {factor**2})."
        )
    return {"shortest_edge": min_pixels, "longest_edge": max_pixels}


def _video_only_kwargs() -> dict:
    """Opt in to the per-frame pixel cap (the announced future default) where this transformers version has the
    switch, which also silences its warning on every video call."""
    if "cap_pixels_per_frame" in getattr(Qwen2VLVideoProcessor.valid_kwargs, "__annotations__", {}):
        return {"cap_pixels_per_frame": True}
    return {}


def build_tiny_processor(
    add_latent_tokens: bool = True,
    patch_size: int = 4,
    merge_size: int = 2,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    temporal_patch_size: int = 2,
    backbone: str = "qwen2_vl",
) -> Qwen2VLProcessor:
    """A tiny, offline `Qwen2VLProcessor` (`Qwen2_5_VLProcessor` for `backbone="qwen2_5_vl"`): `build_tiny_tokenizer`
    + stock Qwen2-VL image and video processors.

    Images are resized (keeping the aspect ratio) to multiples of `patch_size * merge_size` with a pixel count in
    `[min_pixels, max_pixels]`. The defaults, `(2 * patch_size * merge_size) ** 2` and `(16 * patch_size) ** 2`
    (256 and 4096 for the default 4x4 patches), give every image a merged grid of at least 2x2 tokens and at most
    the area of 16x16 patches (64 image tokens): 8x8 images are upscaled to 16x16 (2x2 tokens), 32x32 images give
    4x4 tokens, 64x64 images 8x8 and larger ones are scaled down. The processor's tokenizer pads on the left (what
    batched generation needs; saved with the processor, so checkpoints reload that way). Calls return
    `input_ids`, `attention_mask`, `mm_token_type_ids` and, with images, `pixel_values` and `image_grid_thw`.

    Args:
        add_latent_tokens: add the three Vedas latent tokens to the tokenizer.
        patch_size: spatial patch size of the vision encoder (`vision_config.patch_size`).
        merge_size: spatial merge size (`vision_config.spatial_merge_size`).
        min_pixels: smallest resized image area; default above.
        max_pixels: largest resized image area; default above.
        temporal_patch_size: temporal patch size (`vision_config.temporal_patch_size`).
        backbone: `"qwen2_vl"` or `"qwen2_5_vl"` (the processor class).

    Raises:
        ValueError: on a non-positive size or `max_pixels < min_pixels`.
    """
    _check_positive_int("patch_size", patch_size)
    _check_positive_int("merge_size", merge_size)
    _check_positive_int("temporal_patch_size", temporal_patch_size)
    sizes = {
        "size": _pixel_bounds(patch_size, merge_size, min_pixels, max_pixels),
        "patch_size": patch_size,
        "merge_size": merge_size,
        "temporal_patch_size": temporal_patch_size,
    }
    tokenizer = build_tiny_tokenizer(add_latent_tokens=add_latent_tokens, padding_side="left")
    processor_class = _backbone(backbone)[2]
    return processor_class(
        image_processor=Qwen2VLImageProcessor(**copy.deepcopy(sizes)),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**copy.deepcopy(sizes), **_video_only_kwargs()),
        chat_template=TINY_CHAT_TEMPLATE,
    )


_BACKBONES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
}
BACKBONES = tuple(_BACKBONES)


def _backbone(name: str) -> tuple:
    """(stock config class, stock model class, processor class) of a backbone name."""
    if name not in _BACKBONES:
        raise ValueError(f"Unknown backbone={name!r}; use one of {BACKBONES}.")
    return _BACKBONES[name]


def _tiny_vision_defaults(backbone: str) -> dict:
    """Tiny vision tower: depth 2, width 32, 2 heads, 4x4 patches merged 2x2. For Qwen2.5-VL the window
    attention covers 16x16 pixels (2x2 merged tokens) in block 0 and block 1 attends globally, so both paths run."""
    shared = {"depth": 2, "num_heads": 2, "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "in_channels": 3}
    if backbone == "qwen2_5_vl":
        return {**shared, "hidden_size": 32, "intermediate_size": 64, "window_size": 16, "fullatt_block_indexes": [1]}
    return {**shared, "embed_dim": 32, "mlp_ratio": 2}


def _deep_merge(base: dict, overrides: dict) -> dict:
    """`base` updated with `overrides`, merging nested dicts key by key instead of replacing them."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of the rotary half-dimension, in Qwen2-VL's 2:3:3 proportion."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def _text_head_dim(text_config: dict) -> int:
    """Attention head size of the language model; raises `ValueError` for an inconsistent shape."""
    hidden, heads = text_config["hidden_size"], text_config["num_attention_heads"]
    kv_heads = text_config.get("num_key_value_heads") or heads
    if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise ValueError(
            f"text_config needs hidden_size ({hidden}) divisible by num_attention_heads ({heads}) into an even "
            f"head size, and num_attention_heads divisible by num_key_value_heads ({kv_heads})."
        )
    return hidden // heads


def _token_id(tokenizer, token: str) -> int:
    """Id of `token`; raises `ValueError` when the tokenizer lacks it."""
    token_id = tokenizer.get_vocab().get(token)
    if token_id is None:
        raise ValueError(f"The tokenizer has no {token!r} token; build it with `build_tiny_tokenizer`.")
    return token_id


def _vocab_size(tokenizer) -> int:
    """Embedding rows: the tokenizer plus any missing latent tokens (so `vedas_hf.convert` can add them without
    resizing), rounded up to a multiple of 8."""
    vocab = tokenizer.get_vocab()
    needed = len(tokenizer) + sum(token not in vocab for token in LATENT_TOKENS)
    return 8 * math.ceil(needed / 8)


def tiny_qwen2_vl_config_dict(tokenizer, backbone: str = "qwen2_vl", **overrides: Any) -> dict:
    """Keyword arguments for a tiny stock `transformers.Qwen2VLConfig` (`Qwen2_5_VLConfig` for
    `backbone="qwen2_5_vl"`, whose vision tower is described in `_tiny_vision_defaults`) matching `tokenizer`.

    Defaults: language model with hidden size 64, 4 layers, 4 attention heads, 2 key/value heads (head size 16),
    intermediate size 128, `max_position_embeddings` 2048, M-RoPE sections [2, 3, 3]; vision tower with depth 2,
    embed_dim 32, 2 heads, mlp_ratio 2, patch size 4, spatial merge size 2, temporal patch size 2, 3 channels and
    output `hidden_size` equal to the language model's. `vocab_size` is `len(tokenizer)` (plus room for the three
    latent tokens when the tokenizer lacks them) rounded up to a multiple of 8. `image_token_id`,
    `video_token_id`, `vision_start_token_id`, `vision_end_token_id` and the text config's bos (`<|endoftext|>`,
    as in Qwen2-VL), eos and pad ids are read from the tokenizer.

    Args:
        tokenizer: a tokenizer from `build_tiny_tokenizer` (or a processor holding one).
        overrides: top-level keys replace the defaults; dict values (`text_config`, `vision_config`,
            `rope_parameters`) are merged key by key, e.g. `text_config={"num_hidden_layers": 2}`. Unless given,
            the vision `hidden_size` follows the text one and `mrope_section` follows the head size.

    Raises:
        ValueError: when the tokenizer lacks a Qwen2-VL special token or the text shapes are inconsistent.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    _backbone(backbone)
    defaults = {
        "text_config": {
            "vocab_size": _vocab_size(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "bos_token_id": _token_id(tokenizer, PAD_TOKEN),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "vision_config": _tiny_vision_defaults(backbone),
        "image_token_id": _token_id(tokenizer, IMAGE_TOKEN),
        "video_token_id": _token_id(tokenizer, VIDEO_TOKEN),
        "vision_start_token_id": _token_id(tokenizer, VISION_START_TOKEN),
        "vision_end_token_id": _token_id(tokenizer, VISION_END_TOKEN),
        "tie_word_embeddings": False,
    }
    config = _deep_merge(defaults, overrides)
    text, vision = config["text_config"], config["vision_config"]
    rope = text.setdefault("rope_parameters", {})
    rope.setdefault("mrope_section", _mrope_section(_text_head_dim(text)))
    vision.setdefault("out_hidden_size" if backbone == "qwen2_5_vl" else "hidden_size", text["hidden_size"])
    return config


def _processor_for_config(config: dict, add_latent_tokens: bool, backbone: str = "qwen2_vl") -> Qwen2VLProcessor:
    """`build_tiny_processor` with the patch sizes of `config["vision_config"]`."""
    vision = config["vision_config"]
    return build_tiny_processor(
        add_latent_tokens=add_latent_tokens,
        backbone=backbone,
        patch_size=vision["patch_size"],
        merge_size=vision["spatial_merge_size"],
        temporal_patch_size=vision["temporal_patch_size"],
    )


def make_tiny_stock_checkpoint(
    path, seed: int = 0, add_latent_tokens: bool = False, backbone: str = "qwen2_vl", **config_overrides: Any
) -> str:
    """Write a complete, randomly initialised stock `Qwen2VLForConditionalGeneration` checkpoint folder
    (`Qwen2_5_VLForConditionalGeneration` for `backbone="qwen2_5_vl"`).

    The folder holds `config.json`, `generation_config.json`, `model.safetensors` (float32), the tokenizer files,
    the image/video processor configs and the chat template; it loads offline with
    `Qwen2VLForConditionalGeneration.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`. Weights
    come from `torch.manual_seed(seed)`, so equal arguments give equal checkpoints (the global torch RNG is
    reseeded as a side effect).

    Args:
        path: target folder (created if missing).
        seed: torch seed for the weight initialisation.
        add_latent_tokens: put the three Vedas latent tokens in the tokenizer (a stock Qwen2-VL has none; the
            embeddings have room for them either way).
        backbone: `"qwen2_vl"` or `"qwen2_5_vl"`.
        config_overrides: passed to `tiny_qwen2_vl_config_dict`; the processor follows the vision patch sizes.

    Returns:
        `path` as a string.
    """
    tokenizer = build_tiny_tokenizer(add_latent_tokens=add_latent_tokens)
    config_class, model_class, _ = _backbone(backbone)
    config_kwargs = tiny_qwen2_vl_config_dict(tokenizer, backbone=backbone, **config_overrides)
    processor = _processor_for_config(config_kwargs, add_latent_tokens, backbone)
    torch.manual_seed(seed)
    model = model_class(config_class(**config_kwargs))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def make_tiny_checkpoint(
    path, backbone: str = "qwen2_vl", seed: int = 0, stock_overrides: dict | None = None, **vedas_overrides: Any
) -> str:
    """Write a tiny Vedas checkpoint: `make_tiny_stock_checkpoint(seed=seed, backbone=backbone, **stock_overrides)`
    converted with `vedas_hf.convert.convert_checkpoint` (new Vedas modules initialised after
    `torch.manual_seed(seed)`).

    Args:
        path: target folder (created if missing; overwritten if not empty).
        backbone: `"qwen2_vl"` or `"qwen2_5_vl"`.
        seed: torch seed for the stock weights and the new Vedas modules.
        stock_overrides: backbone sizes for `tiny_qwen2_vl_config_dict`, e.g.
            `{"text_config": {"hidden_size": 128}, "vision_config": {"patch_size": 2}}`.
        vedas_overrides: Vedas config fields, e.g. `replay_top_k=3, router_top_k=4`.

    Returns:
        `path` as a string.
    """
    from .convert import convert_checkpoint

    with tempfile.TemporaryDirectory() as stock_dir:
        make_tiny_stock_checkpoint(
            os.path.join(stock_dir, "stock"), seed=seed, backbone=backbone, **(stock_overrides or {})
        )
        torch.manual_seed(seed)
        return convert_checkpoint(os.path.join(stock_dir, "stock"), path, overwrite=True, **vedas_overrides)


def _draw_random_shape(draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int) -> None:
    """Draw one random filled rectangle or ellipse ("blob") of a random colour."""
    x0, y0 = rng.randrange(width), rng.randrange(height)
    x1, y1 = rng.randint(x0, width - 1), rng.randint(y0, height - 1)
    colour = tuple(rng.randrange(256) for _ in range(3))
    shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
    shape((x0, y0, x1, y1), fill=colour)


def make_tiny_images(
    n: int, sizes: tuple[tuple[int, int], ...] = ((32, 32), (48, 32)), seed: int = 0
) -> list[Image.Image]:
    """`n` deterministic RGB images: random background colour with 1-4 random rectangles and blobs.

    Args:
        n: number of images (0 allowed).
        sizes: `(width, height)` pairs (PIL order), used in turn: image `i` has size `sizes[i % len(sizes)]`.
        seed: seed of the pixel content; equal arguments give equal images.

    Raises:
        ValueError: for a negative `n`, empty `sizes` or a non-positive width/height.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}.")
    sizes = tuple(tuple(size) for size in sizes)
    if not sizes or any(len(size) != 2 for size in sizes):
        raise ValueError(f"sizes must be a non-empty sequence of (width, height) pairs, got {sizes!r}.")
    for width, height in sizes:
        _check_positive_int("image width", width)
        _check_positive_int("image height", height)
    rng = random.Random(seed)
    images = []
    for index in range(n):
        width, height = sizes[index % len(sizes)]
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            _draw_random_shape(draw, rng, width, height)
        images.append(image)
    return images
