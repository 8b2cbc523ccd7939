"""Offline builders for tiny Qwen2-VL, Qwen2.5-VL and Chameleon artefacts used by the tests, benchmarks and demos.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in memory on a small generated English
and digits corpus, the processor wraps it with stock Qwen2-VL image/video processors (a stock Chameleon image
processor for `backbone="chameleon"`) sized for tiny images, and the checkpoints are randomly initialised stock
`Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` / `ChameleonForConditionalGeneration`
models (seeded, so reproducible).

All token ids are looked up from the tokenizer by name; none are hard-coded. The special tokens are the ones
Qwen2-VL uses (`SPECIAL_TOKENS`; `CHAMELEON_SPECIAL_TOKENS` and one `IMGIMG...` token per VQ code for Chameleon),
plus the three Vedas latent tokens (`LATENT_TOKENS`) when requested.

Typical use::

    processor = build_tiny_processor()
    path = make_tiny_stock_checkpoint(tmp_path / "stock", seed=0)
    model = Qwen2VLForConditionalGeneration.from_pretrained(path)
    path = make_tiny_stock_checkpoint(tmp_path / "chameleon", seed=0, backbone="chameleon")
    model = ChameleonForConditionalGeneration.from_pretrained(path)
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
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    ChameleonImageProcessor,
    ChameleonProcessor,
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
    "BACKBONES",
    "BPE_VOCAB_SIZE",
    "CHAMELEON_NUM_IMAGE_CODES",
    "CHAMELEON_SPECIAL_TOKENS",
    "LATENT_TOKENS",
    "SPECIAL_TOKENS",
    "TINY_CHAMELEON_CHAT_TEMPLATE",
    "TINY_CHAT_TEMPLATE",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "chameleon_image_token",
    "make_tiny_checkpoint",
    "make_tiny_images",
    "make_tiny_stock_checkpoint",
    "tiny_chameleon_config_dict",
    "tiny_qwen2_vl_config_dict",
]

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"

# The chat tokens both tiny tokenizers start their special tokens with (padding, turn start, turn end / eos).
_CHAT_TOKENS: tuple[str, ...] = (PAD_TOKEN, "<|im_start|>", EOS_TOKEN)
# Qwen2-VL's special tokens, in Qwen2-VL's id order (they follow the BPE vocabulary).
SPECIAL_TOKENS: tuple[str, ...] = (
    *_CHAT_TOKENS,
    VISION_START_TOKEN,
    VISION_END_TOKEN,
    "<|vision_pad|>",
    IMAGE_TOKEN,
    VIDEO_TOKEN,
)
# Chameleon's special tokens (names as in the real Chameleon vocabulary), in this module's id order: the Qwen-style
# chat tokens, then the separator `ChameleonProcessor` appends to every chat prompt, begin/end of image and the image
# placeholder. One `IMGIMG...` token per VQ code (`chameleon_image_token`) follows them.
CHAMELEON_SEP_TOKEN = "<reserved08706>"
CHAMELEON_BOI_TOKEN = "<racm3:break>"
CHAMELEON_EOI_TOKEN = "<eoss>"
CHAMELEON_IMAGE_TOKEN = "<image>"
CHAMELEON_SPECIAL_TOKENS: tuple[str, ...] = (
    *_CHAT_TOKENS,
    CHAMELEON_SEP_TOKEN,
    CHAMELEON_BOI_TOKEN,
    CHAMELEON_EOI_TOKEN,
    CHAMELEON_IMAGE_TOKEN,
)
# Codebook size of the tiny Chameleon VQ-VAE, hence the number of `IMGIMG...` tokens in its tokenizer.
CHAMELEON_NUM_IMAGE_CODES = 32
_CHAMELEON_IMAGE_PREFIX = "IMGIMG"

# The Vedas latent tokens (start, latent, end), shared with `vedas_hf.convert`.
LATENT_TOKENS: tuple[str, ...] = tuple(_LATENT_TOKENS_BY_FIELD.values())

# Target size of the trained BPE vocabulary, the 256-symbol byte alphabet included (special tokens come on top).
BPE_VOCAB_SIZE = 512

def _chat_template(image: str, video: str) -> str:
    """The tiny chat template with `image` / `video` as what an image / video item renders to."""
    return (
        "{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}"
        "{{ message['content'] }}"
        "{% else %}"
        "{% for item in message['content'] %}"
        "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
        f"{image}"
        "{% elif item['type'] == 'video' or 'video' in item %}"
        f"{video}"
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


TINY_CHAT_TEMPLATE = _chat_template("<|vision_start|><|image_pad|><|vision_end|>",
                                    "<|vision_start|><|video_pad|><|vision_end|>")
"""Qwen2-VL style chat template without a default system prompt.

