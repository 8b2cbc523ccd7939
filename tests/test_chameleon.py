"""Chameleon-only checks, each against an independent computation from the stock model's public pieces: the latent
loop over 1-D positions (Coconut over the stock model), the reconstruction target (the crop re-tokenised by the
VQ-VAE), conversion of a tokenizer that fills the vocabulary, and the refused Chameleon-30B layer order."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, ChameleonForConditionalGeneration
from transformers.cache_utils import DynamicCache

from conftest import make_batch
from vedas_hf import VedasChameleonConfig, VedasChameleonForConditionalGeneration
from vedas_hf.convert import convert_checkpoint
from vedas_hf.modeling.modeling_vedas import CACHE_KWARG
from vedas_hf.testing import build_tiny_processor, make_tiny_checkpoint, make_tiny_images, make_tiny_stock_checkpoint


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(backbone="chameleon")


@pytest.fixture(scope="module")
def chameleon_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("chameleon"), backbone="chameleon", seed=0, replay_top_k=3,
                                router_top_k=4)


@pytest.fixture(scope="module")
def images():
    return make_tiny_images(2, sizes=((32, 32), (48, 40)), seed=0)


def test_latent_generate_without_replay_is_a_coconut_loop_over_the_stock_model(chameleon_dir, processor, images):
    """Replay off and zero gates: latent `generate` is Coconut over stock Chameleon: image codes from its VQ-VAE in
    the placeholders, the last hidden state fed back T times at the next 1-D positions, then `<|end-latent|>` and
    greedy decoding with the stock model's own forward (image codes masked) and cache."""
    model = AutoModelForImageTextToText.from_pretrained(chameleon_dir, replay_mode="none").eval()
    config = model.config
    stock = ChameleonForConditionalGeneration(config)
    stock.load_state_dict(model.state_dict(), strict=False)
    stock.eval()
    batch = make_batch(processor, ["Which shape is on the left?"], [[images[0]]])
    steps, new_tokens = 3, 4
    with torch.no_grad():
        ids = torch.cat([batch["input_ids"], torch.tensor([[config.start_latent_token_id]])], dim=1)
        codes = stock.model.get_image_tokens(batch["pixel_values"])
        ids = ids.masked_scatter(ids == config.image_token_id, codes.to(ids.dtype))
        cache = DynamicCache(config=config)

        def step(embeds, first_position):
            positions = torch.arange(embeds.shape[1]).unsqueeze(0) + first_position
            out = stock.model(inputs_embeds=embeds, position_ids=positions, use_cache=True, **{CACHE_KWARG: cache})
            return out.last_hidden_state

        hidden = step(stock.model.embed_tokens(ids), 0)
        position = ids.shape[1]
        for _ in range(steps):
            hidden = step(hidden[:, -1:], position)
            position += 1
        token, tokens = torch.tensor([[config.end_latent_token_id]]), []
        for _ in range(new_tokens):
            hidden = step(stock.model.embed_tokens(token), position)
            position += 1
            logits = stock.lm_head(hidden[:, -1])
            logits[:, stock.model.vocabulary_mapping.image_tokens] = torch.finfo(logits.dtype).min
            token = logits.argmax(-1, keepdim=True)
            tokens.append(int(token))
    out = model.generate(**batch, num_latent_steps=steps, max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=processor.tokenizer.pad_token_id)
    assert out[0, batch["input_ids"].shape[1]:].tolist() == tokens


def _reference_crop_target(model, pixel_values, image, window, out_size):
    """Eq. 8 by hand: slice the window (cells of `2 ** (levels - 1)` pixels), resize, encode with the VQ-VAE, map
    each code to its `IMGIMG...` vocabulary id by name and average the embeddings of those ids."""
    cell = 2 ** (len(model.config.vq_config.channel_multiplier) - 1)
    top, left, size = (window[k] * cell for k in ("row", "col", "size"))
    crop = pixel_values[image : image + 1, :, top : top + size, left : left + size]
    crop = F.interpolate(crop, size=out_size, mode="bilinear", align_corners=False)
    codes = model.model.vqmodel.encode(crop).image_tokens.flatten().tolist()
    vocabulary = model.config.vocabulary_map
    letters = {str(d): chr(ord("A") + d) for d in range(10)}
    ids = [vocabulary["IMGIMG" + "".join(letters[c] for c in str(code)) + "Z"] for code in codes]
    return model.model.embed_tokens.weight[ids].mean(dim=0)


