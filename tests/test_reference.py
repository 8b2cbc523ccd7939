"""An independent reference for the Vedas latent steps, written from the paper's equations in plain torch, and the
model checked against it in value and gradient.

The reference uses only public pieces of the model (embeddings, `get_image_features`, `get_rope_index`, each decoder
layer's projections and norms, `rotary_emb`, the final norm, `lm_head`, the router and TokenSR parameters) and none
of its private helpers. It recomputes the *whole* sequence from scratch at every latent step, one row at a time,
with attention written out (so eq. 4 reads real attention maps):

    eq. 1   the latent's input is the last hidden state of the previous pass
    eq. 4   saliency = mean over layers and heads of the last token's attention row
    eq. 5   the top-K unvisited visual tokens by saliency
    eq. 6   B(t) = softmax(saliency of the selected) * v;  b(t) = mean over the K weighted tokens (values only, its
            weights differentiable through the saliency of the layers' detached inputs: no path into the tower)
    eq. 7   the W x W window of the merged grid holding most selected tokens (brute force)
    eq. 8   u_ref = mean of the vision tower's encoding of that crop, sliced by hand from the image as the processor
            normalises it, resized back to the image's size and patchified by the image processor itself
    eq. 9   MSE(TokenSR(b(t)), u_ref)
    eqs. 10-12  per routed chunk, the top-alpha tokens by router score get h(d) = sigmoid(score) * f(h(d-1)), f the same
            layer over the selected tokens only (causal in position order, across chunks), out = H(0) + sum_d e(d) h(d)
    eq. 13  loss = CE + lambda * mean_t recon_t
    eq. 15  alpha(l) = alpha_e + (alpha_s - alpha_e) / 2 * (1 + cos(pi l / L))
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText

from conftest import make_batch, qwen_only
from test_modeling import latent_sequence, randomize_gates


CASES = {
    # name: (config overrides, latent steps, image index of the test's images fixture)
    "sequential-K3-W2-D1-fixed-linear": (dict(replay_top_k=3, recon_window=2, router_top_k=2), 2, 1),
    "image-pos-K2-W2-D2-cosine-mlp": (dict(replay_top_k=2, recon_window=2, replay_positions="image", router_depth=2,
                                           router_schedule="cosine", router_alpha_start=9, router_alpha_end=2,
                                           token_sr="mlp"), 2, 1),
    "rearrange-K4-W3-D1-fixed": (dict(replay_top_k=4, recon_window=3, router_top_k=3, router_positions="rearrange"),
                                 2, 3),
}


@pytest.fixture(autouse=True)
def _qwen_reference(request):
    """This reference re-derives M-RoPE positions and the vision tower's patch rows; Chameleon's own independent
    checks (a Coconut loop over the stock model, the VQ-VAE crop target) are in tests/test_chameleon.py."""
    if "backbone" in request.fixturenames:
        qwen_only(request.getfixturevalue("backbone"), "the reference re-derives M-RoPE and patch rows")


def load_case(vedas_dir, overrides, dtype=torch.float32):
    # router_depth=2 and token_sr="mlp" change the shapes of new modules: those start from their init
    model = AutoModelForImageTextToText.from_pretrained(vedas_dir, attn_implementation="eager",
                                                        ignore_mismatched_sizes=True, **overrides)
    randomize_gates(model)
    with torch.no_grad():  # TokenSR away from its init so the reconstruction term is not trivially small
        for p in model.token_sr.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    return model.to(dtype).train()


# ---- the reference ------------------------------------------------------------------------------------------------


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rms_norm(norm, x):
    """RMSNorm in the input's own precision (transformers' computes in float32, which would blur float64 finite
    differences)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