Every message renders as `<|im_start|>{role}\\n{content}<|im_end|>\\n`; `content` is a string or a list of
`{"type": "image"}` / `{"type": "video"}` / `{"type": "text", "text": ...}` items, where an image renders as
`<|vision_start|><|image_pad|><|vision_end|>` (the processor expands `<|image_pad|>` to one token per merged patch).
`add_generation_prompt=True` appends `<|im_start|>assistant\\n`.
"""

TINY_CHAMELEON_CHAT_TEMPLATE = _chat_template("<image>", "{{ raise_exception('Chameleon takes no videos.') }}")
"""`TINY_CHAT_TEMPLATE` for `backbone="chameleon"`: an image item renders as `<image>` (which `ChameleonProcessor`
expands to `<racm3:break>` + `image_seq_length` x `<image>` + `<eoss>`); a video item raises.
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


def chameleon_image_token(code: int) -> str:
    """Name of the Chameleon vocabulary token of VQ code `code`, spelled like real Chameleon's: `IMGIMG`, the
    code's decimal digits written with the letters A-J for 0-9, then `Z` (code 10 -> `IMGIMGBAZ`), which is what
    `ChameleonImageVocabularyMapping.bpe2img` parses back to the code.

    Raises:
        ValueError: for a negative or non-int `code`.
    """
    if not isinstance(code, int) or isinstance(code, bool) or code < 0:
        raise ValueError(f"code must be a non-negative int, got {code!r}.")
    return _CHAMELEON_IMAGE_PREFIX + "".join(chr(ord("A") + int(digit)) for digit in str(code)) + "Z"


