"""Foundation: conversion parity, Hub loading, config round trip, router semantics, bad input."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from conftest import qwen_only, make_batch
from vedas_hf.convert import convert_checkpoint
from vedas_hf.modeling.configuration_vedas import cosine_alpha, resolve_router_layers
from vedas_hf.modeling.modeling_vedas import CACHE_KWARG, VedasPass, VedasRouterCache, select_top_alpha


def randomize_gates(model, scale=0.5, seed=1):
    """Give every router gate (zero after conversion) random values so routing changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if layer.router is not None:
                layer.router.gate.copy_(torch.randn(layer.router.gate.shape, generator=generator) * scale)


def latent_sequence(processor, batch, config, num_latents, tail_ids):
    """Append `<|start-latent|> <|latent|>*k <|end-latent|> tail` to a left-padded prompt batch."""
    rows = batch["input_ids"].shape[0]
    suffix = [config.start_latent_token_id] + [config.latent_token_id] * num_latents + [config.end_latent_token_id]
    suffix = torch.tensor([suffix + list(tail_ids)] * rows)
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], suffix], dim=1)
    out["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(suffix)], dim=1)
    if "mm_token_type_ids" in batch:  # Qwen processors; Chameleon's returns none
        out["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(suffix)], dim=1)
    return out


@pytest.fixture(scope="module")
def converted(stock_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("converted")
    convert_checkpoint(stock_dir, dst, overwrite=True, replay_top_k=3, router_top_k=4)
    return dst


# ---- conversion parity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_converted_checkpoint_matches_stock_logits_and_greedy_tokens(stock_dir, converted, processor, images, attn, stock_class, vedas_class):
    stock = stock_class.from_pretrained(stock_dir, attn_implementation=attn).eval()
    model = vedas_class.from_pretrained(converted, attn_implementation=attn).eval()
    batch = make_batch(processor, ["What digit is this?", "Colour of the shape?"], [[images[0]], [images[1]]])
    with torch.no_grad():
        expected = stock(**batch).logits
        got = model(**batch).logits
    assert (expected - got).abs().max().item() < 1e-5
    stock_tokens = stock.generate(**batch, max_new_tokens=6, do_sample=False)
    vedas_tokens = model.generate(**batch, max_new_tokens=6, do_sample=False, num_latent_steps=0)
    assert torch.equal(stock_tokens, vedas_tokens)


def test_plain_decoding_expands_images_like_the_stock_model(stock_dir, converted, processor, images, stock_class,
                                                            vedas_class):
    """`num_latent_steps=0` with several rows per prompt (beams, returned sequences) or a chunked prefill: the images
    must be expanded with their rows as the stock model does (transformers >= 5.24 encodes them before the prefill
    only for a forward that takes `mm_encoder_outputs`; otherwise it copies `pixel_values` row by row)."""
    stock = stock_class.from_pretrained(stock_dir).eval()
    model = vedas_class.from_pretrained(converted).eval()
    batch = make_batch(processor, ["What digit is this?", "Colour of the shape?"], [[images[0]], [images[1]]])
    settings = [
        dict(num_beams=2, num_return_sequences=2, return_dict_in_generate=True, output_scores=True),
        dict(do_sample=True, top_k=1, num_return_sequences=3),
    ]
    if hasattr(stock, "_supports_mm_encoder_outputs"):  # images encoded before the prefill: chunking works in stock
        settings.append(dict(prefill_chunk_size=8))
    for setting in settings:
        expected = stock.generate(**batch, max_new_tokens=6, **setting)
        got = model.generate(**batch, max_new_tokens=6, num_latent_steps=0, **setting)
        if isinstance(expected, torch.Tensor):
            assert torch.equal(expected, got), setting
        else:
            assert torch.equal(expected.sequences, got.sequences), setting
            torch.testing.assert_close(expected.sequences_scores, got.sequences_scores)
    greedy = stock.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=3,
                                      num_latent_steps=0), greedy.repeat_interleave(3, dim=0))


def test_plain_decoding_continues_a_cache_holding_the_images(stock_dir, converted, processor, images, stock_class,
                                                             vedas_class):
    """Multi-turn at `num_latent_steps=0`: the first turn's cache already holds the image, so the follow-up passes
    the whole conversation's ids and the cache without `pixel_values`, as with the stock model."""
    stock = stock_class.from_pretrained(stock_dir).eval()
    model = vedas_class.from_pretrained(converted).eval()
    batch = make_batch(processor, ["What digit is this?"], [[images[0]]])
    outputs = {}
    for name, net, extra in (("stock", stock, {}), ("vedas", model, {"num_latent_steps": 0})):
        first = net.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, **extra)
        cache = first.get("cache", first.get("past_key_values"))  # the output field's name follows the argument's
        follow_up = torch.cat([first.sequences, torch.tensor([[5, 6, 7]])], dim=1)
        outputs[name] = net.generate(
            input_ids=follow_up, attention_mask=torch.ones_like(follow_up), max_new_tokens=4, do_sample=False,
            **{CACHE_KWARG: cache}, **extra,
        )
    assert torch.equal(outputs["stock"], outputs["vedas"])

