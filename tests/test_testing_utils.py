"""The offline tiny Qwen2-VL builders of `vedas_hf.testing`: tokenizer, chat template, processor, config,
stock checkpoint and images."""

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from vedas_hf.testing import (
    LATENT_TOKENS,
    SPECIAL_TOKENS,
    TINY_CHAT_TEMPLATE,
    build_tiny_processor,
    build_tiny_tokenizer,
    make_tiny_images,
    make_tiny_stock_checkpoint,
    tiny_qwen2_vl_config_dict,
)


SENTENCE = "What is 12 plus 7? Answer: 19.\nThe red circle (\u00fc, #42) is on the left!"


def image_prompt(processor, num_images: int, question: str) -> str:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_processor():
    return build_tiny_processor()


def test_tokenizer_encodes_and_decodes_exactly(tokenizer):
    ids = tokenizer(SENTENCE)["input_ids"]
    assert tokenizer.decode(ids) == SENTENCE
    assert len(ids) < len(SENTENCE.encode()) // 2  # trained merges, not just bytes
    assert 256 < len(tokenizer) <= 600


def test_special_tokens_are_single_consecutive_ids(tokenizer):
    vocab = tokenizer.get_vocab()
    names = SPECIAL_TOKENS + LATENT_TOKENS
    assert SPECIAL_TOKENS == (
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
        "<|image_pad|>", "<|video_pad|>",
    )
    assert LATENT_TOKENS == ("<|start-latent|>", "<|latent|>", "<|end-latent|>")
    first = vocab[names[0]]
    assert [vocab[name] for name in names] == list(range(first, first + len(names)))
    assert first + len(names) == len(tokenizer)
    for name in names:
        assert tokenizer(name)["input_ids"] == [vocab[name]]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("add_latent", [True, False])
def test_latent_tokens_follow_the_flag(add_latent):
    tokenizer = build_tiny_tokenizer(add_latent_tokens=add_latent)
    vocab = tokenizer.get_vocab()
    assert all((name in vocab) == add_latent for name in LATENT_TOKENS)
    assert len(tokenizer) == len(build_tiny_tokenizer(add_latent_tokens=not add_latent)) + (3 if add_latent else -3)
    assert all(name in vocab for name in SPECIAL_TOKENS)


def test_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is type(tokenizer)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded(SENTENCE)["input_ids"] == tokenizer(SENTENCE)["input_ids"]
    assert loaded.all_special_tokens == tokenizer.all_special_tokens
    assert loaded.padding_side == "right"
    assert loaded.chat_template == TINY_CHAT_TEMPLATE