def decoder_layer(layer, h, cos, sin, allowed):
    """One pre-norm decoder layer written out for one row: `h` `(n, hidden)`, `cos`/`sin` `(n, head_dim)`, `allowed`
    `(n, n)` bool. Returns the output and the attention maps `(heads, n, n)`."""
    attn, n = layer.self_attn, h.shape[0]
    x = rms_norm(layer.input_layernorm, h)
    q = attn.q_proj(x).view(n, -1, attn.head_dim).transpose(0, 1)
    k = attn.k_proj(x).view(n, -1, attn.head_dim).transpose(0, 1)
    v = attn.v_proj(x).view(n, -1, attn.head_dim).transpose(0, 1)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    groups = q.shape[0] // k.shape[0]  # grouped-query attention: head i reads key/value head i // groups
    k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
    maps = (q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)).masked_fill(~allowed, float("-inf")).softmax(-1)
    h = h + attn.o_proj((maps @ v).transpose(0, 1).reshape(n, -1))
    return h + layer.mlp(rms_norm(layer.post_attention_layernorm, h)), maps


def alpha_of(config, layer_idx):
    """alpha(l): fixed, or eq. 15 (stated intent: from alpha_s at the first layer towards alpha_e)."""
    if config.router_schedule == "fixed":
        return config.router_top_k
    num_layers, start, end = config.get_text_config().num_hidden_layers, config.router_alpha_start, config.router_alpha_end
    return max(1, round(end + (start - end) / 2 * (1 + math.cos(math.pi * layer_idx / num_layers))))


def routed(layer, h0, cos, sin, chunks, alpha, rotary, rearrange):
    """Eqs. 10-12 on a layer output `h0` `(n, hidden)`: every depth picks the top-alpha tokens of each chunk by
    router score and refines them by the same layer restricted to the selected tokens (causal in position order,
    which is the rule "earlier chunks' selected tokens, then the earlier selected tokens of one's own chunk")."""
    state, out = h0, h0
    for depth in range(layer.router.gate.shape[0]):
        score = layer.router.score(state).squeeze(-1)
        chosen, values = [], score.detach().tolist()
        for start, end in chunks:
            by_score = sorted(range(start, end), key=lambda i: -values[i])
            chosen += sorted(by_score[:alpha])
        index = torch.tensor(chosen)
        m = len(chosen)
        if rearrange:  # table 5d: the selected tokens re-indexed 0 .. m-1
            c, s = rotary(h0[None], torch.arange(m)[None, None].expand(3, 1, m))
            c, s = c[0].to(h0.dtype), s[0].to(h0.dtype)
        else:
            c, s = cos[index], sin[index]
        refined, _ = decoder_layer(layer, state[index], c, s, torch.ones(m, m, dtype=torch.bool).tril())
        step = torch.sigmoid(score[index])[:, None] * refined  # eq. 11
        out = out.index_add(0, index, layer.router.gate[depth] * step)  # eq. 12
        state = state.index_copy(0, index, step)
    return out


def last_row_of_detached_attention(layer, h, cos, sin):
    """The last token's attention `(heads, n)` recomputed from the layer's input `h` `(n, hidden)` with its
    gradient stopped: differentiable with respect to the query / key projections and the input norm only (the
    reconstruction loss's saliency when `recon_grad_to_vision=False`)."""
    attn, n = layer.self_attn, h.shape[0]
    x = rms_norm(layer.input_layernorm, h.detach())
    q = attn.q_proj(x[-1:]).view(1, -1, attn.head_dim).transpose(0, 1)
    k = attn.k_proj(x).view(n, -1, attn.head_dim).transpose(0, 1)
    q, k = q * cos[-1:] + rotate_half(q) * sin[-1:], k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    return (q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)).softmax(-1)[:, 0]