def build_tiny_tokenizer(
    add_latent_tokens: bool = True,
    padding_side: str = "right",
    backbone: str = "qwen2_vl",
    num_image_codes: int = CHAMELEON_NUM_IMAGE_CODES,
) -> Qwen2Tokenizer:
    """A tiny, offline `Qwen2Tokenizer` (the transformers 5 fast tokenizer) with Qwen2-VL's (or Chameleon's)
    special tokens.

    The byte-level BPE (about `BPE_VOCAB_SIZE` entries, the 256-byte alphabet included, so any text encodes and
    decodes exactly) is trained in memory on a built-in corpus; the special tokens follow it in Qwen2-VL's order:
    `<|endoftext|>` (pad and unk), `<|im_start|>`, `<|im_end|>` (eos), `<|vision_start|>`, `<|vision_end|>`,
    `<|vision_pad|>`, `<|image_pad|>`, `<|video_pad|>`; then, with `add_latent_tokens`, `<|start-latent|>`,
    `<|latent|>`, `<|end-latent|>`. All are special tokens (never split, dropped by `skip_special_tokens`).
    There is no bos token, as in Qwen2-VL.

    For `backbone="chameleon"` (a generic BPE `Qwen2Tokenizer` stands in for Chameleon's tokenizer) the special
    tokens are `CHAMELEON_SPECIAL_TOKENS`: `<|endoftext|>` (pad and unk), `<|im_start|>`, `<|im_end|>` (eos),
    `<reserved08706>` (the sep token, which `ChameleonProcessor` appends to every prompt in chat mode),
    `<racm3:break>` (begin of image), `<eoss>` (end of image), `<image>` (image placeholder); then
    `num_image_codes` plain vocabulary tokens `chameleon_image_token(0)`, ..., one per VQ code (the model maps
    its VQ codes to these ids and never predicts them; text never encodes to them); then the latent tokens.

    It carries `TINY_CHAT_TEMPLATE` (`TINY_CHAMELEON_CHAT_TEMPLATE` for Chameleon) and round-trips (padding side
    included) through `save_pretrained` / `AutoTokenizer.from_pretrained` offline. The result is identical on
    every call.

    Args:
        add_latent_tokens: also add the three Vedas latent tokens.
        padding_side: `"right"` (the tokenizer default, for training batches) or `"left"` (for batched
            generation; `build_tiny_processor` uses it).
        backbone: one of `BACKBONES`; the Qwen backbones share one tokenizer.
        num_image_codes: Chameleon only: the VQ codebook size (`vq_config.num_embeddings`).

    Raises:
        ValueError: for another `padding_side`, an unknown `backbone` or a non-positive `num_image_codes`.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    _backbone(backbone)
    vocab, merges = _train_byte_level_bpe(_tiny_corpus(), BPE_VOCAB_SIZE)
    latent = list(LATENT_TOKENS) if add_latent_tokens else []
    if backbone == "chameleon":
        _check_positive_int("num_image_codes", num_image_codes)
        special = list(CHAMELEON_SPECIAL_TOKENS) + latent
        added = list(CHAMELEON_SPECIAL_TOKENS) + [chameleon_image_token(code) for code in range(num_image_codes)]
        added += latent
        extras = {"sep_token": CHAMELEON_SEP_TOKEN}
        chat_template = TINY_CHAMELEON_CHAT_TEMPLATE
    else:
        special = added = list(SPECIAL_TOKENS) + latent
        extras, chat_template = {}, TINY_CHAT_TEMPLATE
    for token in added:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=PAD_TOKEN,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[token for token in special if token not in (PAD_TOKEN, *extras.values())],
        model_max_length=2048,
        padding_side=padding_side,
        **extras,
    )
    tokenizer.chat_template = chat_template
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
    image_size: int | None = None,
    image_seq_length: int | None = None,
    num_image_codes: int = CHAMELEON_NUM_IMAGE_CODES,
) -> Qwen2VLProcessor | ChameleonProcessor:
    """A tiny, offline `Qwen2VLProcessor` (`Qwen2_5_VLProcessor` for `backbone="qwen2_5_vl"`): `build_tiny_tokenizer`
    + stock Qwen2-VL image and video processors; or, for `backbone="chameleon"`, a `ChameleonProcessor`.

    Qwen: images are resized (keeping the aspect ratio) to multiples of `patch_size * merge_size` with a pixel
    count in `[min_pixels, max_pixels]`. The defaults, `(2 * patch_size * merge_size) ** 2` and
    `(16 * patch_size) ** 2` (256 and 4096 for the default 4x4 patches), give every image a merged grid of at least
    2x2 tokens and at most the area of 16x16 patches (64 image tokens): 8x8 images are upscaled to 16x16 (2x2
    tokens), 32x32 images give 4x4 tokens, 64x64 images 8x8 and larger ones are scaled down. Calls return
    `input_ids`, `attention_mask`, `mm_token_type_ids` and, with images, `pixel_values` and `image_grid_thw`.

    Chameleon: a stock `ChameleonImageProcessor` resizes the shortest edge to `image_size` (LANCZOS) and
    center-crops to `image_size` x `image_size`, so `pixel_values` is `(num_images, 3, image_size, image_size)`
    (values in about [-1, 1]); each `<image>` in the text expands to `<racm3:break>`, `image_seq_length` x
    `<image>`, `<eoss>`, and `<reserved08706>` (the sep token) is appended to every prompt unless
    `return_for_text_completion=True` (honoured from transformers 5.25; 5.17 always appends it). Calls return
    `input_ids`, `attention_mask` and, with images, `pixel_values` (`mm_token_type_ids` only with
    `return_mm_token_type_ids=True`; it then marks `<image>`, `<racm3:break>` and `<eoss>`, 66 tokens per image by
    default). The defaults match `tiny_chameleon_config_dict`: 32x32 px images and
    64 = 8x8 tokens per image. `patch_size`, `merge_size`, `min_pixels`, `max_pixels` and `temporal_patch_size`
    are ignored; `TINY_CHAMELEON_CHAT_TEMPLATE` is the chat template of the processor and its tokenizer. After
    `save_pretrained` / `AutoProcessor.from_pretrained` only the tokenizer has it (`ChameleonProcessor.__init__`
    takes no `chat_template`, so loading drops it): render prompts with
    `processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`.

    The processor's tokenizer pads on the left (what batched generation needs; saved with the processor, so
    checkpoints reload that way).

    Args:
        add_latent_tokens: add the three Vedas latent tokens to the tokenizer.
        patch_size: spatial patch size of the vision encoder (`vision_config.patch_size`).
        merge_size: spatial merge size (`vision_config.spatial_merge_size`).
        min_pixels: smallest resized image area; default above.
        max_pixels: largest resized image area; default above.
        temporal_patch_size: temporal patch size (`vision_config.temporal_patch_size`).
        backbone: one of `BACKBONES` (the processor class).
        image_size: Chameleon only: side of the square processed images in pixels (`vq_config.resolution`);
            default 32.
        image_seq_length: Chameleon only: `<image>` tokens per image, `(image_size / 2 ** (len(channel_multiplier)
            - 1)) ** 2` for the VQ-VAE; default `(image_size // 4) ** 2` (64 for 32 px; then `image_size` must be
            a multiple of 4).
        num_image_codes: Chameleon only: VQ codebook size (`IMGIMG...` tokens in the tokenizer).

    Raises:
        ValueError: on a non-positive size, `max_pixels < min_pixels`, an unknown `backbone`, `image_size` /
            `image_seq_length` given for a Qwen backbone, or a default `image_seq_length` with `image_size` not a
            multiple of 4.
    """
    processor_class = _backbone(backbone)[2]
    if backbone == "chameleon":
        image_size = 32 if image_size is None else image_size
        _check_positive_int("image_size", image_size)
        if image_seq_length is None and image_size % 4:
            raise ValueError(f"image_size={image_size!r} must be a multiple of 4 unless image_seq_length is given.")
        image_seq_length = (image_size // 4) ** 2 if image_seq_length is None else image_seq_length
        _check_positive_int("image_seq_length", image_seq_length)
        tokenizer = build_tiny_tokenizer(
            add_latent_tokens=add_latent_tokens, padding_side="left", backbone=backbone,
            num_image_codes=num_image_codes,
        )
        image_processor = ChameleonImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        processor = processor_class(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_length=image_seq_length,
            image_token=CHAMELEON_IMAGE_TOKEN,
        )
        processor.chat_template = TINY_CHAMELEON_CHAT_TEMPLATE
        return processor
    for name, value in (("image_size", image_size), ("image_seq_length", image_seq_length)):
        if value is not None:
            raise ValueError(f"{name}={value!r} is for backbone='chameleon' only, not backbone={backbone!r}.")
    _check_positive_int("patch_size", patch_size)
    _check_positive_int("merge_size", merge_size)
    _check_positive_int("temporal_patch_size", temporal_patch_size)
    sizes = {
        "size": _pixel_bounds(patch_size, merge_size, min_pixels, max_pixels),
        "patch_size": patch_size,
        "merge_size": merge_size,
        "temporal_patch_size": temporal_patch_size,
    }
    tokenizer = build_tiny_tokenizer(add_latent_tokens=add_latent_tokens, padding_side="left", backbone=backbone)
    return processor_class(
        image_processor=Qwen2VLImageProcessor(**copy.deepcopy(sizes)),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**copy.deepcopy(sizes), **_video_only_kwargs()),
        chat_template=TINY_CHAT_TEMPLATE,
    )


_BACKBONES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
    "chameleon": (ChameleonConfig, ChameleonForConditionalGeneration, ChameleonProcessor),
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


def _text_head_dim(text_config: dict, where: str = "text_config") -> int:
    """Attention head size of the language model; raises `ValueError` (naming `where`) for an inconsistent shape."""
    hidden, heads = text_config["hidden_size"], text_config["num_attention_heads"]
    kv_heads = text_config.get("num_key_value_heads") or heads
    if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise ValueError(
            f"{where} needs hidden_size ({hidden}) divisible by num_attention_heads ({heads}) into an even "
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
    if backbone == "chameleon":
        raise ValueError(f"backbone={backbone!r} has no Qwen2-VL config; use `tiny_chameleon_config_dict`.")
    defaults = {
        "text_config": _tiny_text_defaults(tokenizer, rope_theta=1000000.0),
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


def _tiny_text_defaults(tokenizer, rope_theta: float) -> dict:
    """The tiny language model both backbones share: 64 wide, 4 layers, 4 heads (2 kv), MLP 128, 2048 positions,
    default RoPE at `rope_theta`, vocabulary and bos (`<|endoftext|>`) / eos / pad ids from `tokenizer`."""
    return {
        "vocab_size": _vocab_size(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "bos_token_id": _token_id(tokenizer, PAD_TOKEN),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _chameleon_image_codes(vocab: dict[str, int]) -> list[int]:
    """Sorted VQ codes of the `IMGIMG...` tokens of `vocab` (the inverse of `chameleon_image_token`)."""
    digits = {chr(ord("A") + digit): str(digit) for digit in range(10)}
    codes = []
    for name in vocab:
        body = name[len(_CHAMELEON_IMAGE_PREFIX) : -1]
        if name.startswith(_CHAMELEON_IMAGE_PREFIX) and name.endswith("Z") and body and set(body) <= set(digits):
            codes.append(int("".join(digits[letter] for letter in body)))
    return sorted(codes)


def _chameleon_image_grid(vq_config: dict) -> int:
    """Side of the VQ token grid of one `resolution`-pixel square image: the encoder halves the image
    `len(channel_multiplier) - 1` times. Raises `ValueError` for a VQ config the encoder cannot build or that does
    not divide the image evenly."""
    base, multipliers = vq_config["base_channels"], vq_config["channel_multiplier"]
    _check_positive_int("vq_config.base_channels", base)
    if base % 32:
        raise ValueError(f"vq_config.base_channels={base!r} must be a multiple of 32 (GroupNorm groups).")
    if not multipliers:
        raise ValueError(f"vq_config.channel_multiplier must be a non-empty list, got {multipliers!r}.")
    for multiplier in multipliers:
        _check_positive_int("vq_config.channel_multiplier entry", multiplier)
    for name in ("resolution", "num_embeddings", "embed_dim", "latent_channels", "num_res_blocks"):
        _check_positive_int(f"vq_config.{name}", vq_config[name])
    resolution, factor = vq_config["resolution"], 2 ** (len(multipliers) - 1)
    if resolution % factor:
        raise ValueError(
            f"vq_config.resolution={resolution!r} must be divisible by 2 ** (len(channel_multiplier) - 1) = {factor}."
        )
    return resolution // factor


def tiny_chameleon_config_dict(tokenizer, **overrides: Any) -> dict:
    """Keyword arguments for a tiny stock `transformers.ChameleonConfig` matching `tokenizer` (built with
    `build_tiny_tokenizer(backbone="chameleon")`).

    Defaults: language model with hidden size 64, 4 layers, 4 attention heads, 2 key/value heads (head size 16),
    intermediate size 128, `max_position_embeddings` 2048, RoPE theta 10000, `swin_norm=False`, untied
    embeddings; VQ-VAE (`vq_config`) with `num_embeddings` = the tokenizer's number of `IMGIMG...` tokens,
    `embed_dim` = `latent_channels` = 16, `base_channels` 32, `channel_multiplier` [1, 1, 2] (two halvings),
    `num_res_blocks` 1, `resolution` 32, no attention in the down blocks (`attn_resolutions` []), so a 32x32 image
    becomes an 8x8 grid of 64 image tokens. `vocab_size` is `len(tokenizer)` (plus room for the three latent tokens
    when the tokenizer lacks them) rounded up to a multiple of 8; `vocabulary_map` is the tokenizer vocabulary
    (the model maps VQ codes to `IMGIMG...` ids and `<image>` placeholders through it); `image_token_id` and the
    bos (`<|endoftext|>`, as for Qwen2-VL), eos and pad ids are read from the tokenizer.

    Args:
        tokenizer: a tokenizer from `build_tiny_tokenizer(backbone="chameleon")` (or a processor holding one).
        overrides: top-level keys replace the defaults; dict values (`vq_config`, `rope_parameters`) are merged key
            by key, e.g. `vq_config={"channel_multiplier": [1, 2]}`; `vocabulary_map` is replaced whole.

    Raises:
        ValueError: when the tokenizer lacks a Chameleon special token, the text shapes are inconsistent, the VQ
            config cannot be built (`base_channels` not a multiple of 32, `resolution` not divisible by
            `2 ** (len(channel_multiplier) - 1)`), or `vq_config.num_embeddings` differs from the number of
            `IMGIMG...` tokens (codes 0..n-1) in `vocabulary_map`.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    vocab = tokenizer.get_vocab()
    defaults = {
        **_tiny_text_defaults(tokenizer, rope_theta=10000.0),
        "image_token_id": _token_id(tokenizer, CHAMELEON_IMAGE_TOKEN),
        "swin_norm": False,
        "tie_word_embeddings": False,
        "vq_config": {
            "embed_dim": 16,
            "num_embeddings": len(_chameleon_image_codes(vocab)),
            "double_latent": False,
            "latent_channels": 16,
            "resolution": 32,
            "in_channels": 3,
            "base_channels": 32,
            "channel_multiplier": [1, 1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
            "attn_type": "vanilla",
        },
    }
    for token in (CHAMELEON_SEP_TOKEN, CHAMELEON_BOI_TOKEN, CHAMELEON_EOI_TOKEN):
        _token_id(tokenizer, token)
    vocabulary_map = overrides.pop("vocabulary_map", None)
    config = _deep_merge(defaults, overrides)
    config["vocabulary_map"] = dict(vocab if vocabulary_map is None else vocabulary_map)
    _text_head_dim(config, where="the Chameleon config")
    _chameleon_image_grid(config["vq_config"])
    codes, num_embeddings = _chameleon_image_codes(config["vocabulary_map"]), config["vq_config"]["num_embeddings"]
    if codes != list(range(num_embeddings)):
        raise ValueError(
            f"vq_config.num_embeddings={num_embeddings!r} needs the IMGIMG tokens of codes 0..{num_embeddings - 1} "
            f"in vocabulary_map, which has {len(codes)} image codes; build the tokenizer with "
            f"`build_tiny_tokenizer(backbone='chameleon', num_image_codes={num_embeddings})`."
        )
    if CHAMELEON_IMAGE_TOKEN not in config["vocabulary_map"]:
        raise ValueError(f"vocabulary_map lacks the image token {CHAMELEON_IMAGE_TOKEN!r}.")
    return config


def _processor_for_config(
    config: dict, add_latent_tokens: bool, backbone: str = "qwen2_vl"
) -> Qwen2VLProcessor | ChameleonProcessor:
    """`build_tiny_processor` with the patch sizes of `config["vision_config"]` (for Chameleon: the image size,
    tokens per image and codebook size of `config["vq_config"]`)."""
    if backbone == "chameleon":
        vq_config = config["vq_config"]
        return build_tiny_processor(
            add_latent_tokens=add_latent_tokens,
            backbone=backbone,
            image_size=vq_config["resolution"],
            image_seq_length=_chameleon_image_grid(vq_config) ** 2,
            num_image_codes=vq_config["num_embeddings"],
        )
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
    (`Qwen2_5_VLForConditionalGeneration` for `backbone="qwen2_5_vl"`, `ChameleonForConditionalGeneration` for
    `backbone="chameleon"`).

    The folder holds `config.json`, `generation_config.json`, `model.safetensors` (float32), the tokenizer files,
    the processor configs and the chat template; it loads offline with e.g.
    `Qwen2VLForConditionalGeneration.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`. Weights
    come from `torch.manual_seed(seed)`, so equal arguments give equal checkpoints (the global torch RNG is
    reseeded as a side effect).

    Args:
        path: target folder (created if missing).
        seed: torch seed for the weight initialisation.
        add_latent_tokens: put the three Vedas latent tokens in the tokenizer (a stock backbone has none; the
            embeddings have room for them either way).
        backbone: one of `BACKBONES`.
        config_overrides: passed to `tiny_qwen2_vl_config_dict` (`tiny_chameleon_config_dict` for Chameleon);
            the processor follows the vision patch sizes (for Chameleon: `vq_config.resolution`, the token grid
            and `vq_config.num_embeddings`, which also sets the tokenizer's number of `IMGIMG...` tokens).

    Returns:
        `path` as a string.

    Raises:
        ValueError: for an unknown `backbone` or inconsistent overrides.
    """
    config_class, model_class, _ = _backbone(backbone)
    if backbone == "chameleon":
        vq_overrides = config_overrides.get("vq_config")
        num_image_codes = (vq_overrides if isinstance(vq_overrides, dict) else {}).get(
            "num_embeddings", CHAMELEON_NUM_IMAGE_CODES
        )
        tokenizer = build_tiny_tokenizer(
            add_latent_tokens=add_latent_tokens, backbone=backbone, num_image_codes=num_image_codes
        )
        config_kwargs = tiny_chameleon_config_dict(tokenizer, **config_overrides)
    else:
        tokenizer = build_tiny_tokenizer(add_latent_tokens=add_latent_tokens)
        config_kwargs = tiny_qwen2_vl_config_dict(tokenizer, backbone=backbone, **config_overrides)
    processor = _processor_for_config(config_kwargs, add_latent_tokens, backbone)
    torch.manual_seed(seed)
    model = model_class(config_class(**copy.deepcopy(config_kwargs)))
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
        backbone: one of `BACKBONES` (whether `convert_checkpoint` supports it is up to `vedas_hf.convert`).
        seed: torch seed for the stock weights and the new Vedas modules.
        stock_overrides: backbone sizes for `tiny_qwen2_vl_config_dict` (`tiny_chameleon_config_dict`), e.g.
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