def test_chat_template_renders_qwen2_vl_turns(tiny_processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "Answer: red"},
    ]
    assert tiny_processor.apply_chat_template(messages) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
        "<|im_start|>assistant\nAnswer: red<|im_end|>\n"
    )
    assert tiny_processor.apply_chat_template(messages[:1], add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_processor_batch_of_two_image_sizes_is_left_padded(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    images = make_tiny_images(2, sizes=((32, 32), (48, 32)))
    prompts = [image_prompt(tiny_processor, 1, "What?"), image_prompt(tiny_processor, 1, "What colour is the blob?")]
    batch = tiny_processor(text=prompts, images=images, return_tensors="pt", padding=True)

    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 12]]  # (t, h, w) in 4x4 patches
    assert batch["pixel_values"].shape == (64 + 96, 3 * 2 * 4 * 4)
    per_image = (batch["image_grid_thw"].prod(-1) // 2**2).tolist()
    assert per_image == [16, 24]
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == per_image
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == image_id).long())

    mask = batch["attention_mask"]
    assert tokenizer.padding_side == "left"
    assert mask[:, -1].tolist() == [1, 1] and mask[1].all()
    pad = int((mask[0] == 0).sum())
    assert pad > 0 and mask[0, :pad].sum() == 0 and mask[0, pad:].all()
    assert (batch["input_ids"][0, :pad] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize(
    "size, merged_grid", [((8, 8), [2, 2]), ((64, 64), [8, 8]), ((256, 256), [8, 8]), ((256, 128), [5, 11])]
)
def test_processor_pixel_bounds_keep_grids_small(tiny_processor, size, merged_grid):
    batch = tiny_processor(
        text=[image_prompt(tiny_processor, 1, "?")], images=make_tiny_images(1, sizes=(size,)), return_tensors="pt"
    )
    t, h, w = batch["image_grid_thw"][0].tolist()
    assert [t, h // 2, w // 2] == [1] + merged_grid
    assert (batch["input_ids"] == tiny_processor.image_token_id).sum() == h * w // 4


def test_processor_expands_video_tokens(tiny_processor):
    video = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    content = [{"type": "video"}, {"type": "text", "text": "What moves?"}]
    prompt = tiny_processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    batch = tiny_processor(text=[prompt], videos=[video.numpy()], return_tensors="pt")
    assert batch["video_grid_thw"].tolist() == [[2, 8, 8]]  # 4 frames / temporal patch 2, 32 / patch 4
    assert (batch["input_ids"] == tiny_processor.video_token_id).sum() == 2 * 8 * 8 // 4
    assert batch["pixel_values_videos"].shape == (2 * 8 * 8, 3 * 2 * 4 * 4)


def test_config_dict_sizes_and_ids_come_from_the_tokenizer(tokenizer):
    config_dict = tiny_qwen2_vl_config_dict(tokenizer)
    vocab = tokenizer.get_vocab()
    assert config_dict["image_token_id"] == vocab["<|image_pad|>"]
    assert config_dict["video_token_id"] == vocab["<|video_pad|>"]
    assert config_dict["vision_start_token_id"] == vocab["<|vision_start|>"]
    assert config_dict["vision_end_token_id"] == vocab["<|vision_end|>"]
    text = config_dict["text_config"]
    assert (text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) == (
        vocab["<|endoftext|>"], vocab["<|im_end|>"], vocab["<|endoftext|>"],
    )
    assert text["vocab_size"] % 8 == 0 and 0 <= text["vocab_size"] - len(tokenizer) < 8
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (64, 4, 4)
    assert (text["num_key_value_heads"], text["intermediate_size"]) == (2, 128)
    assert text["rope_parameters"]["mrope_section"] == [2, 3, 3]
    assert config_dict["vision_config"]["hidden_size"] == 64

    config = Qwen2VLConfig(**config_dict)
    assert config.image_token_id == vocab["<|image_pad|>"]
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    assert config.vision_config.patch_size == 4 and config.vision_config.spatial_merge_size == 2


def test_config_dict_leaves_room_for_latent_tokens_and_merges_overrides():
    tokenizer = build_tiny_tokenizer(add_latent_tokens=False)
    config_dict = tiny_qwen2_vl_config_dict(
        tokenizer, text_config={"num_hidden_layers": 2, "hidden_size": 128}, image_token_id=5
    )
    text = config_dict["text_config"]
    assert text["vocab_size"] >= len(tokenizer) + len(LATENT_TOKENS)
    assert (text["num_hidden_layers"], text["hidden_size"], text["num_attention_heads"]) == (2, 128, 4)
    assert text["rope_parameters"]["mrope_section"] == [4, 6, 6]  # head_dim 32
    assert config_dict["vision_config"]["hidden_size"] == 128
    assert config_dict["vision_config"]["depth"] == 2
    assert config_dict["image_token_id"] == 5


@pytest.mark.parametrize(
    "call",
    [
        lambda: build_tiny_processor(patch_size=0),
        lambda: build_tiny_processor(merge_size=-1),
        lambda: build_tiny_processor(min_pixels=1024, max_pixels=512),
        lambda: build_tiny_tokenizer(padding_side="middle"),
        lambda: tiny_qwen2_vl_config_dict(build_tiny_tokenizer(), text_config={"hidden_size": 60}),
        lambda: make_tiny_images(-1),
        lambda: make_tiny_images(1, sizes=((0, 8),)),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_stock_model_runs_on_processor_output(tiny_processor, attn_implementation):
    config_dict = tiny_qwen2_vl_config_dict(tiny_processor.tokenizer, text_config={"num_hidden_layers": 2})
    config = Qwen2VLConfig(**config_dict, attn_implementation=attn_implementation)
    model = Qwen2VLForConditionalGeneration(config).eval()
    assert model.config.text_config._attn_implementation == attn_implementation
    prompts = [image_prompt(tiny_processor, 1, "What?"), image_prompt(tiny_processor, 2, "Which is red?")]
    batch = tiny_processor(text=prompts, images=make_tiny_images(3), return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_stock_checkpoint_reloads_with_identical_logits(tmp_path):
    path = make_tiny_stock_checkpoint(tmp_path / "stock", seed=3)
    torch.manual_seed(3)
    reference = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**tiny_qwen2_vl_config_dict(build_tiny_tokenizer(False))))
    model = Qwen2VLForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)

    assert processor.tokenizer.get_vocab() == build_tiny_tokenizer(add_latent_tokens=False).get_vocab()
    assert processor.tokenizer.padding_side == "left"
    assert processor.chat_template == TINY_CHAT_TEMPLATE
    assert model.config.image_token_id == processor.image_token_id
    assert model.dtype == torch.float32
    prompts = [image_prompt(processor, 1, "What?"), image_prompt(processor, 1, "What is 3 plus 4?")]
    batch = processor(text=prompts, images=make_tiny_images(2), return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference.eval()(**batch).logits)


def test_stock_checkpoint_seed_changes_weights(tmp_path):
    first = Qwen2VLForConditionalGeneration.from_pretrained(make_tiny_stock_checkpoint(tmp_path / "a", seed=0))
    second = Qwen2VLForConditionalGeneration.from_pretrained(make_tiny_stock_checkpoint(tmp_path / "b", seed=1))
    again = Qwen2VLForConditionalGeneration.from_pretrained(make_tiny_stock_checkpoint(tmp_path / "c", seed=0))
    weight = "model.language_model.embed_tokens.weight"
    assert not torch.equal(first.state_dict()[weight], second.state_dict()[weight])
    assert all(torch.equal(value, again.state_dict()[key]) for key, value in first.state_dict().items())


def test_tiny_images_are_deterministic_rgb_of_the_given_sizes():
    images = make_tiny_images(3, sizes=((32, 32), (48, 32)), seed=7)
    assert [image.size for image in images] == [(32, 32), (48, 32), (32, 32)]
    assert all(image.mode == "RGB" for image in images)
    assert [image.tobytes() for image in images] == [image.tobytes() for image in make_tiny_images(3, seed=7)]
    assert images[0].tobytes() != make_tiny_images(1, seed=8)[0].tobytes()
    assert len(images[0].getcolors(32 * 32)) >= 2  # background plus at least one shape
    assert make_tiny_images(0) == []