def language_model(model, embeds, positions, chunks):
    """Final-norm hidden states `(n, hidden)`, per-layer attention maps and per-layer last-row attention from
    detached inputs of one row; `positions` `(3, n)`."""
    lm, config = model.model.language_model, model.config
    cos, sin = lm.rotary_emb(embeds[None], positions[:, None])
    cos, sin = cos[0].to(embeds.dtype), sin[0].to(embeds.dtype)
    n = embeds.shape[0]
    h, maps, detached = embeds, [], []
    for layer_idx, layer in enumerate(lm.layers):
        detached.append(last_row_of_detached_attention(layer, h, cos, sin))
        h, layer_maps = decoder_layer(layer, h, cos, sin, torch.ones(n, n, dtype=torch.bool).tril())
        maps.append(layer_maps)
        if layer.router is not None:
            h = routed(layer, h, cos, sin, chunks, alpha_of(config, layer_idx), lm.rotary_emb,
                       config.router_positions == "rearrange")
    return rms_norm(lm.norm, h), maps, detached


def normalised_image(processor, image):
    """The image as the processor feeds it (no resize at these sizes): `(C, H, W)` float."""
    ip = processor.image_processor
    pixels = torch.tensor(np.asarray(image.convert("RGB")), dtype=torch.float64).permute(2, 0, 1) / 255
    mean, std = torch.tensor(ip.image_mean, dtype=torch.float64), torch.tensor(ip.image_std, dtype=torch.float64)
    return (pixels - mean[:, None, None]) / std[:, None, None]


def densest_window_brute_force(cells, h, w, size):
    """Eq. 7: top-left of the `size x size` window with the most `cells` (row, col); ties to the first row-major."""
    best, where = -1, None
    for top in range(h - size + 1):
        for left in range(w - size + 1):
            count = sum(top <= r < top + size and left <= c < left + size for r, c in cells)
            if count > best:
                best, where = count, (top, left)
    return where


def reconstruction_target(model, processor, image, window, size):
    """Eq. 8: the crop of `window` sliced from the normalised image, resized back to the image's size, patchified
    by the image processor and encoded by the vision tower; mean over its tokens."""
    vision = model.config.vision_config
    cell = vision.patch_size * vision.spatial_merge_size
    frame = normalised_image(processor, image)
    top, left = window
    crop = frame[:, top * cell : (top + size) * cell, left * cell : (left + size) * cell]
    crop = F.interpolate(crop[None].float(), size=frame.shape[-2:], mode="bilinear", align_corners=False)[0]
    inputs = processor.image_processor(images=[crop.permute(1, 2, 0).numpy()], do_resize=False, do_rescale=False,
                                       do_normalize=False, return_tensors="pt", input_data_format="channels_last")
    dtype = next(model.parameters()).dtype
    features = model.model.get_image_features(inputs["pixel_values"].to(dtype), inputs["image_grid_thw"])
    return features.pooler_output[0].mean(dim=0)


