"""Latent reasoning: cached vs uncached, train/inference consistency, batching, replay modes, window search,
crop round trip, gradients (with and without activation checkpointing) and the reconstruction loss."""

import itertools
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MaxLengthCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
    SuppressTokensLogitsProcessor,
)
from transformers.generation.streamers import BaseStreamer
from transformers.cache_utils import DynamicCache, StaticCache

from conftest import make_batch, qwen_only, split_batch
from test_modeling import latent_sequence, randomize_gates
from vedas_hf.modeling import modeling_vedas
from vedas_hf.modeling.modeling_vedas import (
    VedasRouterCache,
    _visual_positions,
    densest_window,
    image_layout,
    patchify,
    replay_window,
    unpatchify,
)


def load(vedas_dir, **overrides):
    model = AutoModelForImageTextToText.from_pretrained(vedas_dir, **overrides).eval()  # either backbone
    randomize_gates(model)
    return model


def uncached_first_answer_logits(model, batch, steps):
    """Reference: every latent step re-runs the *whole* sequence from scratch (fresh KV cache and router cache,
    all chunks routed in one call), then the end marker; returns the logits after the end marker. Positions are
    counted here, independently of the model's arithmetic: text positions continue from the prompt's largest
    M-RoPE position; with `replay_positions="image"` a replayed token takes its prompt column's position and
    does not count."""
    config = model.config
    device = batch["input_ids"].device
    start = torch.full((batch["input_ids"].shape[0], 1), config.start_latent_token_id, device=device)
    ids = torch.cat([batch["input_ids"], start], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(start)], dim=1).long()
    types = batch.get("mm_token_type_ids")
    types = None if types is None else torch.cat([types, torch.zeros_like(start)], dim=1)
    prompt_embeds = model._prompt_embeddings(ids, batch.get("pixel_values"), batch.get("image_grid_thw"))
    prompt_positions, _ = model._prompt_positions(ids, mask, batch.get("image_grid_thw"), types)
    visual_pos, visual_valid = _visual_positions(ids == config.image_token_id)
    visited = torch.zeros_like(visual_valid)
    top_k = min(config.replay_top_k, visual_pos.shape[1])
    embeds, full_mask, chunks, eligible = prompt_embeds, mask, [(0, ids.shape[1])], mask.bool()
    positions, planes = prompt_positions, prompt_positions.shape[0]  # 3 (M-RoPE) or 1 (Chameleon)
    next_text = prompt_positions.amax(dim=(0, 2)) + 1  # (batch,): the start marker ends every prompt
    active = torch.ones(ids.shape[0], dtype=torch.bool, device=device)

    def full_pass(embeds, positions, full_mask, chunks, eligible):
        return model._routed_pass(embeds, positions, full_mask, DynamicCache(config=config.get_text_config()),
                                  VedasRouterCache(), eligible, chunks, 0)

    hidden, saliency, _ = full_pass(embeds, positions, full_mask, chunks, eligible)
    for _ in range(steps):
        tokens, tokens_valid, index, index_valid, _ = model._replay_tokens(
            saliency, visual_pos, visual_valid, visited, prompt_embeds, active, top_k
        )
        visited = visited | torch.zeros_like(visited).scatter(1, index, index_valid)
        chunk = torch.cat([tokens, hidden[:, -1:]], dim=1)
        chunk_valid = torch.cat([tokens_valid, active[:, None]], dim=1)
        if config.replay_positions == "image":
            columns = visual_pos.gather(1, index)
            replayed = torch.stack([prompt_positions[:, row, columns[row]] for row in range(ids.shape[0])], dim=1)
            chunk_positions = torch.cat([replayed, next_text[None, :, None].expand(planes, -1, 1)], dim=2)
            next_text = next_text + 1
        else:
            counts = chunk_valid.long().cumsum(1)
            chunk_positions = (next_text[:, None] + (counts - 1).clamp(min=0)).unsqueeze(0).expand(planes, -1, -1)
            next_text = next_text + counts[:, -1]
        positions = torch.cat([positions, chunk_positions], dim=2)
        chunks = chunks + [(embeds.shape[1], embeds.shape[1] + chunk.shape[1])]
        embeds = torch.cat([embeds, chunk], dim=1)
        full_mask = torch.cat([full_mask, chunk_valid.long()], dim=1)
        eligible = torch.cat([eligible, chunk_valid], dim=1)
        hidden, saliency, _ = full_pass(embeds, positions, full_mask, chunks, eligible)
    end = model.get_input_embeddings()(torch.full_like(start, config.end_latent_token_id))
    embeds = torch.cat([embeds, end], dim=1)
    positions = torch.cat([positions, next_text[None, :, None].expand(planes, -1, 1)], dim=2)
    full_mask = torch.cat([full_mask, torch.ones_like(start)], dim=1)
    eligible = torch.cat([eligible, torch.zeros_like(start, dtype=torch.bool)], dim=1)
    hidden, _, _ = full_pass(embeds, positions, full_mask, chunks, eligible)
    return model._vedas_logits(hidden[:, -1])  # the LM head (Chameleon: image codes masked, as in its stock forward)


@pytest.mark.parametrize("mode, positions", [("patches", "sequential"), ("soft_mix", "sequential"),
                                             ("patches", "image")])