def test_conversion_loads_every_stock_weight_and_initialises_new_modules(stock_dir, converted, stock_class, vedas_class):
    stock = stock_class.from_pretrained(stock_dir)
    model = vedas_class.from_pretrained(converted)
    ours = model.state_dict()
    config = model.config
    latent_rows = [config.latent_token_id, config.start_latent_token_id, config.end_latent_token_id]
    other_rows = [i for i in range(config.get_text_config().vocab_size) if i not in latent_rows]
    for name, tensor in stock.state_dict().items():
        if name.endswith("embed_tokens.weight"):  # latent rows are re-initialised
            assert torch.equal(ours[name][other_rows], tensor[other_rows])
            continue
        assert torch.equal(ours[name], tensor), name
    gates = [layer.router.gate for layer in model.model.language_model.layers if layer.router is not None]
    assert gates and all(torch.count_nonzero(g) == 0 for g in gates)
    scores = [layer.router.score.weight for layer in model.model.language_model.layers if layer.router is not None]
    assert all(torch.isfinite(s).all() and s.std() > 0 for s in scores)
    assert torch.isfinite(model.token_sr.net.weight).all() and model.token_sr.net.weight.std() > 0


def test_conversion_adds_latent_tokens_initialised_from_an_existing_row(stock_dir, converted, vedas_class, config_class):
    processor = AutoProcessor.from_pretrained(converted)
    config = config_class.from_pretrained(converted)
    vocab = processor.tokenizer.get_vocab()
    assert vocab["<|latent|>"] == config.latent_token_id
    assert vocab["<|start-latent|>"] == config.start_latent_token_id
    assert vocab["<|end-latent|>"] == config.end_latent_token_id
    assert processor.tokenizer.tokenize("<|latent|>") == ["<|latent|>"]
    model = vedas_class.from_pretrained(converted)
    embed = model.get_input_embeddings().weight
    eos = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.eos_token)
    for token_id in (config.latent_token_id, config.start_latent_token_id, config.end_latent_token_id):
        assert torch.equal(embed[token_id], embed[eos])


def test_convert_cli_refuses_non_empty_target(stock_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="not empty"):
        convert_checkpoint(stock_dir, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_convert_rejects_missing_weights_and_unknown_backbone(stock_dir, tmp_path):
    empty = tmp_path / "src"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match="safetensors"):
        convert_checkpoint(empty, tmp_path / "dst")
    other = tmp_path / "other"
    other.mkdir()
    for name in os.listdir(stock_dir):
        os.symlink(os.path.join(stock_dir, name), other / name)
    (other / "config.json").unlink()
    config = json.load(open(os.path.join(stock_dir, "config.json")))
    config["model_type"] = "llava"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type='llava'"):
        convert_checkpoint(other, tmp_path / "dst2")


# ---- Hub loading -------------------------------------------------------------------------------------------------


def test_save_pretrained_writes_auto_map_and_code(vedas_dir, vedas_class, config_class):
    config = json.load(open(os.path.join(vedas_dir, "config.json")))
    assert config["model_type"] == config_class.model_type
    assert config["auto_map"]["AutoConfig"] == f"configuration_vedas.{config_class.__name__}"
    assert config["auto_map"]["AutoModelForImageTextToText"] == f"modeling_vedas.{vedas_class.__name__}"
    assert config["auto_map"]["AutoModel"] == f"modeling_vedas.{vedas_class.vedas_model_class.__name__}"
    assert os.path.isfile(os.path.join(vedas_dir, "modeling_vedas.py"))
    assert os.path.isfile(os.path.join(vedas_dir, "configuration_vedas.py"))
    assert not [f for f in os.listdir(vedas_dir) if f.endswith((".bin", ".pt", ".pkl"))]