def reference_forward(model, processor, image, question, steps, answer_ids):
    """Eqs. 1-13 for one row: logits (aligned like the model's: prompt, latents, end marker, answer), CE, the mean
    reconstruction loss, the total loss and the selected visual-token indices per step."""
    config = model.config
    batch = make_batch(processor, [question], [[image]])
    start = torch.tensor([[config.start_latent_token_id]])
    ids = torch.cat([batch["input_ids"], start], dim=1)
    mask = torch.ones_like(ids)
    types = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(start)], dim=1)
    dtype = next(model.parameters()).dtype
    pixel_values = batch["pixel_values"].to(dtype)

    embeds = model.get_input_embeddings()(ids)[0]
    features = model.model.get_image_features(pixel_values, batch["image_grid_thw"]).pooler_output[0]
    visual_columns = (ids[0] == config.image_token_id).nonzero().squeeze(-1)
    embeds = embeds.index_copy(0, visual_columns, features.to(embeds.dtype))
    prompt_embeds = embeds
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=batch["image_grid_thw"],
                                              attention_mask=mask)
    positions = positions[:, 0]  # (3, P)
    prompt_positions = positions
    next_text = int(positions.max()) + 1
    chunks = [(0, ids.shape[1])]
    _, grid_h, grid_w = batch["image_grid_thw"][0].tolist()
    merged_h, merged_w = grid_h // config.vision_config.spatial_merge_size, grid_w // config.vision_config.spatial_merge_size

    hidden, maps, detached = language_model(model, embeds, positions, chunks)
    visited, selections, recon, latent_columns = set(), [], [], []
    for _ in range(steps):
        saliency = torch.stack([m[:, -1, :] for m in maps]).mean(dim=(0, 1))  # eq. 4
        candidates = [j for j in range(len(visual_columns)) if j not in visited]
        values = saliency.detach().tolist()
        top = sorted(candidates, key=lambda j: -values[visual_columns[j]])[: config.replay_top_k]  # eq. 5
        visited.update(top)
        selections.append(top)
        columns = visual_columns[top]
        weights = saliency[columns].softmax(dim=0)  # eq. 6
        values = prompt_embeds[columns]
        replayed = weights[:, None].to(values.dtype) * values
        if config.recon_grad_to_vision:  # b(t) with its full gradient (the research path)
            pooled = (weights[:, None].to(values.dtype) * values).mean(dim=0)
        else:  # b(t): values only, weights differentiable through the detached-input saliency only
            weights_r = torch.stack(detached).mean(dim=(0, 1))[columns].softmax(dim=0)
            pooled = (weights_r[:, None].to(values.dtype) * values.detach()).mean(dim=0)
        size = min(config.recon_window, merged_h, merged_w)
        window = densest_window_brute_force([divmod(j, merged_w) for j in top], merged_h, merged_w, size)  # eq. 7
        target = reconstruction_target(model, processor, image, window, size).detach()  # eq. 8, a fixed target
        recon.append(F.mse_loss(model.token_sr(pooled), target.to(pooled.dtype)))  # eq. 9
        latent = hidden[-1:]  # eq. 1
        chunk = torch.cat([replayed, latent])
        if config.replay_positions == "image":
            chunk_positions = torch.cat([prompt_positions[:, columns], torch.full((3, 1), next_text)], dim=1)
            next_text += 1
        else:
            chunk_positions = torch.arange(next_text, next_text + len(chunk))[None].expand(3, -1)
            next_text += len(chunk)
        chunks.append((embeds.shape[0], embeds.shape[0] + len(chunk)))
        embeds = torch.cat([embeds, chunk])
        positions = torch.cat([positions, chunk_positions], dim=1)
        latent_columns.append(embeds.shape[0] - 1)
        hidden, maps, detached = language_model(model, embeds, positions, chunks)

    tail_ids = torch.tensor([config.end_latent_token_id, *answer_ids])
    tail = model.get_input_embeddings()(tail_ids)
    tail_positions = torch.arange(next_text, next_text + len(tail_ids))[None].expand(3, -1)
    columns = list(range(ids.shape[1])) + latent_columns + list(range(embeds.shape[0], embeds.shape[0] + len(tail)))
    embeds = torch.cat([embeds, tail])
    positions = torch.cat([positions, tail_positions], dim=1)
    hidden, _, _ = language_model(model, embeds, positions, chunks)  # the answer tokens are not routed
    logits = model.lm_head(hidden[columns])
    labels = torch.full((len(columns),), -100)
    labels[-len(answer_ids):] = torch.tensor(answer_ids)
    ce = F.cross_entropy(logits[:-1], labels[1:])
    recon_loss = torch.stack(recon).mean()
    return {"logits": logits, "ce": ce, "recon": recon_loss, "loss": ce + config.recon_loss_weight * recon_loss,
            "selections": selections}


def model_forward(model, processor, image, question, steps, answer_ids):
    batch = make_batch(processor, [question], [[image]])
    seq = latent_sequence(processor, batch, model.config, steps, answer_ids)
    labels = seq["input_ids"].clone()
    labels[:, : -len(answer_ids)] = -100
    seq["pixel_values"] = seq["pixel_values"].to(next(model.parameters()).dtype)
    return model(**seq, labels=labels)