def test_cached_latent_generate_equals_uncached_recomputation(vedas_dir, processor, images, mode, positions):
    model = load(vedas_dir, replay_mode=mode, replay_positions=positions)
    batch = make_batch(processor, ["Count the shapes", "Top left colour?"], [[images[0]], [images[1]]])
    out = model.generate(**batch, num_latent_steps=3, max_new_tokens=2, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        reference = uncached_first_answer_logits(model, batch, steps=3)
    assert (out.logits[0] - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("positions", ["sequential", "image"])
def test_teacher_forcing_reproduces_generate_logits(vedas_dir, processor, images, positions):
    model = load(vedas_dir, replay_positions=positions)
    batch = make_batch(processor, ["What is a + b?", "Shape?"], [[images[2]], [images[3]]])
    out = model.generate(**batch, num_latent_steps=2, max_new_tokens=4, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    prompt_len = batch["input_ids"].shape[1]
    answer = out.sequences[:, prompt_len:]
    seq = latent_sequence(processor, batch, model.config, 2, [])
    seq["input_ids"] = torch.cat([seq["input_ids"], answer], dim=1)
    seq["attention_mask"] = torch.cat([seq["attention_mask"], torch.ones_like(answer)], dim=1)
    if "mm_token_type_ids" in seq:
        seq["mm_token_type_ids"] = torch.cat([seq["mm_token_type_ids"], torch.zeros_like(answer)], dim=1)
    with torch.no_grad():
        logits = model(**seq).logits
    first = prompt_len + 1 + 2  # the end marker's position: its logits predict the first answer token
    for i, step_logits in enumerate(out.logits):
        assert (logits[:, first + i] - step_logits).abs().max().item() < 1e-4, i


@pytest.mark.parametrize("positions", ["sequential", "image"])
def test_mixed_batch_equals_one_by_one(vedas_dir, processor, images, positions):
    model = load(vedas_dir, replay_positions=positions)
    questions = ["Which digit is the largest one here?", "Colour?", "Say hi without any image"]
    row_images = [[images[0], images[2]], [images[1]], None]
    batch = make_batch(processor, questions, row_images)
    kwargs = dict(num_latent_steps=3, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    together = model.generate(**batch, **kwargs)
    prompt_len = batch["input_ids"].shape[1]
    for row in range(len(questions)):
        single = split_batch(batch, row, model.config.image_token_id)
        alone = model.generate(**single, **kwargs)
        assert torch.equal(alone.sequences[0, single["input_ids"].shape[1] :], together.sequences[row, prompt_len:])
        for step in range(len(alone.logits)):
            assert (alone.logits[step][0] - together.logits[step][row]).abs().max().item() < 1e-4
        assert alone.latent_trace[0][0]["visual_indices"] == together.latent_trace[0][row]["visual_indices"]


def test_text_only_batch_rows_equal_the_same_row_alone(vedas_dir, processor):
    """A batch without any image (left padding, rows of different lengths) gives each row's tokens and logits."""
    model = load(vedas_dir)
    questions = ["Say hi", "Count from one to three, please, slowly"]
    batch = make_batch(processor, questions, [None, None])
    kwargs = dict(num_latent_steps=2, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    together = model.generate(**batch, **kwargs)
    for row, question in enumerate(questions):
        alone = model.generate(**make_batch(processor, [question], [None]), **kwargs)
        assert torch.equal(alone.sequences[0, -4:], together.sequences[row, -4:])
        for step in range(4):
            assert (alone.logits[step][0] - together.logits[step][row]).abs().max().item() < 1e-5


def test_one_beam_is_greedy_decoding(vedas_dir, processor, images):
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?", "Colour of the big one?"], [[images[0]], [images[1]]])
    greedy = model.generate(**batch, num_latent_steps=2, max_new_tokens=5, do_sample=False)
    beam = model.generate(**batch, num_latent_steps=2, max_new_tokens=5, do_sample=False, num_beams=1)
    assert torch.equal(greedy, beam)


def test_generate_output_layout_is_prompt_then_answer(vedas_dir, processor, images):
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?", "Is it blue or red?"], [[images[0]], [images[1]]])
    out = model.generate(**batch, num_latent_steps=2, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_beam_search_and_sampling_run_after_latents(vedas_dir, processor, images):
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?", "Colour?"], [[images[0]], [images[1]]])
    beams = model.generate(**batch, num_latent_steps=2, max_new_tokens=3, num_beams=3, num_return_sequences=2,
                           do_sample=False)
    assert beams.shape[0] == 4 and torch.equal(beams[0, : batch["input_ids"].shape[1]], batch["input_ids"][0])
    torch.manual_seed(0)
    sampled_a = model.generate(**batch, num_latent_steps=2, max_new_tokens=4, do_sample=True, top_k=5)
    torch.manual_seed(0)
    sampled_b = model.generate(**batch, num_latent_steps=2, max_new_tokens=4, do_sample=True, top_k=5)
    assert torch.equal(sampled_a, sampled_b)


@pytest.mark.parametrize("settings", [dict(do_sample=False), dict(do_sample=True, top_k=5),
                                      dict(num_beams=2, num_return_sequences=2, do_sample=False)],
                         ids=["greedy", "sampling", "beams"])
def test_static_cache_decoding_gives_the_dynamic_tokens(vedas_dir, processor, images, settings):
    """`cache_implementation="static"`: the latent steps' keys/values go into a StaticCache sized for the answer,
    and decoding gives the same tokens and logits as from the DynamicCache (left-padded batch, sampling under one
    seed, beams); an absolute `max_length` sizes it too; the returned cache is the StaticCache."""
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?", "Colour of the big one, please?"], [[images[0]], [images[1]]])
    kwargs = dict(num_latent_steps=2, max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True,
                  output_logits=True, **settings)
    torch.manual_seed(0)
    dynamic = model.generate(**batch, **kwargs)
    torch.manual_seed(0)
    static = model.generate(**batch, cache_implementation="static", **kwargs)
    assert torch.equal(static.sequences, dynamic.sequences)
    for got, expected in zip(static.logits, dynamic.logits):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    cache = static.get("cache", static.get("past_key_values"))
    assert isinstance(cache, StaticCache) and isinstance(dynamic.get("cache", dynamic.get("past_key_values")),
                                                          DynamicCache)
    length = batch["input_ids"].shape[1]
    by_length = model.generate(**batch, num_latent_steps=2, max_length=length + 6, min_length=length + 6,
                               cache_implementation="static", do_sample=False)
    if not settings.get("do_sample") and "num_beams" not in settings:
        assert torch.equal(by_length, dynamic.sequences)


def test_replay_columns_nobody_attends_are_dropped_before_decoding(vedas_dir, processor, images, monkeypatch):
    """K = the largest row's visual-token count: the first step replays every visual token, the next ones find
    none and leave K empty slots each. `generate` drops those columns before decoding: the same tokens and logits
    as when they stay (left-padded batch and one row, and with a static cache), a cache shorter by exactly the
    empty slots, and for one unpadded row an all-ones mask, so decoding runs without a mask like stock decoding."""
    batch = make_batch(processor, ["Shape?", "Colour of the big one, please?"], [[images[0]], [images[1]]])
    model = load(vedas_dir)
    counts = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    visual = model.config.replay_top_k = max(counts)
    kwargs = dict(num_latent_steps=3, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                  return_dict_in_generate=True, output_logits=True)
    single = split_batch(batch, 0, model.config.image_token_id)
    masks = []

    def record_decoding_mask(module, args, kw):
        tokens = kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None else kw.get("input_ids")
        if tokens.shape[1] == 1:
            masks.append(kw.get("attention_mask"))

    hook = model._vedas_language_model.register_forward_pre_hook(record_decoding_mask, with_kwargs=True)
    compact = {name: model.generate(**inputs, **kwargs) for name, inputs in (("batch", batch), ("single", single))}
    # the single row's end marker and 3 decoding steps: no padding left, so the mask is all ones (transformers >=
    # 5.2x then drops it, as for stock decoding; older versions pass it along)
    assert len(masks) == 8 and all(mask is None or bool(mask.bool().all()) for mask in masks[4:])
    static = model.generate(**batch, cache_implementation="static", **kwargs)  # sized after the drop
    assert torch.equal(static.sequences, compact["batch"].sequences)
    with torch.no_grad():  # the uncached recomputation keeps every column
        reference = uncached_first_answer_logits(model, batch, steps=3)
    assert (compact["batch"].logits[0] - reference).abs().max().item() < 1e-4
    monkeypatch.setattr(modeling_vedas, "_drop_unattended_columns", lambda phase, prompt_columns: None)
    masks.clear()
    full = {name: model.generate(**inputs, **kwargs) for name, inputs in (("batch", batch), ("single", single))}
    hook.remove()
    assert all(mask is not None and not bool(mask.bool().all()) for mask in masks[4:])  # kept: masked columns
    for name in full:
        assert torch.equal(compact[name].sequences, full[name].sequences)
        for got, expected in zip(compact[name].logits, full[name].logits):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        lengths = [out.get("cache", out.get("past_key_values")).get_seq_length() for out in (compact[name],
                                                                                               full[name])]
        # steps 2 and 3 are empty (K slots each; K is capped at the prompt's visual-token count)
        empty = 2 * (visual if name == "batch" else counts[0])
        assert lengths[1] - lengths[0] == empty


def test_compiled_decoding_after_the_latent_steps(vedas_dir, processor, images):
    """The way transformers documents compiled generation: the model's forward under `torch.compile` (a full
    graph: a decoding step does no data-dependent check) and a static cache, here asked for through the model's
    generation config. Same tokens as the uncompiled dynamic path."""
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?", "Colour of the big one, please?"], [[images[0]], [images[1]]])
    expected = model.generate(**batch, num_latent_steps=2, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager", fullgraph=True)
    model.generation_config.cache_implementation = "static"
    got = model.generate(**batch, num_latent_steps=2, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)


def test_length_limits_count_prompt_and_answer_as_in_stock_generate(vedas_dir, processor, images):
    """`max_length` / `min_length` (arguments, a passed or the model's generation config) mean prompt + answer, as
    in stock `generate`, although the decoding loop also sees the inserted replay/latent columns."""
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?", "Colour of the big one?"], [[images[0]], [images[1]]])
    length = batch["input_ids"].shape[1]
    reference = model.generate(**batch, num_latent_steps=2, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert reference.shape[1] == length + 5
    limits = dict(max_length=length + 5, min_length=length + 5)
    assert torch.equal(model.generate(**batch, num_latent_steps=2, do_sample=False, **limits), reference)
    config = GenerationConfig(do_sample=False, **limits)
    assert torch.equal(model.generate(**batch, num_latent_steps=2, generation_config=config), reference)
    assert config.max_length == config.min_length == length + 5  # shifted on a copy
    # min_length holds end-of-sequence back exactly like min_new_tokens
    eos = int(reference[0, length])  # row 0's first answer token
    held = model.generate(**batch, num_latent_steps=2, max_new_tokens=5, min_length=length + 3, eos_token_id=eos,
                          pad_token_id=0, do_sample=False)
    expected = model.generate(**batch, num_latent_steps=2, max_new_tokens=5, min_new_tokens=3, eos_token_id=eos,
                              pad_token_id=0, do_sample=False)
    assert torch.equal(held, expected) and held.shape[1] >= length + 3
    model.generation_config.max_length = length + 5
    assert model.generate(**batch, num_latent_steps=2, do_sample=False).shape[1] == length + 5


@pytest.mark.parametrize("implementation", ["static", "hybrid"])
def test_cache_implementation_of_the_model_config_is_left_to_plain_decoding(vedas_dir, processor, images,
                                                                           implementation):
    """A checkpoint whose generation config asks for another cache still generates with latents (decoding continues
    from the latent steps' DynamicCache); the config itself is not changed."""
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?"], [[images[0]]])
    reference = model.generate(**batch, num_latent_steps=2, max_new_tokens=4, do_sample=False)
    model.generation_config.cache_implementation = implementation
    assert torch.equal(model.generate(**batch, num_latent_steps=2, max_new_tokens=4, do_sample=False), reference)
    passed = GenerationConfig(max_new_tokens=4, do_sample=False)  # transformers fills it from the model's config
    assert torch.equal(model.generate(**batch, num_latent_steps=2, generation_config=passed), reference)
    assert model.generation_config.cache_implementation == implementation and passed.cache_implementation is None


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.flatten().clone())

    def end(self):
        self.ended = True


class StopOnToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_streamer_and_stopping_criteria_follow_the_answer(vedas_dir, processor, images):
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?"], [[images[0]]])
    length = batch["input_ids"].shape[1]
    streamer = RecordingStreamer()
    out = model.generate(**batch, num_latent_steps=2, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         streamer=streamer)
    answer = out[0, length:]
    # as in stock generate: the prompt first (without the latent columns), then one put per answer token
    assert streamer.ended and torch.equal(streamer.chunks[0], batch["input_ids"][0])
    assert len(streamer.chunks) == 7 and torch.equal(torch.cat(streamer.chunks[1:]), answer)
    stock = RecordingStreamer()
    model.generate(**batch, num_latent_steps=0, max_new_tokens=6, min_new_tokens=6, do_sample=False, streamer=stock)
    assert torch.equal(stock.chunks[0], streamer.chunks[0])
    stop = int(answer[2])
    first = int((answer == stop).nonzero()[0])
    stopped = model.generate(**batch, num_latent_steps=2, max_new_tokens=6, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([StopOnToken(stop)]))
    assert torch.equal(stopped, out[:, : length + first + 1])


class RecordingProcessor(LogitsProcessor):
    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids.clone())
        return scores


def test_passed_processors_and_criteria_see_prompt_then_answer(vedas_dir, processor, images):
    """A caller's logits processor, stopping criterion and `prefix_allowed_tokens_fn` see the ids of the stock
    layout (prompt, then the answer so far), never the columns the latent steps inserted between them; so a
    `MaxLengthCriteria` counts prompt + answer, as with stock `generate`."""
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?", "What colour is the shape?"], [[images[0]], [images[1]]])
    length = batch["input_ids"].shape[1]
    recorder, prefixes = RecordingProcessor(), []

    def allowed(batch_id, ids):
        prefixes.append(ids.clone())
        return list(range(model.config.get_text_config().vocab_size))

    out = model.generate(**batch, num_latent_steps=2, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                         logits_processor=LogitsProcessorList([recorder]), prefix_allowed_tokens_fn=allowed)
    assert [ids.shape[1] for ids in recorder.seen] == [length + i for i in range(4)]
    for i, ids in enumerate(recorder.seen):
        assert torch.equal(ids, out[:, : length + i])
    assert len(prefixes) == 2 * 4 and all(torch.equal(ids, out[i % 2, : length + i // 2])
                                          for i, ids in enumerate(prefixes))
    stopped = model.generate(**batch, num_latent_steps=2, max_new_tokens=10, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(max_length=length + 3)]))
    assert torch.equal(stopped, out[:, : length + 3])
    # as in stock `generate`, a passed processor replaces the one of the same type the generation config builds
    first = out[:, length].tolist()
    suppressed = model.generate(**batch, num_latent_steps=2, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                suppress_tokens=first)
    assert not torch.equal(suppressed, out)
    replaced = model.generate(**batch, num_latent_steps=2, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                              suppress_tokens=first,
                              logits_processor=LogitsProcessorList([SuppressTokensLogitsProcessor([])]))
    assert torch.equal(replaced, out)


@pytest.mark.parametrize("mode, inserted_per_step", [("patches", 3 + 1), ("soft_mix", 1 + 1), ("none", 1)])
def test_replay_modes_insert_the_right_tokens(vedas_dir, processor, images, mode, inserted_per_step):
    model = load(vedas_dir, replay_mode=mode)
    batch = make_batch(processor, ["Shape?"], [[images[3]]])
    with torch.no_grad():
        phase = model._implicit_phase(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch.get("image_grid_thw"),
            batch.get("mm_token_type_ids"), torch.ones(1, 2, dtype=torch.bool),
        )
    assert phase.inserted.shape[1] == 2 * inserted_per_step
    assert len(phase.trace) == (0 if mode == "none" else 2)


def test_visited_tokens_are_never_reselected_and_large_k_degrades_gracefully(vedas_dir, processor, images):
    model = load(vedas_dir, replay_top_k=6)
    batch = make_batch(processor, ["Shape?", "Colour?"], [[images[0]], [images[2]]])
    visual_counts = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    out = model.generate(**batch, num_latent_steps=4, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    for row, count in enumerate(visual_counts):
        per_step = [step[row]["visual_indices"] for step in out.latent_trace]
        flat = list(itertools.chain.from_iterable(per_step))
        assert len(flat) == len(set(flat)), per_step
        assert len(flat) == min(count, 6 * 4)
        assert [len(s) for s in per_step] == [max(0, min(6, count - 6 * t)) for t in range(4)]
        assert all(0 <= i < count for i in flat)


# ---- window search and crops ---------------------------------------------------------------------------------------


def brute_force_window(counts, size):
    h, w = counts.shape
    best, where = -1, None
    for r in range(h - size + 1):
        for c in range(w - size + 1):
            total = counts[r : r + size, c : c + size].sum().item()
            if total > best:
                best, where = total, (r, c)
    return where


def test_densest_window_matches_brute_force_on_random_non_square_grids():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        h, w = torch.randint(1, 9, (2,), generator=generator).tolist()
        size = int(torch.randint(1, min(h, w) + 1, (1,), generator=generator))
        counts = (torch.rand(h, w, generator=generator) < 0.3).float()
        assert densest_window(counts, size) == brute_force_window(counts, size), (h, w, size)


def test_densest_window_rejects_window_larger_than_grid():
    with pytest.raises(ValueError, match="recon_window=4"):
        densest_window(torch.zeros(3, 5), 4)


def test_unpatchify_round_trip_and_full_window_crop(processor, images, vedas_dir, backbone):
    qwen_only(backbone, 'Qwen patch rows')
    model = load(vedas_dir)
    vision = model.config.vision_config
    batch = make_batch(processor, ["a", "b"], [[images[1]], [images[2]]])
    grids = batch["image_grid_thw"]
    offsets = torch.cat([grids.new_zeros(1), grids.prod(-1).cumsum(0)]).tolist()
    for image, grid in enumerate(grids):
        rows = batch["pixel_values"][offsets[image] : offsets[image + 1]]
        frames = unpatchify(rows, grid, vision)
        assert frames.shape[-2:] == (grid[1] * vision.patch_size, grid[2] * vision.patch_size)
        assert torch.equal(patchify(frames, grid, vision), rows)
        # the processor repeats a still image over the temporal patch
        assert torch.equal(frames[0], frames[1])


def whole_image_window(batch):
    """The window covering all of the first (square) image of a batch, and the batch's grids as lists."""
    grids = batch["image_grid_thw"].tolist()
    _, h, w = grids[0]
    assert h == w, grids[0]
    return {"image": 0, "row": 0, "col": 0, "size": h // 2}, grids


@pytest.mark.parametrize("crop_size", [None, 32])
def test_whole_image_crop_reencodes_the_image_itself(vedas_dir, processor, images, crop_size, backbone):
    """A window over the whole 32 x 32 image, resized to the image's size (default) or to 32 px, is the image:
    the target must equal the mean of the image's own vision features."""
    qwen_only(backbone, "the vision tower's crop encoding (Chameleon's: tests/test_chameleon.py)")
    model = load(vedas_dir, recon_crop_size=crop_size)
    batch = make_batch(processor, ["a", "b"], [[images[0]], [images[2]]])
    window, grids = whole_image_window(batch)
    with torch.no_grad():
        target = model._encode_crops([window], batch["pixel_values"], grids)
        own = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output[0]
    assert target.shape == (1, model.config.get_text_config().hidden_size)
    torch.testing.assert_close(target[0], own.mean(dim=0), rtol=1e-5, atol=1e-6)


def test_recon_crop_size_sets_the_resolution_of_the_reencoded_crops(vedas_dir, processor, images, monkeypatch, backbone):
    qwen_only(backbone, "the vision tower's crop grids (Chameleon's: tests/test_chameleon.py)")
    batch = make_batch(processor, ["a", "b"], [[images[0]], [images[3]]])
    window, grids = whole_image_window(batch)
    windows = [window, {"image": 1, "row": 1, "col": 2, "size": 2}]
    seen = []
    targets = {}
    for crop_size in (None, 16, 48):
        model = load(vedas_dir, recon_crop_size=crop_size)
        stock = model.model.get_image_features
        monkeypatch.setattr(model.model, "get_image_features",
                            lambda rows, grid: seen.append((rows.shape[0], grid.tolist())) or stock(rows, grid))
        with torch.no_grad():
            targets[crop_size] = model._encode_crops(windows, batch["pixel_values"], grids)
    patch = model.config.vision_config.patch_size
    side = {16: 16 // patch, 48: 48 // patch}
    assert seen[0] == (sum(t * h * w for t, h, w in grids), grids)  # default: each crop at its image's size
    for (rows, crop_grids), crop_size in zip(seen[1:], (16, 48)):
        assert crop_grids == [[1, side[crop_size], side[crop_size]]] * 2
        assert rows == 2 * side[crop_size] ** 2
    # a different resolution is a different target (the vision tower sees other patches)
    assert not torch.allclose(targets[16], targets[48])
    assert not torch.allclose(targets[None][1], targets[48][1])


def test_replay_window_picks_the_image_with_most_selections(processor, images, vedas_dir):
    model = load(vedas_dir)
    batch = make_batch(processor, ["two images"], [[images[0], images[2]]])
    grids = model._token_grids(batch.get("image_grid_thw"), batch["pixel_values"])
    layout = image_layout(batch["input_ids"] == model.config.image_token_id, grids)
    (_, first0, h0, w0), (_, first1, h1, w1) = layout[0]
    assert first1 == h0 * w0
    index = torch.tensor([0, first1 + 0, first1 + 1, first1 + w1])
    window = replay_window(layout, 0, index, torch.ones(4, dtype=torch.bool), 2)
    assert window["image_in_row"] == 1 and (window["row"], window["col"]) == (0, 0)


# ---- training path -------------------------------------------------------------------------------------------------


def training_batch(processor, model, images):
    batch = make_batch(processor, ["Shape?", "Colour of the big one?"], [[images[0]], [images[1]]])
    seq = latent_sequence(processor, batch, model.config, 2, [40, 41, 42])
    labels = seq["input_ids"].clone()
    labels[:, : -3] = -100
    return seq, labels


def test_backward_reaches_routers_token_sr_and_llm(vedas_dir, processor, images):
    model = load(vedas_dir).train()
    seq, labels = training_batch(processor, model, images)
    out = model(**seq, labels=labels)
    assert out.recon_loss is not None and out.recon_loss > 0
    assert torch.allclose(out.loss, out.ce_loss + model.config.recon_loss_weight * out.recon_loss)
    out.loss.backward()
    routers = [l.router for l in model.model.language_model.layers if l.router is not None]
    assert all(r.gate.grad is not None and r.gate.grad.abs().sum() > 0 for r in routers)
    assert all(r.score.weight.grad is not None and r.score.weight.grad.abs().sum() > 0 for r in routers)
    assert model.token_sr.net.weight.grad.abs().sum() > 0
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    if hasattr(model.model, "visual"):  # Qwen's vision tower, through the CE of the replayed features
        assert model.model.visual.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    else:  # Chameleon's image-code embeddings (its VQ-VAE is discrete)
        codes = model.model.vocabulary_mapping.image_tokens
        assert model.model.embed_tokens.weight.grad[codes].abs().sum() > 0


def test_saliency_value_and_gradient_equal_eager_attention_maps(vedas_dir, processor, images):
    """Eq. 4 from the cached keys equals the mean over layers and heads of the last row of eager attention maps (the
    paper's implementation), in value and in gradient: a loss on the saliency (eq. 6 weights the replayed tokens by
    it) reaches every layer's queries and keys exactly as through the attention maps."""
    model = load(vedas_dir, attn_implementation="eager").train()
    batch = make_batch(processor, ["Which shape is on the left?", "Colour?"], [[images[0]], [images[1]]])
    config, lm = model.config, model.model.language_model
    embeds = model._prompt_embeddings(batch["input_ids"], batch["pixel_values"], batch.get("image_grid_thw"))
    positions, _ = model._prompt_positions(batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"),
                                           batch.get("mm_token_type_ids"))
    mask = batch["attention_mask"]
    vedas_pass = modeling_vedas.VedasPass(
        key_mask=mask.bool(), eligible=mask.bool(), chunks=[(0, mask.shape[1])], chunk_index=0,
        router_cache=VedasRouterCache(), config=config, rotary_emb=lm.rotary_emb,
        position_planes=model.vedas_position_planes,
    )
    positions = positions if model.vedas_position_planes > 1 else positions[0]  # Chameleon: (batch, seq)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_attentions=True,
             use_cache=False, vedas_pass=vedas_pass, **{modeling_vedas.CACHE_KWARG: DynamicCache(config=config.get_text_config())})
    ours = vedas_pass.mean_saliency()
    maps = torch.stack([a[:, :, -1, :].float() for a in out.attentions]).mean(dim=(0, 2))
    assert (ours - maps).abs().max().item() < 1e-6
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(0))
    parameters = [p for layer in lm.layers for p in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight)]
    expected = torch.autograd.grad((maps * weights).sum(), parameters, retain_graph=True)
    got = torch.autograd.grad((ours * weights).sum(), parameters)
    for g, e in zip(got, expected):
        assert e.abs().max() > 0
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_reconstruction_loss_reaches_the_language_model_through_the_saliency(vedas_dir, processor, images):
    """With the vision tower frozen (the LoRA recipe) the reconstruction loss must still train the language model:
    B(t) is weighted by the softmax of the saliency (eq. 6), which depends on every layer's queries and keys."""
    model = load(vedas_dir).train()
    (getattr(model.model, "visual", None) or model.model.vqmodel).requires_grad_(False)
    seq, labels = training_batch(processor, model, images)
    model(**seq, labels=labels).recon_loss.backward()
    for layer in model.model.language_model.layers:
        assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0
        assert layer.self_attn.k_proj.weight.grad.abs().sum() > 0


def enable_checkpointing(model, **kwargs):
    """`activation_checkpointing_enable` (transformers >= 5.24) or its older name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


class CheckpointWrapper(torch.nn.Module):
    """What FSDP's activation checkpointing does: the layer called through `torch.utils.checkpoint`."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.layer, *args, use_reentrant=False, **kwargs)


def loss_and_gradients(model, batch, labels):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=labels)
    out.loss.backward()
    # Chameleon's VQ-VAE gets no gradient (its codes are discrete), as in the stock model
    return out.loss.detach(), [p.grad for name, p in model.named_parameters() if ".vqmodel." not in name]


@pytest.mark.parametrize("mechanism, overrides", [
    ("transformers", {}), ("torch_wrapper", {}), ("transformers", {"router_positions": "rearrange"}),
])
def test_activation_checkpointing_gives_the_same_gradients(vedas_dir, processor, images, monkeypatch, mechanism,
                                                           overrides):
    """Every layer of every latent pass is replayed in the backward pass against a cache that by then holds later
    passes; loss and every gradient (routers, TokenSR, LLM, vision) must equal plain training. (`rearrange` reads
    the router cache to number the selected tokens.)"""
    model = load(vedas_dir, **overrides).train()
    seq, labels = training_batch(processor, model, images)
    reference_loss, reference = loss_and_gradients(model, seq, labels)
    replays = []
    replay_cache = modeling_vedas._ReplayLayerCache
    monkeypatch.setattr(modeling_vedas, "_ReplayLayerCache", lambda *a: replays.append(a) or replay_cache(*a))
    layers = model.model.language_model.layers
    if mechanism == "transformers":
        enable_checkpointing(model)
        assert all(layer.gradient_checkpointing for layer in layers)
    else:
        for i, layer in enumerate(layers):
            layers[i] = CheckpointWrapper(layer)
    loss, gradients = loss_and_gradients(model, seq, labels)
    passes = 1 + 2 + 1  # prompt, 2 latent steps, the rest of the sequence
    assert len(replays) == passes * len(layers)
    assert torch.equal(loss, reference_loss)
    assert all(g is not None for g in reference) and model.token_sr.net.weight.grad.abs().sum() > 0
    for gradient, expected in zip(gradients, reference):
        torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)


FSDP2_CHECKPOINTING = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
sys.path.insert(0, {tests!r})
from test_latent import load, training_batch
from vedas_hf.modeling import modeling_vedas
from vedas_hf.testing import build_tiny_processor, make_tiny_images

dist.init_process_group("gloo", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
processor = build_tiny_processor(backbone={backbone!r})
images = make_tiny_images(4, sizes=((32, 32), (48, 32), (32, 64), (40, 40)), seed=0)
replays = []
replay_cache = modeling_vedas._ReplayLayerCache
modeling_vedas._ReplayLayerCache = lambda *a: replays.append(a) or replay_cache(*a)
gradients = {{}}
for checkpointing in (False, True):
    model = load({path!r}).train().double()  # float64 end to end, so the casting hook changes no value
    policy = MixedPrecisionPolicy(param_dtype=torch.float64)  # casts (and so copies) every layer's arguments
    layers = model.model.language_model.layers
    for i, layer in enumerate(layers):
        if checkpointing:  # the order of accelerate's FSDP2 activation checkpointing: wrap, then shard
            layers[i] = layer = checkpoint_wrapper(layer)
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    seq, labels = training_batch(processor, model, images)
    seq["pixel_values"] = seq["pixel_values"].double()
    model(**seq, labels=labels).loss.backward()
    gradients[checkpointing] = [p.grad.full_tensor() for p in model.parameters() if p.grad is not None]
print("REPLAYS", len(replays))
print("MAXDIFF", max((a - b).abs().max().item() for a, b in zip(*gradients.values())))
dist.destroy_process_group()
"""


def test_activation_checkpointing_under_fsdp2_mixed_precision(vedas_dir, backbone, tmp_path):
    """FSDP2 rebuilds the dataclasses and dicts in a layer's arguments when it casts them: the per-pass state must
    survive that (saliency rows, replay bookkeeping), with and without checkpointing, and the gradients match."""
    tests = os.path.dirname(os.path.abspath(__file__))
    script = FSDP2_CHECKPOINTING.format(tests=tests, backbone=backbone, path=str(vedas_dir))
    port = str(29500 + os.getpid() % 1000)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tests)
    assert result.returncode == 0, result.stderr[-3000:]
    values = dict(line.split() for line in result.stdout.splitlines() if line.startswith(("REPLAYS", "MAXDIFF")))
    assert int(values["REPLAYS"]) == 4 * 4  # 4 passes (prompt, 2 latents, the rest) x 4 layers
    assert float(values["MAXDIFF"]) < 1e-12


def test_reentrant_checkpointing_is_a_clear_error(vedas_dir, processor, images):
    model = load(vedas_dir).train()
    seq, labels = training_batch(processor, model, images)
    enable_checkpointing(model, use_reentrant=True)
    with pytest.raises(ValueError, match=r"use_reentrant=True.*'use_reentrant': False"):
        model(**seq, labels=labels)


def test_checkpointed_stock_forward_drops_the_cache_like_transformers(vedas_dir, processor, images):
    """A stock (latent-free) training forward under checkpointing leaves an explicit cache empty, as transformers
    does for every layer that writes the cache; keeping it would append twice on the backward replay."""
    model = load(vedas_dir).train()
    seq, labels = training_batch(processor, model, images)
    seq["input_ids"] = seq["input_ids"].masked_fill(seq["input_ids"] == model.config.latent_token_id, 40)
    reference_loss, reference = loss_and_gradients(model, seq, labels)
    enable_checkpointing(model)
    cache = DynamicCache(config=model.config.get_text_config())
    loss, gradients = loss_and_gradients(model, {**seq, modeling_vedas.CACHE_KWARG: cache}, labels)
    assert cache.get_seq_length() == 0
    assert torch.equal(loss, reference_loss)
    for gradient, expected in zip(gradients, reference):
        torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)


def test_recon_crop_size_trains_with_cheaper_crops(vedas_dir, processor, images, monkeypatch, backbone):
    qwen_only(backbone, "the vision tower's crop grids (Chameleon's: tests/test_chameleon.py)")
    model = load(vedas_dir, recon_crop_size=16).train()
    seq, labels = training_batch(processor, model, images)
    grids = []
    stock = model.model.get_image_features
    monkeypatch.setattr(model.model, "get_image_features",
                        lambda rows, grid: grids.append(grid.tolist()) or stock(rows, grid))
    out = model(**seq, labels=labels)
    side = 16 // model.config.vision_config.patch_size
    assert grids[0] == seq["image_grid_thw"].tolist()  # the prompt's images
    # then one call per latent step (2), each with one N x N crop per row (2 rows with an image)
    assert grids[1:] == [[[1, side, side]] * 2] * 2
    assert torch.isfinite(out.recon_loss) and out.recon_loss > 0
    torch.testing.assert_close(out.loss, out.ce_loss + model.config.recon_loss_weight * out.recon_loss)
    default = load(vedas_dir).train()
    default.load_state_dict(model.state_dict())
    reference = default(**seq, labels=labels)
    torch.testing.assert_close(out.ce_loss, reference.ce_loss)  # only the target changes
    assert not torch.allclose(out.recon_loss, reference.recon_loss)
    out.loss.backward()
    assert model.token_sr.net.weight.grad.abs().sum() > 0


def test_recon_loss_zero_weight_and_absent_at_inference(vedas_dir, processor, images):
    model = load(vedas_dir, recon_loss_weight=0.0).train()
    seq, labels = training_batch(processor, model, images)
    out = model(**seq, labels=labels)
    assert out.recon_loss is None and torch.equal(out.loss, out.ce_loss)
    model = load(vedas_dir).eval()
    with torch.no_grad():
        out = model(**seq, labels=labels)
    assert out.recon_loss is None and torch.equal(out.loss, out.ce_loss)


def test_num_items_in_batch_turns_the_cross_entropy_into_a_token_sum(vedas_dir, processor, images):
    """The Trainer passes the label count of all gradient-accumulation micro-batches; the latent forward divides
    the token sum by it, like the stock forward (the reconstruction term is unchanged)."""
    model = load(vedas_dir).train()
    seq, labels = training_batch(processor, model, images)
    torch.manual_seed(0)
    mean = model(**seq, labels=labels)
    torch.manual_seed(0)
    summed = model(**seq, labels=labels, num_items_in_batch=torch.tensor(1000))
    tokens = int((labels[:, 1:] != -100).sum())
    assert torch.allclose(summed.ce_loss * 1000, mean.ce_loss * tokens, rtol=1e-5)
    assert torch.equal(summed.recon_loss, mean.recon_loss)


def test_ragged_latent_counts_match_single_rows(vedas_dir, processor, images):
    model = load(vedas_dir)
    config = model.config
    batch = make_batch(processor, ["Shape?", "Colour?"], [[images[0]], [images[1]]])
    rows = []
    for row, k in enumerate([2, 1]):
        single = split_batch(batch, row, config.image_token_id)
        seq = latent_sequence(processor, single, config, k, [40, 41])
        with torch.no_grad():
            rows.append(model(**seq).logits[0, -2:])
    # batch: row 1 pads the end of the latent block
    seq = latent_sequence(processor, batch, config, 2, [40, 41])
    block_end = batch["input_ids"].shape[1] + 1 + 2
    seq["input_ids"][1, block_end - 1] = processor.tokenizer.pad_token_id
    seq["attention_mask"][1, block_end - 1] = 0
    with torch.no_grad():
        logits = model(**seq).logits
    assert (logits[0, -2:] - rows[0]).abs().max() < 1e-4
    assert (logits[1, -2:] - rows[1]).abs().max() < 1e-4


def test_misaligned_latents_are_a_clear_error(vedas_dir, processor, images):
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?", "Colour?"], [[images[0]], [images[1]]])
    seq = latent_sequence(processor, batch, model.config, 2, [40, 41])
    seq["input_ids"][1, -1] = model.config.latent_token_id
    with pytest.raises(ValueError, match="one block of columns"):
        model(**seq)


# ---- generate and forward arguments (HF conventions) ---------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, 2])
def test_latent_tokens_in_a_generate_prompt_are_an_error_for_any_step_count(vedas_dir, processor, images, steps):
    """With 0 steps the prompt would otherwise be prefilled by the latent training forward, which keeps no cache:
    every token after the first would be decoded without the prompt."""
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?"], [[images[0]]])
    seq = latent_sequence(processor, batch, model.config, 2, [])
    with pytest.raises(ValueError, match="generate inserts the latent steps itself"):
        model.generate(**seq, num_latent_steps=steps, max_new_tokens=3)


def test_latent_forward_refuses_a_cache_and_extra_outputs(vedas_dir, processor, images):
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?"], [[images[0]]])
    seq = latent_sequence(processor, batch, model.config, 2, [40])
    with torch.no_grad():
        reference = model(**seq).logits  # use_cache left unset: fine
        assert torch.equal(model(**seq, use_cache=False).logits, reference)
        for extra, message in [({"use_cache": True}, "passes use_cache=True"),
                               ({"past_key_values": DynamicCache(config=model.config.get_text_config())}, "passes a cache"),
                               ({"output_hidden_states": True}, "output_hidden_states=True")]:
            with pytest.raises(ValueError, match=message):
                model(**seq, **extra)


def test_generation_config_is_the_second_positional_argument_as_in_stock_generate(vedas_dir, processor, images):
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?"], [[images[0]]])
    ids = batch.pop("input_ids")
    config = GenerationConfig(max_new_tokens=3, do_sample=False)
    by_keyword = model.generate(input_ids=ids, generation_config=config, num_latent_steps=2, **batch)
    assert torch.equal(model.generate(ids, config, num_latent_steps=2, **batch), by_keyword)
    assert torch.equal(model.generate(inputs=ids, generation_config=config, num_latent_steps=2, **batch), by_keyword)
    with pytest.raises(ValueError, match="generation_config must be a GenerationConfig, got Tensor"):
        model.generate(ids, batch["attention_mask"], num_latent_steps=2)


def test_num_latent_steps_from_generation_configs(vedas_dir, processor, images):
    """Precedence: argument, passed generation config, model generation config, model config."""
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?"], [[images[0]]])
    kwargs = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    one = model.generate(**batch, num_latent_steps=1, **kwargs)
    two = model.generate(**batch, num_latent_steps=2, **kwargs)
    assert len(one.latent_trace) == 1 and len(two.latent_trace) == 2
    passed = GenerationConfig(num_latent_steps=1, **kwargs)
    assert len(model.generate(**batch, generation_config=passed).latent_trace) == 1
    model.generation_config.num_latent_steps = 2
    via_model = model.generate(**batch, **kwargs)
    assert len(via_model.latent_trace) == 2 and torch.equal(via_model.sequences, two.sequences)
    assert len(model.generate(**batch, generation_config=passed).latent_trace) == 1
    assert len(model.generate(**batch, num_latent_steps=1, **kwargs).latent_trace) == 1
    stock = model.generate(**batch, num_latent_steps=0, **kwargs)
    assert stock.latent_trace == []  # the key is there for every step count


@pytest.mark.parametrize("setting", [{"num_beams": 3}, {"num_return_sequences": 2, "do_sample": True}])
def test_beams_from_the_model_generation_config_with_a_passed_config(vedas_dir, processor, images, setting):
    """transformers fills a passed config's unset fields from the model's generation config: the latent cache is
    expanded for those beams / sequences too."""
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?", "Colour?"], [[images[0]], [images[1]]])
    torch.manual_seed(0)
    explicit = model.generate(**batch, num_latent_steps=2, max_new_tokens=3, **setting)
    for name, value in setting.items():
        setattr(model.generation_config, name, value)
    torch.manual_seed(0)
    inherited = model.generate(**batch, num_latent_steps=2, generation_config=GenerationConfig(max_new_tokens=3))
    assert inherited.shape[0] == explicit.shape[0] == 2 * setting.get("num_return_sequences", 1)
    assert torch.equal(inherited, explicit)


def test_images_swapped_between_rows_are_a_clear_error(vedas_dir, processor, images, backbone):
    qwen_only(backbone, 'image_grid_thw')
    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?", "Colour?"], [[images[0]], [images[2]]])
    counts = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert counts[0] != counts[1]  # the images have different sizes: swapping keeps the totals only
    batch["image_grid_thw"] = batch["image_grid_thw"].flip(0)
    for steps in (0, 2):
        with pytest.raises(ValueError, match="Row 0: .* image tokens do not match"):
            model.generate(**batch, num_latent_steps=steps, max_new_tokens=2)
    batch["image_grid_thw"] = batch["image_grid_thw"].tolist()
    with pytest.raises(ValueError, match="image_grid_thw must be a torch.Tensor, got list"):
        model.generate(**batch, num_latent_steps=2, max_new_tokens=2)