@pytest.mark.parametrize("crop_size", [None, 16])
def test_reconstruction_target_is_the_vq_tokenised_crop(chameleon_dir, processor, images, crop_size):
    model = VedasChameleonForConditionalGeneration.from_pretrained(chameleon_dir, recon_crop_size=crop_size).eval()
    batch = make_batch(processor, ["a", "b"], [[images[0]], [images[1]]])
    pixels = batch["pixel_values"]
    side = pixels.shape[-1] // model.config.image_token_pixels
    windows = [{"image": 0, "row": 0, "col": 0, "size": side}, {"image": 1, "row": 2, "col": 3, "size": 3}]
    with torch.no_grad():
        targets = model._encode_crops(windows, pixels, None)
        out_size = tuple(pixels.shape[-2:]) if crop_size is None else (crop_size, crop_size)
        for row, window in enumerate(windows):
            expected = _reference_crop_target(model, pixels, window["image"], window, out_size)
            torch.testing.assert_close(targets[row], expected)
        if crop_size is None:  # the whole image at its own size: the mean embedding of the prompt's own codes
            own = model.model.embed_tokens(model.model.get_image_tokens(pixels[:1]))[0].mean(dim=0)
            torch.testing.assert_close(targets[0], own)


def test_training_step_with_cheaper_crops_reaches_token_sr_not_the_embeddings(chameleon_dir, processor, images):
    """`recon_crop_size` sets the VQ-VAE's input for the crops; the loss alone trains TokenSR and leaves the
    image-code embeddings (the visual features) without gradient."""
    from test_modeling import latent_sequence

    model = VedasChameleonForConditionalGeneration.from_pretrained(chameleon_dir, recon_crop_size=16).train()
    seen = []
    stock = model.model.get_image_tokens
    model.model.get_image_tokens = lambda pixels: seen.append(tuple(pixels.shape)) or stock(pixels)
    batch = make_batch(processor, ["Shape?", "Colour?"], [[images[0]], [images[1]]])
    seq = latent_sequence(processor, batch, model.config, 2, [40, 41])
    out = model(**seq)
    assert seen[0] == tuple(batch["pixel_values"].shape) and seen[1:] == [(2, 3, 16, 16)] * 2
    assert torch.isfinite(out.recon_loss) and out.recon_loss > 0
    out.recon_loss.backward()
    assert model.token_sr.net.weight.grad.abs().sum() > 0
    embeddings = model.model.embed_tokens.weight.grad
    assert embeddings is None or not embeddings[model.model.vocabulary_mapping.image_tokens].any()


def test_conversion_grows_a_vocabulary_the_tokenizer_fills(tmp_path, processor, images):
    """Chameleon-7B's tokenizer fills its 65536 rows: conversion appends the latent tokens as new rows (zero LM-head
    weights) and the logits over the stock vocabulary stay the stock model's."""
    tokenizer_size = len(build_tiny_processor(backbone="chameleon", add_latent_tokens=False).tokenizer)
    stock_dir = make_tiny_stock_checkpoint(tmp_path / "stock", backbone="chameleon", vocab_size=tokenizer_size)
    dst = convert_checkpoint(stock_dir, tmp_path / "vedas", replay_top_k=3, router_top_k=4)
    stock = ChameleonForConditionalGeneration.from_pretrained(stock_dir).eval()
    model = VedasChameleonForConditionalGeneration.from_pretrained(dst).eval()
    config = model.config
    assert config.vocab_size == tokenizer_size + 3
    assert sorted([config.start_latent_token_id, config.latent_token_id, config.end_latent_token_id]) == list(
        range(tokenizer_size, tokenizer_size + 3))
    assert not model.lm_head.weight[tokenizer_size:].any()
    batch = make_batch(processor, ["What?"], [[images[0]]])
    with torch.no_grad():
        expected = stock(**batch).logits
        got = model(**batch).logits
    torch.testing.assert_close(got[..., :tokenizer_size], expected)
    steps = model.generate(**batch, num_latent_steps=2, max_new_tokens=2, do_sample=False)
    assert steps.shape == (1, batch["input_ids"].shape[1] + 2)


def test_swin_norm_layer_order_is_refused():
    with pytest.raises(ValueError, match="swin_norm=True"):
        VedasChameleonConfig(swin_norm=True, vocabulary_map={"<image>": 5})


def test_qwen_processor_outputs_are_clear_errors(chameleon_dir, processor, images):
    model = VedasChameleonForConditionalGeneration.from_pretrained(chameleon_dir).eval()
    batch = make_batch(processor, ["What?"], [[images[0]]])
    with pytest.raises(ValueError, match="image_grid_thw was given to a Chameleon model"):
        model.generate(**batch, image_grid_thw=torch.tensor([[1, 8, 8]]), num_latent_steps=1, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"pixel_values holds 30x30 images; the VQ-VAE needs sides that are multiples"):
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"][..., :30, :30], num_latent_steps=1, max_new_tokens=1)
    with pytest.raises(ValueError, match="image tokens but pixel_values holds 2 images"):
        model.generate(**{**batch, "pixel_values": batch["pixel_values"].repeat(2, 1, 1, 1)}, num_latent_steps=1,
                       max_new_tokens=1)