ANSWER = [40, 41, 42]


# ---- values -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_latent_steps_equal_the_reference(vedas_dir, processor, images, case):
    """Selections (eq. 5), logits through replay and routing (eqs. 1, 6, 10-12), CE, reconstruction (eqs. 7-9) and
    the total loss (eq. 13) equal the reference, for sequential and image positions, kept and rearranged routing
    positions, K >= 2, W >= 2, D = 1 and 2, fixed and cosine alpha, linear and MLP TokenSR."""
    overrides, steps, image_index = CASES[case]
    model = load_case(vedas_dir, overrides)
    image, question = images[image_index], "Which shape is on the left?"
    expected = reference_forward(model, processor, image, question, steps, ANSWER)
    out = model_forward(model, processor, image, question, steps, ANSWER)
    got = [sorted(step["index"][0][step["valid"][0]].tolist()) for step in out.latent_trace]
    assert got == [sorted(s) for s in expected["selections"]]
    torch.testing.assert_close(out.logits[0], expected["logits"], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(out.ce_loss, expected["ce"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.recon_loss, expected["recon"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.loss, expected["loss"], rtol=1e-5, atol=1e-6)
    assert expected["recon"] > 1e-3  # a live term, not a constant


def test_reference_covers_windows_away_from_the_origin_and_alpha_below_the_chunk(vedas_dir, processor, images):
    """The cases above are not degenerate: some window sits away from the top-left corner, and alpha selects a strict
    subset of every latent chunk in the fixed-alpha cases."""
    found = False
    for overrides, steps, image_index in CASES.values():
        model = load_case(vedas_dir, overrides)
        config = model.config
        batch = make_batch(processor, ["Which shape is on the left?"], [[images[image_index]]])
        _, h, w = (batch["image_grid_thw"][0] // torch.tensor([1, 2, 2])).tolist()
        ref = reference_forward(model, processor, images[image_index], "Which shape is on the left?", steps, ANSWER)
        size = min(config.recon_window, h, w)
        for top in ref["selections"]:
            found |= densest_window_brute_force([divmod(j, w) for j in top], h, w, size) != (0, 0)
        if config.router_schedule == "fixed":
            assert config.router_top_k < config.replay_top_k + 1
    assert found


# ---- gradients ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,grad_to_vision", [("sequential-K3-W2-D1-fixed-linear", False),
                                                  ("image-pos-K2-W2-D2-cosine-mlp", False),
                                                  ("sequential-K3-W2-D1-fixed-linear", True)])
def test_gradients_equal_the_reference(vedas_dir, processor, images, case, grad_to_vision):
    """Autograd through the model's cached latent passes equals autograd through the whole-sequence reference, for
    every parameter (the latent chain, the saliency weights and the routers included), with the reconstruction
    loss's stop-gradients (default) and without them (`recon_grad_to_vision=True`)."""
    overrides, steps, image_index = CASES[case]
    model = load_case(vedas_dir, {**overrides, "recon_grad_to_vision": grad_to_vision})
    image, question = images[image_index], "Which shape is on the left?"
    model.zero_grad()
    model_forward(model, processor, image, question, steps, ANSWER).loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference_forward(model, processor, image, question, steps, ANSWER)["loss"].backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=2e-3, atol=2e-6, msg=name)


def test_gradients_equal_finite_differences_of_the_reference_in_float64(vedas_dir, processor, images):
    """In float64, the model's gradient of the total loss equals central finite differences of the reference's loss
    for a router gate, a router score weight, a query weight, a latent-only path (the final norm) and TokenSR.
    With `recon_grad_to_vision=True` (no stop-gradient on any of these parameters' paths) the gradient is the true
    one; the default's stop-gradients are checked against the reference's autograd above."""
    overrides, steps, image_index = CASES["sequential-K3-W2-D1-fixed-linear"]
    model = load_case(vedas_dir, {**overrides, "recon_grad_to_vision": True}, dtype=torch.float64)
    image, question = images[image_index], "Which shape is on the left?"
    model.zero_grad()
    model_forward(model, processor, image, question, steps, ANSWER).loss.backward()
    layers = model.model.language_model.layers
    probes = [
        ("gate", layers[1].router.gate, (0, 3)),
        ("score", layers[2].router.score.weight, (0, 5)),
        ("q_proj", layers[0].self_attn.q_proj.weight, (2, 7)),
        ("norm", model.model.language_model.norm.weight, (4,)),
        ("token_sr", model.token_sr.net.weight, (1, 2)),
    ]
    eps = 1e-5
    with torch.no_grad():
        for name, parameter, index in probes:
            original = parameter[index].item()
            parameter[index] = original + eps
            plus = reference_forward(model, processor, image, question, steps, ANSWER)["loss"].item()
            parameter[index] = original - eps
            minus = reference_forward(model, processor, image, question, steps, ANSWER)["loss"].item()
            parameter[index] = original
            numeric = (plus - minus) / (2 * eps)
            assert abs(numeric) > 1e-8, name
            # the model's losses are computed in float32 (as transformers' loss functions do), hence 1e-4
            assert parameter.grad[index].item() == pytest.approx(numeric, rel=1e-4, abs=1e-9), name


# ---- Coconut-style equivalence ------------------------------------------------------------------------------------


def test_latent_generate_without_replay_and_zero_gates_is_a_coconut_loop_over_the_stock_model(
    vedas_dir, processor, images, stock_class
):
    """With replay off and zero gates (a freshly converted checkpoint), latent `generate` is Coconut over the stock
    model: feed the last hidden state back as the next input embedding T times, then `<|end-latent|>`, then greedy
    decoding, all with the stock model's own forward and cache."""
    from transformers.cache_utils import DynamicCache

    model = AutoModelForImageTextToText.from_pretrained(vedas_dir, replay_mode="none").eval()
    config = model.config
    stock = stock_class(config)
    stock.load_state_dict(model.state_dict(), strict=False)
    stock.eval()
    batch = make_batch(processor, ["Which shape is on the left?"], [[images[1]]])
    steps, new_tokens = 3, 5
    with torch.no_grad():
        ids = torch.cat([batch["input_ids"], torch.tensor([[config.start_latent_token_id]])], dim=1)
        types = torch.cat([batch["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], dim=1)
        mask = torch.ones_like(ids)
        positions, _ = stock.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=batch["image_grid_thw"],
                                                  attention_mask=mask)
        embeds = stock.model.get_input_embeddings()(ids)
        features = torch.cat(stock.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        embeds[ids == config.image_token_id] = features
        cache = DynamicCache(config=config.get_text_config())
        next_position = int(positions.max()) + 1

        def step(inputs_embeds, position_ids, length):
            return stock.model.language_model(inputs_embeds=inputs_embeds, position_ids=position_ids,
                                              attention_mask=torch.ones(1, length, dtype=torch.long), use_cache=True,
                                              **{"cache" if "cache" in stock.model.language_model.forward.__code__.co_varnames
                                                 else "past_key_values": cache}).last_hidden_state

        length = ids.shape[1]
        hidden = step(embeds, positions, length)
        for _ in range(steps):
            length += 1
            hidden = step(hidden[:, -1:], torch.full((3, 1, 1), next_position), length)
            next_position += 1
        token = torch.tensor([[config.end_latent_token_id]])
        tokens = []
        for _ in range(new_tokens):
            length += 1
            hidden = step(stock.model.get_input_embeddings()(token), torch.full((3, 1, 1), next_position), length)
            next_position += 1
            token = stock.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
            tokens.append(int(token))
    out = model.generate(**batch, num_latent_steps=steps, max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=processor.tokenizer.pad_token_id)
    assert out[0, batch["input_ids"].shape[1]:].tolist() == tokens