def test_generation_config_step_count_survives_save_and_reload(vedas_dir, vedas_class, processor, images, tmp_path):
    """`model.generation_config.num_latent_steps` outranks `config.num_latent_steps` in `generate`; a save must keep
    it (the generation config of a loaded checkpoint is marked as derived from the model config, and transformers
    drops unknown fields of such a config when it reloads it)."""
    model = vedas_class.from_pretrained(vedas_dir).eval()
    assert model.config.num_latent_steps != 1
    model.generation_config.num_latent_steps = 1
    model.save_pretrained(tmp_path)
    reloaded = vedas_class.from_pretrained(tmp_path).eval()
    assert reloaded.generation_config.num_latent_steps == 1
    batch = make_batch(processor, ["What digit is this?"], [[images[0]]])
    out = reloaded.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert len(out.latent_trace) == 1


def test_fresh_process_remote_code_load_without_vedas_hf(vedas_dir, vedas_class, config_class, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["vedas_hf"] = None  # the package is not importable here
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
        path = {str(vedas_dir)!r}
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        assert type(config).__name__ == {config_class.__name__!r}, type(config)
        assert "vedas_hf" not in type(config).__module__, type(config).__module__
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
        assert type(model).__name__ == {vedas_class.__name__!r}
        base = AutoModel.from_pretrained(path, trust_remote_code=True)
        assert type(base).__name__ == {vedas_class.vedas_model_class.__name__!r}
        ids = torch.tensor([[config.get_text_config().bos_token_id or 1, 5, 6, 7]])
        logits = model(input_ids=ids).logits
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, num_latent_steps=2)
        print("OK", tuple(logits.shape), tuple(out.shape))
        """
    )
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK (1, 4," in result.stdout and ", 7)" in result.stdout


def test_every_config_field_round_trips(tmp_path, config_class, small_config):
    fields = dict(
        latent_token_id=11, start_latent_token_id=12, end_latent_token_id=13, num_latent_steps=3,
        replay_mode="soft_mix", replay_top_k=7, router_layers=[0, 2], router_top_k=5, router_schedule="cosine",
        router_alpha_start=40, router_alpha_end=8, router_depth=2, router_positions="rearrange", recon_window=2,
        recon_crop_size=112, token_sr="mlp", recon_loss_weight=0.2,  # 112: a multiple of every backbone's cell
    )
    config = small_config(num_hidden_layers=3, **fields)
    config.save_pretrained(tmp_path)
    loaded = config_class.from_pretrained(tmp_path)
    for name, value in fields.items():
        assert getattr(loaded, name) == value, name


# ---- router semantics --------------------------------------------------------------------------------------------


def test_cosine_schedule_values_follow_eq15(small_config):
    values = [cosine_alpha(layer, 4, 64, 16) for layer in range(4)]
    assert values == [64, 57, 40, 23]
    config = small_config(router_schedule="cosine")
    assert [config.router_alpha(layer) for layer in range(4)] == values
    fixed = small_config(router_top_k=9)
    assert [fixed.router_alpha(layer) for layer in range(4)] == [9, 9, 9, 9]


def test_router_layer_specs():
    assert resolve_router_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_router_layers("odd", 5) == [1, 3]
    assert resolve_router_layers("even", 5) == [0, 2, 4]
    assert resolve_router_layers("none", 4) == []
    assert resolve_router_layers([3, 1, 1], 4) == [1, 3]


def test_top_alpha_never_selects_padding():
    scores = torch.tensor([[9.0, 8.0, 1.0, 2.0, 3.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    eligible = torch.tensor([[False, False, True, True, True], [True, True, False, False, False]])
    index, valid = select_top_alpha(scores, eligible, [(0, 5)], alpha=3)
    assert index[0].tolist() == [2, 3, 4] and valid[0].all()
    assert index[1][valid[1]].tolist() == [0, 1] and valid[1].sum() == 2
    index, valid = select_top_alpha(scores, eligible, [(0, 2), (2, 5)], alpha=1)
    assert index[0][valid[0]].tolist() == [4] and index[1][valid[1]].tolist() == [0]


def test_gate_at_zero_equals_model_without_routers(vedas_dir, processor, images, vedas_class):
    routed = vedas_class.from_pretrained(vedas_dir).eval()
    plain = vedas_class.from_pretrained(vedas_dir, router_layers="none").eval()
    config = routed.config
    batch = make_batch(processor, ["Is it round?", "How many?"], [[images[0]], [images[2]]])
    seq = latent_sequence(processor, batch, config, 2, [40, 41, 42])
    with torch.no_grad():
        a = routed(**seq).logits
        b = plain(**seq).logits
    assert (a - b).abs().max().item() < 1e-5
    randomize_gates(routed)
    with torch.no_grad():
        c = routed(**seq).logits
    assert (a - c).abs().max().item() > 1e-3


def test_nonzero_gate_changes_only_selected_tokens(vedas_dir, vedas_class):
    model = vedas_class.from_pretrained(vedas_dir).eval()
    randomize_gates(model)
    layer = next(l for l in model.model.language_model.layers if l.router is not None)
    text = model.model.language_model
    hidden = torch.randn(2, 9, model.config.get_text_config().hidden_size)
    eligible = torch.ones(2, 9, dtype=torch.bool)
    eligible[1, :3] = False  # left padding
    planes = model.vedas_position_planes  # 3 (M-RoPE) or 1 (Chameleon: positions (batch, seq))
    positions = torch.arange(9).view(1, 1, -1).expand(planes, 2, -1)
    position_embeddings = text.rotary_emb(hidden, positions if planes > 1 else positions[0])
    vedas_pass = VedasPass(
        key_mask=eligible, eligible=eligible, chunks=[(0, 9)], chunk_index=0, router_cache=VedasRouterCache(),
        config=model.config, rotary_emb=text.rotary_emb, position_planes=planes,
    )
    with torch.no_grad():
        out = layer._route(hidden, position_embeddings, vedas_pass)
        index, valid = select_top_alpha(layer.router(hidden), eligible, [(0, 9)], model.config.router_alpha(layer.layer_idx))
    changed = (out - hidden).abs().amax(-1) > 0
    selected = torch.zeros_like(changed).scatter(1, index, valid)
    assert torch.equal(changed, selected)
    assert selected.sum(1).tolist() == [model.config.router_alpha(layer.layer_idx)] * 2
    assert not changed[1, :3].any()


def test_router_cache_concatenates_chunks_in_order_and_replaces_a_rerun_chunk():
    cache = VedasRouterCache()

    def chunk(value, n):  # keys/values (batch 1, 1 kv head, n tokens, head dim 2), valid (1, n)
        return torch.full((1, 1, n, 2), float(value)), torch.full((1, 1, n, 2), -float(value)), torch.ones(1, n).bool()

    assert cache.past(3, 0, 0) is None
    keys, values, valid = cache.extend(3, 0, 0, *chunk(1, 2))
    assert keys.shape == (1, 1, 2, 2) and valid.shape == (1, 2)
    keys, values, valid = cache.extend(3, 0, 1, *chunk(2, 3))
    assert keys[0, 0, :, 0].tolist() == [1, 1, 2, 2, 2] and values[0, 0, :, 0].tolist() == [-1, -1, -2, -2, -2]
    assert cache.past(3, 0, 1)[0][0, 0, :, 0].tolist() == [1, 1]  # only the chunks before 1
    assert cache.past(3, 1, 2) is None and cache.past(4, 0, 2) is None  # other depth / layer
    keys, _, _ = cache.extend(3, 0, 1, *chunk(5, 1))  # chunk 1 again: replaced, not appended
    assert keys[0, 0, :, 0].tolist() == [1, 1, 5]
    assert cache.past(3, 0, 2)[0][0, 0, :, 0].tolist() == [1, 1, 5]


def test_tokens_after_the_prompt_never_change_earlier_outputs(vedas_dir, processor, images, vedas_class):
    model = vedas_class.from_pretrained(vedas_dir).eval()
    randomize_gates(model)
    config = model.config
    batch = make_batch(processor, ["Which is larger?"], [[images[1]]])
    tail = [40, 41, 42, 43, 44]
    seq = latent_sequence(processor, batch, config, 3, tail)
    with torch.no_grad():
        base = model(**seq).logits
    length = seq["input_ids"].shape[1]
    for j in range(length - len(tail) - 1, length):  # the end marker and every tail token
        perturbed = dict(seq)
        perturbed["input_ids"] = seq["input_ids"].clone()
        perturbed["input_ids"][0, j] = 50 + j % 7
        with torch.no_grad():
            logits = model(**perturbed).logits
        assert torch.equal(logits[:, :j], base[:, :j]), j
        assert (logits[:, j] - base[:, j]).abs().max() > 0, j


# ---- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"router_layers": "middle"}, "router_layers='middle'"),
        ({"router_layers": [0, 9]}, r"\[9\]"),
        ({"router_top_k": 0}, "router_top_k=0"),
        ({"replay_top_k": -1}, "replay_top_k=-1"),
        ({"router_depth": 0}, "router_depth=0"),
        ({"replay_mode": "all"}, "replay_mode='all'"),
        ({"replay_positions": "grid"}, "replay_positions='grid'"),
        ({"replay_mode": "soft_mix", "replay_positions": "image"}, "replay_positions='image' needs one position"),
        ({"recon_loss_weight": -1.0}, "recon_loss_weight"),
        ({"recon_crop_size": 100}, r"recon_crop_size=100 .* = (28|16) pixels \(nearest: (112|96)\)"),
        ({"recon_crop_size": 0}, "recon_crop_size=0"),
        ({"recon_crop_size": "448"}, "recon_crop_size='448'"),
        ({"latent_token_id": 5, "end_latent_token_id": 5}, "end_latent_token_id=5"),
        ({"latent_token_id": 10_000}, "latent_token_id=10000"),
    ],
)
def test_config_rejects_bad_fields(fields, message, small_config):
    with pytest.raises(ValueError, match=message):
        small_config(image_token_id=90, **fields)


@pytest.mark.parametrize("fields, message", [({"router_positions": "rearange"}, "router_positions='rearange'"),
                                             ({"replay_mode": "soft_mix", "replay_positions": "image"}, "soft_mix")])
def test_from_pretrained_keyword_arguments_are_checked(vedas_dir, vedas_class, fields, message):
    """transformers sets `from_pretrained`'s config keyword arguments after the config's own checks; the model's
    `__init__` checks them (a typo must not silently fall back to a default)."""
    with pytest.raises(ValueError, match=message):
        vedas_class.from_pretrained(vedas_dir, **fields)
    with pytest.raises(ValueError, match=message):
        AutoModelForImageTextToText.from_pretrained(vedas_dir, **fields)


def test_save_pretrained_checks_a_config_changed_after_construction(vedas_dir, tmp_path):
    config = AutoConfig.from_pretrained(vedas_dir)
    config.replay_top_k = 0
    with pytest.raises(ValueError, match="replay_top_k=0"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_latent_token_clashing_with_image_token_is_rejected(small_config):
    with pytest.raises(ValueError, match="image_token_id"):
        small_config(image_token_id=7, latent_token_id=7)


def test_recon_window_is_clamped_to_thin_images_in_training_as_in_generate(vedas_dir, processor, vedas_class,
                                                                          monkeypatch, backbone):
    """A thin image (merged grid 1 x 3 with W = 3) must not stop a training run: the window shrinks to the largest
    square that fits, in the training forward and in `generate`'s trace alike."""
    from vedas_hf.testing import make_tiny_images

    qwen_only(backbone, "Chameleon's processor crops every image to a square")
    model = vedas_class.from_pretrained(vedas_dir, recon_window=3).train()
    thin = make_tiny_images(1, sizes=((48, 16),), seed=1)[0]  # 3 x 1 merged cells (16 px each)
    batch = make_batch(processor, ["Shape?"], [[thin]])
    merge = model.config.vision_config.spatial_merge_size
    grid_h, grid_w = (batch["image_grid_thw"][0, 1:] // merge).tolist()
    assert min(grid_h, grid_w) < 3
    windows = []
    encode = type(model)._encode_crops
    monkeypatch.setattr(type(model), "_encode_crops", lambda self, w, *a, **k: windows.extend(w) or encode(self, w, *a, **k))
    seq = latent_sequence(processor, batch, model.config, 1, [40])
    out = model(**seq, labels=seq["input_ids"])
    assert torch.isfinite(out.loss) and out.recon_loss > 0
    assert [w["size"] for w in windows] == [min(grid_h, grid_w)]
    trace = model.eval().generate(**batch, num_latent_steps=1, max_new_tokens=1, return_dict_in_generate=True).latent_trace
    cell = merge * model.config.vision_config.patch_size
    left, top, right, bottom = trace[0][0]["box"]
    assert (right - left, bottom - top) == (cell * windows[0]["size"],) * 2
    assert (top, left) == (windows[0]["row"] * cell, windows[0]["col"] * cell)


def test_convert_without_room_for_latent_tokens_is_a_clear_error(tmp_path):
    from vedas_hf.convert import add_latent_tokens
    from vedas_hf.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(add_latent_tokens=False)
    with pytest.raises(ValueError, match="vocab_size"):
        add_latent_tokens(tokenizer, vocab_size=len(tokenizer) - 1)
