# Copyright 2026 The vedas-hf authors. Licensed under the Apache License, Version 2.0.
"""Vedas (Visual Enhanced Depth Scaling) on a Qwen2-VL backbone.

Paper: "Visual Enhanced Depth Scaling for Multimodal Latent Reasoning" (arXiv 2604.10500).

A stock Qwen2-VL with three additions, all active only during the *implicit phase* (prompt prefill and latent
steps); answer tokens run the stock layers:

* Routing Depth Scaling (RDS, eqs. 10-12): selected decoder layers carry a router that picks the top-alpha tokens
  of each routed chunk and runs D extra passes of the same layer over them, attention restricted to the selected
  tokens (causal: earlier chunks' selected tokens are kept per layer), mixed back through a zero-initialised gate.
* Visual replay (SCF-VR, eqs. 4-6): before each latent step the top-K unvisited visual tokens by saliency of the
  last token (computed from its query and the cached keys, no attention maps) are re-inserted, weighted.
* Reconstruction (eqs. 7-9, training only): the densest W x W window of the selected tokens is cropped from
  `pixel_values`, re-encoded by the vision tower and regressed by TokenSR from the pooled replay tokens.

Latent steps run against a KV cache: each step processes only its new tokens (replay + latent). Under activation
checkpointing the backward replay of a layer reads the cache as it was and writes nothing (`LatentPass`).

This file is uploaded to the Hub; it imports only torch, transformers and `configuration_vedas`.
"""

import copy
import inspect
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers import initialization as init
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import ModelOutput
from transformers.utils import GENERATION_CONFIG_NAME, cached_file
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonDecoderLayer,
    ChameleonForConditionalGeneration,
    ChameleonModel,
    ChameleonPreTrainedModel,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLTextModel,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    Qwen2VLDecoderLayer,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
    Qwen2VLPreTrainedModel,
    Qwen2VLTextModel,
    apply_rotary_pos_emb,
    repeat_kv,
    rotate_half,
)

from .configuration_vedas import VedasChameleonConfig, VedasQwen2_5_VLConfig, VedasQwen2VLConfig


# transformers renamed the cache keyword from `past_key_values` (<= 5.2x) to `cache`; detect it once.
CACHE_KWARG = "cache" if "cache" in inspect.signature(Qwen2VLTextModel.forward).parameters else "past_key_values"


def _cache_argument(kwargs: dict):
    """`(name, cache)` of the cache among keyword arguments (`cache` or its older name `past_key_values`, which
    newer transformers still accept); `(CACHE_KWARG, None)` when there is none."""
    for name in (CACHE_KWARG, "past_key_values"):
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return CACHE_KWARG, None


# --------------------------------------------------------------------------------------------------------------
# Per-pass state shared with the decoder layers
# --------------------------------------------------------------------------------------------------------------


class VedasRouterCache:
    """Keys/values of the tokens selected by each router, kept per (layer, depth) and per routed chunk.

    A selected token's restricted attention sees the selected tokens of earlier chunks (read from here) and the
    earlier selected tokens of its own chunk. Each entry holds the concatenation of every chunk up to and including
    its own, so a read is a lookup, not a concatenation. Storing chunk `c` drops the entries of chunks `>= c`, so a
    re-run of a chunk (e.g. a recompute) replaces it instead of duplicating it.
    """

    def __init__(self):
        self._entries: dict[tuple[int, int], list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def past(self, layer_idx: int, depth: int, before_chunk: int):
        """Keys `(batch, kv_heads, m, head_dim)`, values and valid `(batch, m)` of all chunks `< before_chunk`, or
        `None`."""
        for chunk, keys, values, valid in reversed(self._entries.get((layer_idx, depth), [])):
            if chunk < before_chunk:
                return keys, values, valid
        return None

    def extend(self, layer_idx: int, depth: int, chunk: int, keys, values, valid, store: bool = True):
        """Append chunk `chunk`'s selected keys/values `(batch, kv_heads, n, head_dim)` and valid `(batch, n)` to
        those of the earlier chunks; returns the concatenation (earlier chunks first). `store=False` (a checkpoint
        replay) returns it without storing."""
        past = self.past(layer_idx, depth, chunk)
        if past is not None:
            keys = torch.cat([past[0], keys], dim=2)
            values = torch.cat([past[1], values], dim=2)
            valid = torch.cat([past[2], valid], dim=1)
        if store:
            entries = [entry for entry in self._entries.get((layer_idx, depth), []) if entry[0] < chunk]
            self._entries[(layer_idx, depth)] = entries + [(chunk, keys, values, valid)]
        return keys, values, valid


class SaliencyKeyCache:
    """Per decoder layer, the keys of every cached position recomputed from the layer's *detached* inputs:
    `k = RoPE(k_proj(norm(h.detach())))`, kept per pass (chunk index) like `VedasRouterCache`.

    The reconstruction loss weights its pooled replay features by a saliency computed from these keys and a query
    from the detached last hidden state (`recon_grad_to_vision=False`): its gradient then reaches every layer's
    query / key projections and input norm, and nothing upstream of them, so none reaches the vision tower.
    """

    def __init__(self):
        # layer -> [(chunk, keys of every pass up to and including it)]: a read is a lookup, as in VedasRouterCache
        self._entries: dict[int, list[tuple[int, torch.Tensor]]] = {}

    def extend(self, layer_idx: int, chunk: int, keys: torch.Tensor, store: bool = True) -> torch.Tensor:
        """The keys of all passes `< chunk` followed by `keys` `(batch, kv_heads, seq, head_dim)`; `store=False` (a
        checkpoint replay) leaves the cache unchanged."""
        entries = [entry for entry in self._entries.get(layer_idx, []) if entry[0] < chunk]
        if entries:
            keys = torch.cat([entries[-1][1], keys], dim=2)
        if store:
            self._entries[layer_idx] = entries + [(chunk, keys)]
        return keys


class _ReplayLayerCache:
    """The KV cache as one decoder layer sees it when activation checkpointing replays the layer in the backward
    pass: by then the cache also holds every later pass, so the replay reads the first `past_length` keys/values (what
    the layer saw the first time) and appends nothing."""

    def __init__(self, cache, past_length: int):
        self.cache, self.past_length = cache, past_length
        self.keys = None  # the keys of the replayed call, for the saliency replay

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Keys/values `(batch, kv_heads, past_length + seq, head_dim)` of the replayed call, cache unchanged."""
        if self.past_length == 0:
            self.keys = key_states
            return key_states, value_states
        layer = self.cache.layers[layer_idx]
        self.keys = torch.cat([layer.keys[..., : self.past_length, :], key_states], dim=-2)
        return self.keys, torch.cat([layer.values[..., : self.past_length, :], value_states], dim=-2)


class LatentPass:
    """One call of the language model inside the latent forward, against the KV cache shared by all passes.

    Activation checkpointing (`gradient_checkpointing_enable()`, FSDP's or torch's checkpoint wrappers) re-runs each
    decoder layer in the backward pass with the same arguments, this object included. The pass records the cache
    length each layer saw on its first run, so a second run of the same layer is known to be a replay: it reads
    that prefix of the cache and writes nothing (neither KV cache nor router cache), which keeps gradients through
    the cache exact.

    A plain class on purpose: FSDP2 rebuilds the dataclasses, dicts and lists it finds in a layer's arguments when
    it casts them to the compute dtype, and a copy would lose what the layers record here.

    Attributes:
        grad_enabled: whether gradients were on when the pass started.
        past_lengths: layer index -> cache length before that layer's first run in this pass.
    """

    def __init__(self):
        self.grad_enabled = torch.is_grad_enabled()
        self.past_lengths = {}

    def layer_cache(self, cache, layer_idx: int):
        """The cache to hand to layer `layer_idx`'s attention and whether this run is a checkpoint replay."""
        if layer_idx in self.past_lengths:
            return _ReplayLayerCache(cache, self.past_lengths[layer_idx]), True
        if self.grad_enabled and not torch.is_grad_enabled():
            raise ValueError(
                "Reentrant activation checkpointing (use_reentrant=True) runs the layers without gradients, which "
                "cuts the gradient that flows between latent passes through the KV cache. Use "
                "gradient_checkpointing_kwargs={'use_reentrant': False} (the transformers default; TRL switches to "
                "True for PEFT with DeepSpeed ZeRO-3), or turn gradient checkpointing off."
            )
        self.past_lengths[layer_idx] = cache.get_seq_length(layer_idx)
        return cache, False


class VedasPass(LatentPass):
    """What the decoder layers need for one routed forward call (one or several implicit-phase chunks).

    Attributes:
        key_mask: `(batch, past + seq)` bool, keys the last token may attend (saliency softmax mask).
        eligible: `(batch, seq)` bool, tokens of this call that a router may select (non-padding).
        chunks: column ranges `[start, end)` of this call, each routed separately (top-alpha per chunk).
        chunk_index: global index of the first chunk of this call (orders router-cache entries).
        router_cache: selected keys/values of earlier chunks.
        rotary_emb: the text model's rotary embedding (for `router_positions="rearrange"`).
        position_planes: leading dimension of the position ids the rotary embedding takes (3 for M-RoPE, 1 for
            1-D positions, which it takes as `(batch, seq)`).
        capture_saliency: whether each layer records the last token's attention over all keys.
        saliency: filled by the layers: layer index -> `(batch, past + seq)` head-averaged attention row.
        saliency_keys: a `SaliencyKeyCache` when the layers should also record `detached_saliency`, the same row
            with gradient to the query / key projections only (the reconstruction loss's weights); else `None`.
    """

    def __init__(self, *, key_mask: torch.Tensor, eligible: torch.Tensor, chunks: list, chunk_index: int,
                 router_cache: VedasRouterCache, config: VedasQwen2VLConfig, rotary_emb: nn.Module,
                 position_planes: int = 3, capture_saliency: bool = True,
                 saliency_keys: SaliencyKeyCache | None = None):
        super().__init__()
        self.key_mask, self.eligible, self.chunks, self.chunk_index = key_mask, eligible, chunks, chunk_index
        self.router_cache, self.config, self.rotary_emb = router_cache, config, rotary_emb
        self.position_planes = position_planes
        self.capture_saliency = capture_saliency
        self.saliency_keys = saliency_keys if capture_saliency else None
        self.saliency, self.detached_saliency = {}, {}
        self._memo = {}

    def mean_saliency(self, detached: bool = False) -> torch.Tensor:
        """Eq. 4 restricted to the last token: mean over layers and heads, `(batch, past + seq)` (0 for a row
        without any attendable key). `detached=True`: the same from `detached_saliency`."""
        rows = self.detached_saliency if detached else self.saliency
        return torch.stack([rows[i] for i in sorted(rows)]).mean(0).nan_to_num(0.0)

    def masked_keys(self) -> torch.Tensor:
        """`(batch, 1, past + seq)` bool, keys the last token may not attend (computed once per pass)."""
        if "masked_keys" not in self._memo:
            self._memo["masked_keys"] = ~self.key_mask[:, None, :]
        return self._memo["masked_keys"]

    def causal_masks(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower-triangular and identity `(n, n)` bool masks (built once per pass and size, shared by the layers)."""
        if n not in self._memo:
            self._memo[n] = (
                torch.ones(n, n, dtype=torch.bool, device=device).tril(),
                torch.eye(n, dtype=torch.bool, device=device),
            )
        return self._memo[n]


# --------------------------------------------------------------------------------------------------------------
# Routing Depth Scaling
# --------------------------------------------------------------------------------------------------------------


class VedasRouter(nn.Module):
    """Per-layer router (eq. 10) and step-aware gate e(d) (eq. 12).

    `score` maps a hidden state to a scalar importance; `gate` `(depth, hidden)` scales each depth's refinement and
    is zero-initialised so a freshly converted checkpoint equals the stock model.
    """

    def __init__(self, hidden_size: int, depth: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        self.gate = nn.Parameter(torch.zeros(depth, hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(batch, seq, hidden)` -> router logits `(batch, seq)`."""
        return self.score(hidden_states).squeeze(-1)


def select_top_alpha(scores: torch.Tensor, eligible: torch.Tensor, chunks: list, alpha: int):
    """Top-alpha eligible tokens of each chunk, returned in position order.

    Args:
        scores: `(batch, seq)` router logits.
        eligible: `(batch, seq)` bool; padding is never selected.
        chunks: column ranges `[start, end)`; each contributes `min(alpha, end - start)` slots.
    Returns:
        index `(batch, n)` long, ascending; valid `(batch, n)` bool (False where a chunk had fewer eligible tokens).
    """
    indices, valids = [], []
    for start, end in chunks:
        k = min(alpha, end - start)
        chunk_scores = scores[:, start:end].masked_fill(~eligible[:, start:end], float("-inf"))
        top = chunk_scores.topk(k, dim=-1)
        index, order = (top.indices + start if start else top.indices).sort(dim=-1)
        indices.append(index)
        valids.append(torch.isfinite(top.values.gather(-1, order)))
    if len(chunks) == 1:
        return indices[0], valids[0]
    return torch.cat(indices, dim=1), torch.cat(valids, dim=1)


class _BackwardAfter(torch.autograd.Function):
    """`output` unchanged (a copy); in the backward pass, `other`'s own backward waits for `output`'s gradient.

    The saliency leaves a decoder layer outside its output, and its backward needs the layer's weights (`q_proj`).
    FSDP and DeepSpeed ZeRO-3 gather a layer's sharded weights when the gradient of the layer's *output* arrives and
    free them after the layer's backward; tying the saliency to the output keeps its backward inside that window.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        ctx.other_shape, ctx.other_dtype = other.shape, other.dtype
        return output.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_zeros(ctx.other_shape, dtype=ctx.other_dtype)


def _replay_weights(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Eq. 6: softmax over the valid selected saliency `scores` `(batch, K)`; a row without any valid slot gets
    zeros. The row is filled with finite values before the softmax so that its gradient is zero, not NaN."""
    scores = scores.masked_fill(~valid, float("-inf"))
    return scores.masked_fill(~valid.any(-1, keepdim=True), 0.0).softmax(dim=-1) * valid


def _gather_tokens(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`(batch, seq, dim)` gathered at `(batch, n)` -> `(batch, n, dim)`."""
    return tensor.gather(1, index.unsqueeze(-1).expand(-1, -1, tensor.shape[-1]))


class VedasDecoderLayerMixin:
    """Mixed into a Qwen2-VL / Qwen2.5-VL decoder layer: the layer can (a) report the last token's attention row for visual saliency and
    (b) when it carries a router, refine the top-alpha tokens of each routed chunk with D extra passes.

    Without a `vedas_pass` keyword argument it is exactly the stock layer.
    """

    # The cache survives transformers' gradient checkpointing here: a latent pass makes its replays read-only (see
    # `LatentPass`), and a stock call drops it below, as transformers does for layers that write the cache.
    _can_checkpoint_with_cache = True

    def __init__(self, config, layer_idx: int, router_depth: int | None = None):
        super().__init__(config, layer_idx)
        self.layer_idx = layer_idx
        self.router = VedasRouter(config.hidden_size, router_depth) if router_depth else None

    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        vedas_pass = kwargs.pop("vedas_pass", None)
        cache_name, cache = _cache_argument(kwargs)
        replay = False
        if cache is not None and vedas_pass is not None and (torch.is_grad_enabled() or vedas_pass.grad_enabled):
            kwargs[cache_name], replay = vedas_pass.layer_cache(cache, self.layer_idx)
        elif cache is not None and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            kwargs[cache_name] = None  # a stock call: its replay would append to the cache a second time
        output = super().forward(
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if not isinstance(vedas_pass, VedasPass):
            return output
        if isinstance(output, tuple):  # Chameleon's layers return `(hidden_states,)`
            return (self._vedas_refine(output[0], hidden_states, position_embeddings, kwargs, cache_name, cache,
                                       vedas_pass, replay), *output[1:])
        return self._vedas_refine(output, hidden_states, position_embeddings, kwargs, cache_name, cache, vedas_pass,
                                  replay)

    def _vedas_refine(self, output, hidden_states, position_embeddings, kwargs, cache_name, cache, vedas_pass, replay):
        """Routing (when the layer has a router) and saliency capture on the stock layer's `output`
        `(batch, seq, hidden)`; `hidden_states` is the layer's input."""
        if self.router is not None:
            output = self._route(output, position_embeddings, vedas_pass, store=not replay)
        if vedas_pass.capture_saliency:
            # The saliency is differentiable (eq. 6 weights the replayed tokens by it, so the CE and reconstruction
            # losses reach the queries and keys). A checkpoint replay recomputes it from the keys of the replayed
            # call, the same values in the same op order as the first run (what non-reentrant checkpointing checks),
            # and keeps the first run's result.
            keys = kwargs[cache_name].keys if replay else cache.layers[self.layer_idx].keys
            saliency = self._last_token_attention(hidden_states, position_embeddings, keys, vedas_pass.masked_keys())
            if not replay:
                vedas_pass.saliency[self.layer_idx] = saliency
            if saliency.requires_grad:
                output = _BackwardAfter.apply(output, saliency)
            if vedas_pass.saliency_keys is not None:
                output = self._detached_saliency(output, hidden_states, position_embeddings, vedas_pass, replay)
        return output

    def _detached_saliency(self, output, hidden_states, position_embeddings, vedas_pass, replay):
        """Record the last token's attention row computed from this layer's detached inputs (`SaliencyKeyCache`):
        the same values as the saliency, with gradient to `q_proj`, `k_proj` and the input norm only."""
        detached = hidden_states.detach()
        keys = self._project("k", self.input_layernorm(detached))
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)  # (B, 1, seq, hd)
        keys = vedas_pass.saliency_keys.extend(
            self.layer_idx, vedas_pass.chunk_index, keys * cos + rotate_half(keys) * sin, store=not replay
        )
        saliency = self._last_token_attention(detached, position_embeddings, keys, vedas_pass.masked_keys())
        if not replay:
            vedas_pass.detached_saliency[self.layer_idx] = saliency
        return _BackwardAfter.apply(output, saliency) if saliency.requires_grad else output

    def _project(self, name: str, normed: torch.Tensor) -> torch.Tensor:
        """The attention's `"q"`, `"k"` or `"v"` heads of normed inputs `(batch, seq, hidden)`, as the stock attention
        computes them before RoPE: `(batch, heads, seq, head_dim)`."""
        attn = self.self_attn
        batch, seq, _ = normed.shape
        return getattr(attn, f"{name}_proj")(normed).view(batch, seq, -1, attn.head_dim).transpose(1, 2)

    # ---- saliency (eq. 4 for the last token, from its query and the cached keys) ----------------------------

    def _last_token_attention(self, hidden_states, position_embeddings, keys, masked_keys):
        """Head-averaged attention of the last token over every cached key: `(batch, past + seq)`.

        Recomputes the last token's query (one token) against `keys` `(batch, kv_heads, past + seq, head_dim)`, the
        keys this layer just wrote to the cache, so it needs neither attention maps nor eager attention:
        O(heads x keys) memory. Differentiable with respect to the query and the keys, as attention maps are.
        `masked_keys` `(batch, 1, past + seq)` marks the keys it may not attend; a row without any key comes out NaN
        (the caller zeroes it).
        """
        attn = self.self_attn
        batch = hidden_states.shape[0]
        query = self._project("q", self.input_layernorm(hidden_states[:, -1:]))  # (B, H, 1, hd)
        cos, sin = (t[:, None, -1:] for t in position_embeddings)  # (B, 1, 1, hd)
        query = query * cos + rotate_half(query) * sin
        # keys (B, Hkv, P, hd) read in place (no repeat / upcast copies)
        query = query.reshape(batch, keys.shape[1], -1, attn.head_dim).to(keys.dtype)  # (B, Hkv, G, hd)
        logits = (query @ keys.transpose(-1, -2)).flatten(1, 2).float() * attn.scaling  # (B, H, P)
        return logits.masked_fill(masked_keys, float("-inf")).softmax(dim=-1).mean(dim=1)

    # ---- routing depth scaling (eqs. 10-12) ------------------------------------------------------------------

    def _route(self, hidden_states, position_embeddings, vedas_pass: VedasPass, store: bool = True):
        """Refine the top-alpha tokens of each chunk of `hidden_states` `(batch, seq, hidden)`.

        h^(d) = s * f_restricted(h^(d-1)) on the selected tokens (eq. 11, s = sigmoid(router logit)), and the
        layer output becomes H^(0) + sum_d e(d) * h^(d) on the selected tokens only (eq. 12). `store=False` (a
        checkpoint replay) leaves the router cache unchanged.
        """
        alpha = vedas_pass.config.router_alpha(self.layer_idx)
        depths = self.router.gate.shape[0]
        state, output = hidden_states, hidden_states
        for depth in range(depths):
            logits = self.router(state)
            index, valid = select_top_alpha(logits, vedas_pass.eligible, vedas_pass.chunks, alpha)
            selected = _gather_tokens(state, index)
            cos, sin = self._selected_rotary(position_embeddings, index, valid, depth, vedas_pass)
            refined = self._restricted_pass(selected, cos, sin, valid, depth, vedas_pass, store)
            # s * valid: invalid slots (fewer eligible tokens than alpha) contribute nothing
            scale = (torch.sigmoid(logits.gather(1, index)) * valid).unsqueeze(-1).to(refined.dtype)  # (B, n, 1)
            refined = scale * refined  # h^(d), eq. 11
            scatter_index = index.unsqueeze(-1).expand_as(refined)
            output = output.scatter_add(1, scatter_index, refined * self.router.gate[depth].to(refined.dtype))
            if depth + 1 < depths:  # the next depth refines h^(d); invalid slots keep their input
                state = state.scatter(1, scatter_index, torch.where(valid.unsqueeze(-1), refined, selected))
        return output

    def _selected_rotary(self, position_embeddings, index, valid, depth, vedas_pass):
        """cos/sin `(batch, n, head_dim)` of the selected tokens: their own (`keep`) or re-indexed (`rearrange`)."""
        if vedas_pass.config.router_positions == "keep":
            cos, sin = position_embeddings
            return _gather_tokens(cos, index), _gather_tokens(sin, index)
        past = vedas_pass.router_cache.past(self.layer_idx, depth, vedas_pass.chunk_index)
        offset = past[2].sum(dim=1, keepdim=True) if past is not None else 0
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0) + offset  # (B, n)
        if vedas_pass.position_planes > 1:  # M-RoPE: text positions on every plane
            positions = positions.unsqueeze(0).expand(vedas_pass.position_planes, -1, -1)
        return vedas_pass.rotary_emb(position_embeddings[0], positions)

    def _restricted_pass(self, selected, cos, sin, valid, depth, vedas_pass, store=True):
        """The layer's transformation f over the selected tokens only: `(batch, n, hidden)` -> same.

        Attention: a selected token sees the valid selected tokens of earlier chunks and the earlier (or same)
        selected tokens of its own call, in position order. Invalid slots only see themselves; their output is
        discarded by the caller.
        """
        attn = self.self_attn
        batch, n, _ = selected.shape
        normed = self.input_layernorm(selected)
        query, keys, values = (self._project(name, normed) for name in ("q", "k", "v"))
        query, keys = apply_rotary_pos_emb(query, keys, cos, sin)
        keys, values, key_valid = vedas_pass.router_cache.extend(
            self.layer_idx, depth, vedas_pass.chunk_index, keys, values, valid, store
        )  # earlier chunks' selected tokens first: (B, Hkv, m, hd), (B, m)
        tril, eye = vedas_pass.causal_masks(n, selected.device)
        mask = tril & (valid[:, None, :] | eye)  # (B, n, n): causal among valid slots, every slot sees itself
        past = keys.shape[2] - n
        if past:
            mask = torch.cat([key_valid[:, None, :past].expand(-1, n, -1), mask], dim=2)
        out = F.scaled_dot_product_attention(
            query,
            repeat_kv(keys, attn.num_key_value_groups),
            repeat_kv(values, attn.num_key_value_groups),
            attn_mask=mask[:, None],
            scale=attn.scaling,
        )
        hidden = selected + attn.o_proj(out.transpose(1, 2).reshape(batch, n, -1))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class VedasQwen2VLDecoderLayer(VedasDecoderLayerMixin, Qwen2VLDecoderLayer):
    """Qwen2-VL decoder layer with Vedas saliency capture and an optional router (see [`VedasDecoderLayerMixin`])."""


class VedasQwen2_5_VLDecoderLayer(VedasDecoderLayerMixin, Qwen2_5_VLDecoderLayer):
    """Qwen2.5-VL decoder layer with Vedas saliency capture and an optional router (see [`VedasDecoderLayerMixin`])."""


class VedasChameleonDecoderLayer(VedasDecoderLayerMixin, ChameleonDecoderLayer):
    """Chameleon decoder layer with Vedas saliency capture and an optional router (see [`VedasDecoderLayerMixin`]);
    its queries and keys pass Chameleon's per-head LayerNorms (`q_norm`, `k_norm`) before RoPE, as in the stock
    attention."""

    def _project(self, name: str, normed: torch.Tensor) -> torch.Tensor:
        heads = super()._project(name, normed)  # (B, H, seq, hd)
        if name == "v":
            return heads
        norm = self.self_attn.q_norm if name == "q" else self.self_attn.k_norm  # weights (H, hd)
        return norm(heads.transpose(1, 2)).transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


class VedasTextModelMixin:
    """Mixed into a Qwen2-VL / Qwen2.5-VL language model: its decoder layers become `vedas_layer_class` layers,
    those listed in `router_layers` carrying a router of depth `router_depth`."""

    vedas_layer_class = None

    def __init__(self, config, router_layers=(), router_depth: int = 1):
        super().__init__(config)
        routed = set(router_layers)
        self.layers = nn.ModuleList(
            self.vedas_layer_class(config, i, router_depth if i in routed else None)
            for i in range(config.num_hidden_layers)
        )
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, VedasRouter):
            init.normal_(module.score.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.score.bias)
            init.zeros_(module.gate)
        else:
            super()._init_weights(module)


class VedasModelMixin:
    """Mixed into a Qwen2-VL / Qwen2.5-VL backbone: stock vision tower + Vedas language model."""

    vedas_pretrained_class = None  # the backbone's PreTrainedModel base (its __init__ is called directly)
    vedas_vision_class = None
    vedas_text_class = None

    def __init__(self, config):
        config.check_vedas_fields()  # from_pretrained sets its keyword arguments after the config's own checks
        self.vedas_pretrained_class.__init__(self, config)
        self.visual = self.vedas_vision_class._from_config(config.vision_config)
        self.language_model = self.vedas_text_class._from_config(
            config.text_config, router_layers=config.router_layer_indices, router_depth=config.router_depth
        )
        self.rope_deltas = None
        self.post_init()


class VedasQwen2VLTextModel(VedasTextModelMixin, Qwen2VLTextModel):
    """Qwen2-VL language model whose decoder layers are [`VedasQwen2VLDecoderLayer`]s."""

    vedas_layer_class = VedasQwen2VLDecoderLayer


class VedasQwen2VLModel(VedasModelMixin, Qwen2VLModel):
    """Qwen2-VL backbone (vision tower + Vedas language model)."""

    config_class = VedasQwen2VLConfig
    vedas_pretrained_class = Qwen2VLPreTrainedModel
    vedas_vision_class = Qwen2VisionTransformerPretrainedModel
    vedas_text_class = VedasQwen2VLTextModel


class VedasQwen2_5_VLTextModel(VedasTextModelMixin, Qwen2_5_VLTextModel):
    """Qwen2.5-VL language model whose decoder layers are [`VedasQwen2_5_VLDecoderLayer`]s."""

    vedas_layer_class = VedasQwen2_5_VLDecoderLayer


class VedasQwen2_5_VLModel(VedasModelMixin, Qwen2_5_VLModel):
    """Qwen2.5-VL backbone (window-attention vision tower + Vedas language model)."""

    config_class = VedasQwen2_5_VLConfig
    vedas_pretrained_class = Qwen2_5_VLPreTrainedModel
    vedas_vision_class = Qwen2_5_VisionTransformerPretrainedModel
    vedas_text_class = VedasQwen2_5_VLTextModel


class VedasChameleonModel(VedasTextModelMixin, ChameleonModel):
    """Chameleon backbone (frozen VQ-VAE + Vedas decoder stack): the language model and the image tokenizer in one
    module, as in stock Chameleon."""

    config_class = VedasChameleonConfig
    vedas_layer_class = VedasChameleonDecoderLayer

    def __init__(self, config):
        config.check_vedas_fields()  # from_pretrained sets its keyword arguments after the config's own checks
        super().__init__(config, router_layers=config.router_layer_indices, router_depth=config.router_depth)

    @property
    def language_model(self) -> "VedasChameleonModel":
        """The decoder stack, which for Chameleon is this module itself (Qwen backbones hold it as a submodule), so
        `model.model.language_model.layers` reaches the decoder layers on every backbone."""
        return self


class TokenSR(nn.Module):
    """Token super-resolution F_SR (eq. 9, table 4): `(..., hidden)` -> `(..., hidden)`."""

    def __init__(self, hidden_size: int, kind: str):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(hidden_size, hidden_size)
        else:
            self.net = nn.Sequential(
                nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
            )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


@dataclass
class VedasCausalLMOutput(ModelOutput):
    """Output of [`VedasQwen2VLForConditionalGeneration.forward`] on sequences with latent tokens.

    Attributes:
        loss: `ce_loss + recon_loss_weight * recon_loss` (eq. 13), when `labels` are given.
        logits: `(batch, seq, vocab)` aligned with `input_ids` (replayed tokens removed, so labels line up).
        ce_loss: next-token cross entropy.
        recon_loss: mean over latent steps of the TokenSR reconstruction MSE (eq. 9), training only.
        latent_trace: per latent step, the replay selections (see `VedasQwen2VLForConditionalGeneration`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    recon_loss: torch.Tensor | None = None
    latent_trace: list | None = None


@dataclass
class ImplicitPhase:
    """State after the prompt prefill and the latent steps.

    Attributes:
        cache: KV cache holding prompt, replayed tokens and latents.
        attention_mask: `(batch, cached_len)` long mask over the cache.
        latent_hidden: `(batch, steps, hidden)` last hidden state of each latent pass.
        prompt_hidden: `(batch, prompt_len, hidden)` final hidden states of the prompt.
        last_hidden: `(batch, hidden)` hidden state of the last processed token.
        rope_deltas: `(batch, 1)` M-RoPE offset of what follows the latent phase: its positions are
            cumsum(attention_mask) - 1 + delta (the prompt's offset, minus the replayed tokens with
            `replay_positions="image"`, which do not advance the text positions).
        inserted: `(batch, inserted_len)` long mask of the inserted tokens (replay + latents), in cache order.
        trace: per step dicts with `index` `(batch, K)` visual-token indices, `valid` `(batch, K)` and `pooled`
            `(batch, hidden)` = Pool(B(t)) (the TokenSR input).
        recon_losses: per step scalar losses (training with `pixel_values`).
    """

    cache: object
    attention_mask: torch.Tensor
    latent_hidden: torch.Tensor
    prompt_hidden: torch.Tensor
    last_hidden: torch.Tensor
    rope_deltas: torch.Tensor
    inserted: torch.Tensor
    trace: list
    recon_losses: list


class VedasForConditionalGenerationMixin:
    """Vedas latent reasoning, mixed into a Qwen2-VL / Qwen2.5-VL `ForConditionalGeneration` class.

    * `forward(input_ids, ...)` on sequences *without* `<|latent|>` tokens is the stock forward. With latent tokens
      (a contiguous block after the prompt, aligned across the batch; rows may pad the tail of the block) it runs
      the latent passes: prompt prefill, one cached pass per latent (replay tokens + latent, whose input embedding
      is the previous pass's last hidden state, eq. 1), then the rest of the sequence with the stock layers.
    * `generate(..., num_latent_steps=T)` runs the same implicit phase, then decodes the answer with the stock
      generation loop. Output layout is the stock one: prompt ids then answer ids.
    """

    vedas_pretrained_class = None  # the backbone's PreTrainedModel base (its __init__ is called directly)
    vedas_model_class = None
    vedas_position_planes = 3  # leading dimension of the position ids: 3 for M-RoPE (t, h, w), 1 for 1-D RoPE

    def __init__(self, config):
        self.vedas_pretrained_class.__init__(self, config)
        self.model = self.vedas_model_class(config)
        text = config.get_text_config()
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.token_sr = TokenSR(text.hidden_size, config.token_sr)
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Stock `save_pretrained`; when the class is registered for auto classes, `auto_map` also maps `AutoModel`
        to the backbone class (the file holding both classes is copied once). A `num_latent_steps` set on the
        model's generation config is kept: transformers drops unknown fields when it reloads a generation config
        marked as derived from the model config, so that mark is cleared once the config holds its own step count."""
        generation_config = getattr(self, "generation_config", None)
        if getattr(generation_config, "num_latent_steps", None) is not None:
            generation_config._from_model_config = False
        if getattr(self, "_auto_class", None) is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", f"{module}.{self.vedas_model_class.__name__}")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def load_adapter(self, peft_model_id=None, *args, **kwargs):
        """transformers' PEFT integration (also what `from_pretrained(adapter_folder)` calls), then the adapter's
        latent-step count: `VedasSFTTrainer` saves it in a `generation_config.json` next to an adapter, and an adapter
        loaded onto its base would otherwise run the base config's `num_latent_steps`."""
        result = super().load_adapter(peft_model_id, *args, **kwargs)
        if peft_model_id is not None:  # a folder or Hub id (not a state dict)
            hub = {k: v for k, v in {**kwargs, **(kwargs.get("adapter_kwargs") or {})}.items()
                   if k in ("revision", "token", "cache_dir", "local_files_only", "subfolder")}
            found = cached_file(peft_model_id, GENERATION_CONFIG_NAME, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False, **hub)
            # the raw file: `GenerationConfig.from_pretrained` drops unknown fields of a config derived from the model's
            steps = self.config_class.get_config_dict(found)[0].get("num_latent_steps") if found else None
            if steps is not None:
                self.config.num_latent_steps = steps
                self.generation_config.num_latent_steps = steps
        return result

    # ---- backbone specifics (overridden by the Chameleon class) -----------------------------------------------

    @property
    def _vedas_language_model(self) -> nn.Module:
        """The decoder stack the latent passes call with `inputs_embeds` (it holds `layers` and `rotary_emb`)."""
        return self.model.language_model

    def _token_grids(self, image_grid_thw, pixel_values) -> list:
        """`(t, h, w)` of every image in visual tokens (merged patches), in processor order; None without images."""
        if image_grid_thw is None:
            return None
        return merged_grids(image_grid_thw, self.config.vision_config.spatial_merge_size)

    def _vedas_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits `(..., vocab)` of final-norm hidden states, as the stock forward computes them."""
        return self.lm_head(hidden)

    def _decoding_inputs(self, extended_mask, rope_deltas) -> dict:
        """Arguments that make the stock generation loop continue the positions of the latent phase: Qwen's
        `get_rope_index` offset is kept on the model (`rope_deltas`, which its decoding steps add)."""
        self.model.rope_deltas = rope_deltas
        return {}

    def _stock_forward(self, **inputs):
        """The backbone's own forward (what `forward` runs for sequences without latents)."""
        return super().forward(**inputs)

    # ---- embeddings and positions -----------------------------------------------------------------------------

    def _prompt_embeddings(self, input_ids, pixel_values, image_grid_thw):
        """Token embeddings with the vision features scattered into the image placeholders: `(batch, seq, hidden)`."""
        embeds = self.model.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        features = self.model.get_image_features(pixel_values, image_grid_thw).pooler_output
        features = torch.cat(features, dim=0).to(embeds.device, embeds.dtype)
        image_mask, _ = self.model.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=features)
        return embeds.masked_scatter(image_mask, features)

    def _prompt_positions(self, input_ids, attention_mask, image_grid_thw, mm_token_type_ids):
        """M-RoPE positions `(3, batch, seq)` of the prompt and the offset `(batch, 1)` for what follows it."""
        if image_grid_thw is not None:
            if mm_token_type_ids is None:
                mm_token_type_ids = (input_ids == self.config.image_token_id).int()
            return self.model.get_rope_index(
                input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
                attention_mask=attention_mask,
            )
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        deltas = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
        return positions.unsqueeze(0).expand(self.vedas_position_planes, -1, -1), deltas

    def _positions_after_prompt(self, full_mask, new_len, rope_deltas):
        """Sequential text positions `(planes, batch, new_len)` of the last `new_len` columns of `full_mask`."""
        positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_len:] + rope_deltas
        return positions.unsqueeze(0).expand(self.vedas_position_planes, -1, -1)

    def _chunk_positions(self, position_mask, chunk_mask, prompt_positions, replay_columns, rope_deltas):
        """Positions `(planes, batch, n)` of a latent-step chunk (`n` = replayed tokens + the latent) and the grown
        `position_mask` `(batch, cached_len + n)`, which marks the columns that advance the text positions.

        Without `replay_columns` (`"sequential"` replay positions, or no replay) every valid column of the chunk
        takes the next text position. With them (`"image"`), the replayed tokens take the prompt's M-RoPE positions
        at `replay_columns` `(batch, n - 1)` (their prompt columns) and only the latent advances the text positions.
        """
        if replay_columns is None:
            position_mask = torch.cat([position_mask, chunk_mask], dim=1)
            return self._positions_after_prompt(position_mask, chunk_mask.shape[1], rope_deltas), position_mask
        position_mask = torch.cat([position_mask, torch.zeros_like(chunk_mask[:, :-1]), chunk_mask[:, -1:]], dim=1)
        latent = self._positions_after_prompt(position_mask, 1, rope_deltas)  # (planes, batch, 1)
        planes = prompt_positions.shape[0]
        columns = replay_columns.unsqueeze(0).expand(planes, -1, -1)
        replayed = prompt_positions.gather(2, columns)  # (planes, batch, n - 1)
        return torch.cat([replayed, latent], dim=2), position_mask

    # ---- one cached pass through the language model ---------------------------------------------------------

    def _language_pass(self, embeds, positions, full_mask, cache, vedas_pass: LatentPass | None = None):
        """Run `embeds` `(batch, seq, hidden)` against `cache` (which it extends); returns final-norm hidden states
        `(batch, seq, hidden)`. `vedas_pass` defaults to a stock-layer pass."""
        out = self._vedas_language_model(
            inputs_embeds=embeds, attention_mask=full_mask,
            position_ids=positions if self.vedas_position_planes > 1 else positions[0],
            vedas_pass=LatentPass() if vedas_pass is None else vedas_pass,
            # the cache is passed in: `use_cache` would only create one, and makes checkpointed layers warn
            use_cache=False, **{CACHE_KWARG: cache},
        )
        return out.last_hidden_state

    def _routed_pass(self, embeds, positions, full_mask, cache, router_cache, eligible, chunks, chunk_index,
                     capture_saliency=True, saliency_keys=None):
        """A routed (implicit-phase) pass over one or several chunks; returns hidden states, the saliency
        `(batch, cached_len)` of the last token (`None` without `capture_saliency`) and, with a `SaliencyKeyCache`
        as `saliency_keys`, the same row from the layers' detached inputs (else `None`)."""
        vedas_pass = VedasPass(
            key_mask=full_mask.bool(),
            eligible=eligible,
            chunks=chunks,
            chunk_index=chunk_index,
            router_cache=router_cache,
            config=self.config,
            rotary_emb=self._vedas_language_model.rotary_emb,
            position_planes=self.vedas_position_planes,
            capture_saliency=capture_saliency,
            saliency_keys=saliency_keys,
        )
        hidden = self._language_pass(embeds, positions, full_mask, cache, vedas_pass)
        if not capture_saliency:
            return hidden, None, None
        detached = vedas_pass.mean_saliency(detached=True) if saliency_keys is not None else None
        return hidden, vedas_pass.mean_saliency(), detached

    # ---- visual replay (eqs. 4-6) ---------------------------------------------------------------------------

    def _replay_tokens(self, saliency, visual_pos, visual_valid, visited, prompt_embeds, active, top_k,
                       detached_saliency=None):
        """Select the top-K unvisited visual tokens and build the replay tokens B(t).

        Args:
            saliency: `(batch, cached_len)` last-token attention; its first `prompt_len` columns are the prompt.
            detached_saliency: the same row from the layers' detached inputs (`SaliencyKeyCache`), or `None`. When
                given, the weights of `pooled` take their gradient from it (their values stay those of eq. 6).
            visual_pos: `(batch, Nv)` prompt column of each visual token; visual_valid `(batch, Nv)` bool.
            visited: `(batch, Nv)` bool, tokens replayed at earlier steps.
            prompt_embeds: `(batch, prompt_len, hidden)` prompt input embeddings (vision features at image slots).
            active: `(batch,)` bool, rows that run this latent step.
        Returns:
            tokens `(batch, n, hidden)`, tokens_valid `(batch, n)`, index `(batch, K)` into the visual tokens,
            index_valid `(batch, K)`, pooled `(batch, hidden)` = Pool(B(t)).
        """
        scores = saliency.gather(1, visual_pos).masked_fill(~(visual_valid & ~visited), float("-inf"))
        top = scores.topk(top_k, dim=-1)
        index = top.indices
        index_valid = torch.isfinite(top.values) & active[:, None]
        weights = _replay_weights(top.values, index_valid)  # eq. 6 (zeros for an inactive or all-visited row)
        visual = _gather_tokens(prompt_embeds, visual_pos.gather(1, index))  # (B, K, hidden)
        weights = weights.unsqueeze(-1).to(visual.dtype)  # (B, K, 1)
        weighted = weights * visual
        # b(t) = Pool(B(t)), the TokenSR input. Its target is the vision tower's own encoding of the crop, so by default
        # the visual features enter it as values only and its weights take their gradient from the saliency of the
        # layers' detached inputs: the loss reaches TokenSR and every layer's queries and keys, never the tower.
        pooled_visual = visual if self.config.recon_grad_to_vision else visual.detach()
        pooled_weights = weights
        if detached_saliency is not None:
            detached = _replay_weights(detached_saliency.gather(1, visual_pos).gather(1, index), index_valid)
            detached = detached.unsqueeze(-1).to(visual.dtype)
            pooled_weights = weights.detach() + (detached - detached.detach())  # values of eq. 6, gradient of these
        count = index_valid.sum(dim=1, keepdim=True).clamp(min=1)
        pooled = (pooled_weights * pooled_visual).sum(dim=1) / count.to(visual.dtype)  # (B, hidden)
        if self.config.replay_mode == "soft_mix":
            return weighted.sum(dim=1, keepdim=True), index_valid.any(dim=1, keepdim=True), index, index_valid, pooled
        return weighted, index_valid, index, index_valid, pooled

    # ---- the implicit phase -----------------------------------------------------------------------------------

    def _implicit_phase(
        self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, step_active,
        compute_recon=False, latent_inputs="hidden",
    ) -> ImplicitPhase:
        """Prompt prefill and `step_active.shape[1]` latent steps with visual replay, against one KV cache.

        Args:
            input_ids: `(batch, prompt_len)` left-padded prompt (incl. `<|start-latent|>` if used).
            attention_mask: `(batch, prompt_len)`.
            step_active: `(batch, steps)` bool, which rows run each latent step (ragged latent counts).
            compute_recon: also compute the reconstruction loss of every step (needs `pixel_values`).
            latent_inputs: `"hidden"` (eq. 1: each latent's input is the previous pass's last hidden state) or
                `"zeros"` (a probe: zero vectors instead, so the latents carry no computed state).
        """
        config = self.config
        attention_mask = attention_mask.long()
        prompt_embeds = self._prompt_embeddings(input_ids, pixel_values, image_grid_thw)
        positions, rope_deltas = self._prompt_positions(input_ids, attention_mask, image_grid_thw, mm_token_type_ids)
        cache = DynamicCache(config=config.get_text_config())
        router_cache = VedasRouterCache()
        steps = step_active.shape[1]
        replay = config.replay_mode != "none"
        # the reconstruction loss's saliency weights, from the layers' detached inputs (see `_replay_tokens`)
        saliency_keys = (SaliencyKeyCache() if compute_recon and replay and not config.recon_grad_to_vision
                         and torch.is_grad_enabled() else None)
        prompt_hidden, saliency, detached_saliency = self._routed_pass(
            prompt_embeds, positions, attention_mask, cache, router_cache,
            attention_mask.bool(), [(0, input_ids.shape[1])], 0, capture_saliency=replay and steps > 0,
            saliency_keys=saliency_keys,
        )

        visual_pos, visual_valid = _visual_positions(input_ids == config.image_token_id)
        visited = torch.zeros_like(visual_valid)
        top_k = min(config.replay_top_k, visual_pos.shape[1]) if config.replay_mode != "none" else 0
        full_mask, position_mask, last_hidden = attention_mask, attention_mask, prompt_hidden[:, -1]
        latent_hidden, inserted, trace, recon_losses = [], [], [], []
        for step in range(step_active.shape[1]):
            active = step_active[:, step]
            latent = last_hidden.unsqueeze(1).to(prompt_embeds.dtype)  # eq. 1
            if latent_inputs == "zeros":
                latent = torch.zeros_like(latent)
            chunk, chunk_valid, replay_columns = latent, active[:, None], None
            if top_k > 0:
                tokens, tokens_valid, index, index_valid, pooled = self._replay_tokens(
                    saliency, visual_pos, visual_valid, visited, prompt_embeds, active, top_k, detached_saliency
                )
                chunk = torch.cat([tokens, latent], dim=1)
                chunk_valid = torch.cat([tokens_valid, active[:, None]], dim=1)
                visited = visited | torch.zeros_like(visited).scatter(1, index, index_valid)
                trace.append({"index": index, "valid": index_valid, "pooled": pooled})
                if config.replay_positions == "image":
                    replay_columns = visual_pos.gather(1, index)
            chunk_mask = chunk_valid.long()
            full_mask = torch.cat([full_mask, chunk_mask], dim=1)
            chunk_positions, position_mask = self._chunk_positions(
                position_mask, chunk_mask, positions, replay_columns, rope_deltas
            )
            hidden, saliency, detached_saliency = self._routed_pass(
                chunk, chunk_positions, full_mask, cache, router_cache,
                chunk_valid, [(0, chunk.shape[1])], step + 1, capture_saliency=replay and step + 1 < steps,
                saliency_keys=saliency_keys,
            )
            last_hidden = hidden[:, -1]
            latent_hidden.append(last_hidden)
            inserted.append(chunk_mask)
        if compute_recon and pixel_values is not None and trace:
            recon_losses = self._reconstruction_losses(trace, input_ids, image_grid_thw, pixel_values)
        batch, hidden_size = prompt_hidden.shape[0], prompt_hidden.shape[-1]
        return ImplicitPhase(
            cache=cache,
            attention_mask=full_mask,
            latent_hidden=torch.stack(latent_hidden, dim=1) if latent_hidden else prompt_hidden.new_zeros(batch, 0, hidden_size),
            prompt_hidden=prompt_hidden,
            last_hidden=last_hidden,
            rope_deltas=rope_deltas - (full_mask.sum(-1, keepdim=True) - position_mask.sum(-1, keepdim=True)),
            inserted=torch.cat(inserted, dim=1) if inserted else attention_mask.new_zeros(batch, 0),
            trace=trace,
            recon_losses=recon_losses,
        )

    # ---- spatially-coherent reconstruction (eqs. 7-9) -------------------------------------------------------

    def _reconstruction_losses(self, trace, input_ids, image_grid_thw, pixel_values) -> list:
        """Per latent step, the mean over rows with a replay window of `mse(TokenSR(pool(B(t))), u_ref)` (eqs. 8-9).

        The target `u_ref` is the mean-pooled vision-tower encoding of the densest W x W window of the step's
        selected tokens, cropped from `pixel_values` and resized to `recon_crop_size` (default: back to the image's
        size); it is computed without gradient (a self-distillation target). The windows of all steps are searched
        on the host after one copy of the selections; the crops are re-encoded one step at a time, which keeps the
        encoding's temporaries (the peak of a checkpointed training step) at one step's crops.
        """
        layout = image_layout(input_ids == self.config.image_token_id, self._token_grids(image_grid_thw, pixel_values))
        selections = torch.stack([torch.stack([step["index"], step["valid"].long()]) for step in trace]).cpu()
        windows = []  # per step: {row: window}
        for index, valid in selections:
            found = (replay_window(layout, row, index[row], valid[row].bool(), self.config.recon_window)
                     for row in range(index.shape[0]))
            windows.append({row: window for row, window in enumerate(found) if window is not None})
        grids = None if image_grid_thw is None else image_grid_thw.tolist()
        frames = {}  # shared by the steps: each image un-patchified once
        with torch.no_grad():
            targets = [self._encode_crops(list(step.values()), pixel_values, grids, frames) if step else None
                       for step in windows]
        losses = []
        for step, step_windows in enumerate(windows):
            pooled = trace[step]["pooled"]
            if not step_windows:
                losses.append((self.token_sr(pooled) * 0.0).sum())  # keeps TokenSR in the graph (DDP)
                continue
            prediction = self.token_sr(pooled[list(step_windows)])
            losses.append(F.mse_loss(prediction.float(), targets[step].float()))
        return losses

    def _encode_crops(self, windows, pixel_values, grids: list, frames: dict | None = None):
        """Re-encode each window crop and mean-pool: `(n_windows, hidden)`.

        A crop is resized (bilinear) to `recon_crop_size x recon_crop_size` pixels, or to its image's size when that
        is `None`. `grids` is `image_grid_thw` as a list of `[t, h, w]`; `frames` (image -> `(t*Tp, C, H, W)`) keeps
        the un-patchified images across calls."""
        vision = self.config.vision_config
        offsets = [0]
        for t, h, w in grids:
            offsets.append(offsets[-1] + t * h * w)
        cell = vision.spatial_merge_size * vision.patch_size
        crop_side = self.config.recon_crop_size
        side = None if crop_side is None else crop_side // vision.patch_size  # patches per side of a fixed-size crop
        frames = {} if frames is None else frames
        crops, crop_grids = [], []
        for window in windows:
            image, top, left, size = window["image"], window["row"], window["col"], window["size"]
            grid = grids[image]
            if image not in frames:
                frames[image] = unpatchify(pixel_values[offsets[image] : offsets[image + 1]], grid, vision)
            crop = frames[image][..., top * cell : (top + size) * cell, left * cell : (left + size) * cell]
            if crop_side is None:
                out_size, crop_grid = frames[image].shape[-2:], grid
            else:
                out_size, crop_grid = (crop_side, crop_side), [grid[0], side, side]
            crop = F.interpolate(crop.float(), size=out_size, mode="bilinear", align_corners=False)
            crops.append(patchify(crop.to(pixel_values.dtype), crop_grid, vision))
            crop_grids.append(crop_grid)
        grid_thw = torch.tensor(crop_grids, dtype=torch.long, device=pixel_values.device)
        features = self.model.get_image_features(torch.cat(crops), grid_thw).pooler_output
        return torch.stack([f.mean(dim=0) for f in features])

    # ---- training forward -----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        pixel_values=None,
        pixel_values_videos=None,
        image_grid_thw=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        logits_to_keep=0,
        mm_encoder_outputs=None,
        **kwargs,
    ):
        r"""Stock forward for sequences without `<|latent|>`; the latent multi-pass forward otherwise.

        Args:
            input_ids: `(batch, seq)`; latent sequences look like `prompt <|start-latent|>? <|latent|>*k
                <|end-latent|>? rest`, the latent block at the same columns in every row (rows with fewer latents
                pad the end of the block, attention 0), as built by `vedas_hf.data.VedasDataCollator`.
            attention_mask: `(batch, seq)`.
            pixel_values, image_grid_thw, mm_token_type_ids: processor outputs for the prompt's images.
            mm_encoder_outputs: image features `generate` encoded before the prefill (transformers >= 5.24 passes
                them instead of `pixel_values`, and expands them per beam / returned sequence); stock forward only.
            labels: `(batch, seq)` with -100 on ignored positions.
            num_items_in_batch (keyword): if given, the cross-entropy is the token sum divided by it (the Trainer's
                count over all gradient-accumulation micro-batches) instead of the mean over this batch.
        Returns:
            [`VedasCausalLMOutput`] with logits `(batch, seq, vocab)` aligned with `input_ids`.
        """
        latent_id = self.config.latent_token_id
        # A decoding step (one new token, no images) is stock: no checks, no device sync, nothing that breaks a
        # compiled graph. So is any other call that continues a filled cache (e.g. assisted decoding); its inputs
        # were checked at the prefill, but latent tokens cannot continue a cache.
        _, cache = _cache_argument(kwargs)
        decoding = input_ids is not None and input_ids.shape[1] == 1 and pixel_values is None
        continuing = not decoding and cache is not None and bool(cache.get_seq_length() > 0)
        has_latents = (not decoding and input_ids is not None and latent_id is not None
                       and bool((input_ids == latent_id).any()))
        if has_latents:
            _check_latent_forward_arguments(latent_id, cache, use_cache, kwargs)
            self.config.check_vedas_fields()  # fields set on the loaded config bypass __init__
        if not continuing and (has_latents or pixel_values is not None):  # a prefill or a latent sequence
            check_model_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                               mm_token_type_ids, labels)
        if mm_encoder_outputs is not None:
            if has_latents:
                raise ValueError("The latent forward does not support `mm_encoder_outputs`; pass `pixel_values`.")
            kwargs["mm_encoder_outputs"] = mm_encoder_outputs  # only passed when set: older backbones lack it
        if not has_latents:
            return self._stock_forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                mm_token_type_ids=mm_token_type_ids, logits_to_keep=logits_to_keep, **kwargs,
            )
        for name, value in (("inputs_embeds", inputs_embeds), ("pixel_values_videos", pixel_values_videos)):
            if value is not None:
                raise ValueError(f"The latent forward does not support `{name}`; pass `input_ids` and images only.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        start, end, step_active = latent_block(input_ids, attention_mask, latent_id)
        weight = self.config.recon_loss_weight
        phase = self._implicit_phase(
            input_ids[:, :start], attention_mask[:, :start], pixel_values, image_grid_thw,
            None if mm_token_type_ids is None else mm_token_type_ids[:, :start], step_active,
            compute_recon=self.training and weight > 0,
        )
        hidden = [phase.prompt_hidden, phase.latent_hidden]
        if end < input_ids.shape[1]:
            full_mask = torch.cat([phase.attention_mask, attention_mask[:, end:].long()], dim=1)
            positions = self._positions_after_prompt(full_mask, input_ids.shape[1] - end, phase.rope_deltas)
            embeds = self.model.get_input_embeddings()(input_ids[:, end:])
            hidden.append(self._language_pass(embeds, positions, full_mask, phase.cache))
        logits = self._vedas_logits(torch.cat(hidden, dim=1))

        ce_loss = recon_loss = loss = None
        if phase.recon_losses:
            recon_loss = torch.stack(phase.recon_losses).mean()
        if labels is not None:
            ce_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.get_text_config().vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),  # token sum / this count (gradient accumulation)
            )
            loss = ce_loss if recon_loss is None else ce_loss + weight * recon_loss
        trace = [{"index": step["index"], "valid": step["valid"]} for step in phase.trace]
        return VedasCausalLMOutput(
            loss=loss, logits=logits, ce_loss=ce_loss, recon_loss=recon_loss, latent_trace=trace,
        )

    # ---- generation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids=None,
        generation_config=None,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
        num_latent_steps=None,
        latent_inputs="hidden",
        latent_probe_top_k=0,
        **kwargs,
    ):
        r"""Latent reasoning, then the stock generation loop.

        Runs the prompt prefill and `num_latent_steps` cached latent steps with visual replay, feeds
        `<|end-latent|>`, then decodes with [`~GenerationMixin.generate`] (greedy, sampling, beam search, streamers,
        stopping criteria all apply). `num_latent_steps=0` is plain decoding.

        Args:
            input_ids: `(batch, prompt_len)` left-padded prompt from the processor (also accepted as `inputs`).
            generation_config: a [`GenerationConfig`], as in stock `generate` (second positional argument).
            num_latent_steps: latent steps T; if None, `num_latent_steps` of the passed or the model's generation
                config if set there, else `config.num_latent_steps`.
            latent_inputs: `"hidden"` (default, eq. 1) feeds each latent step the previous pass's last hidden
                state; `"zeros"` feeds zero vectors instead (an ablation probe: does the model use what the latents
                compute, or only the extra positions and the replayed tokens?).
            latent_probe_top_k: with `return_dict_in_generate=True`, each step's trace row also gets `"probe"`: the
                `k` tokens the LM head reads from that latent's hidden state, as `(token_id, probability)` pairs (a
                "logit lens" view of what the latent encodes). 0 (default): no probe.
        Returns:
            Like the stock `generate`: `(batch, prompt_len + new)` ids (prompt then answer), or a
            `GenerateOutput` whose `latent_trace` lists, per step and row, the replayed visual-token indices and
            the W x W window in pixels (`return_dict_in_generate=True`).
        """
        if input_ids is None and "inputs" in kwargs:
            input_ids = kwargs.pop("inputs")
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise ValueError(
                f"generation_config must be a GenerationConfig, got {type(generation_config).__name__}; pass "
                "attention_mask and the other processor outputs by keyword (**inputs)."
            )
        steps = self._num_latent_steps(num_latent_steps, generation_config)
        self.config.check_vedas_fields()  # fields set on the loaded config (e.g. replay_top_k = 0) bypass __init__
        if latent_inputs not in ("hidden", "zeros"):
            raise ValueError(f"latent_inputs={latent_inputs!r} is not supported; use 'hidden' (eq. 1) or 'zeros'.")
        if not isinstance(latent_probe_top_k, int) or isinstance(latent_probe_top_k, bool) or latent_probe_top_k < 0:
            raise ValueError(f"latent_probe_top_k={latent_probe_top_k!r} must be an integer >= 0 (0: no probe).")
        if input_ids is not None:
            self._check_prompt(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, kwargs)
        stock_inputs = dict(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
        )
        if steps == 0:  # only what was given: transformers encodes `pixel_values` when the key is present
            stock_inputs = {name: value for name, value in stock_inputs.items() if value is not None}
            out = super().generate(generation_config=generation_config, **stock_inputs, **kwargs)
            if not isinstance(out, torch.Tensor):
                out["latent_trace"] = []
            return out
        self._check_generate_inputs(input_ids, attention_mask, generation_config, kwargs)
        self._check_position_budget(input_ids, steps, generation_config, kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompt_ids, prompt_mask, prompt_types = self._with_start_marker(input_ids, attention_mask, mm_token_type_ids)
        batch = input_ids.shape[0]
        with torch.inference_mode():
            phase = self._implicit_phase(
                prompt_ids, prompt_mask, pixel_values, image_grid_thw, prompt_types,
                torch.ones(batch, steps, dtype=torch.bool, device=input_ids.device), latent_inputs=latent_inputs,
            )
            _drop_unattended_columns(phase, prompt_ids.shape[1])
        placeholder = self.config.latent_token_id
        placeholder = self.config.end_latent_token_id if placeholder is None else placeholder
        end_column = torch.full((batch, 1), self.config.end_latent_token_id, dtype=input_ids.dtype, device=input_ids.device)
        extended_ids = torch.cat([prompt_ids, torch.full_like(phase.inserted, placeholder), end_column], dim=1)
        extended_mask = torch.cat([phase.attention_mask, torch.ones_like(end_column)], dim=1)
        kwargs = {**kwargs, **self._decoding_inputs(extended_mask, phase.rope_deltas)}
        expand = self._generation_expand_size(generation_config, kwargs)
        if expand > 1:
            phase.cache.batch_repeat_interleave(expand)
        hidden_columns = extended_ids.shape[1] - input_ids.shape[1]
        cache = self._decoding_cache(phase.cache, generation_config, kwargs, input_ids.shape[1], extended_ids.shape[1])
        generation_config, kwargs = self._decoding_config(generation_config, kwargs, hidden_columns)
        kwargs = _callbacks_in_stock_layout(kwargs, input_ids.shape[1], hidden_columns)
        out = super().generate(
            input_ids=extended_ids, attention_mask=extended_mask, generation_config=generation_config,
            **{CACHE_KWARG: cache}, **kwargs,
        )
        cache.vedas_hidden_columns = hidden_columns  # the returned cache cannot continue `sequences`
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        rows_per_prompt = sequences.shape[0] // batch  # beams are expanded, returned sequences may be fewer
        sequences = torch.cat(
            [input_ids.repeat_interleave(rows_per_prompt, dim=0), sequences[:, extended_ids.shape[1] :]], dim=1
        )
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        out["latent_trace"] = self._public_trace(phase.trace, steps, prompt_ids, image_grid_thw, pixel_values)
        if latent_probe_top_k:
            self._add_latent_probe(out["latent_trace"], phase.latent_hidden, latent_probe_top_k)
        return out

    def _add_latent_probe(self, trace, latent_hidden, top_k):
        """Adds `"probe"` to each trace row: the top-k `(token_id, probability)` of the LM head on the step's latent
        hidden state `latent_hidden` `(batch, steps, hidden)`."""
        probabilities = self._vedas_logits(latent_hidden).float().softmax(dim=-1)  # (batch, steps, vocab)
        top = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
        ids, values = top.indices.tolist(), top.values.tolist()
        for step, rows in enumerate(trace):
            for row, entry in enumerate(rows):
                entry["probe"] = list(zip(ids[row][step], values[row][step]))

    def _check_generate_inputs(self, input_ids, attention_mask, generation_config, kwargs):
        if input_ids is None:
            raise ValueError("Latent generation needs `input_ids` (processor output); got None.")
        if self.config.end_latent_token_id is None:
            raise ValueError(
                "config.end_latent_token_id is None: latent generation needs the latent tokens; convert the "
                "checkpoint with `python -m vedas_hf.convert`, or pass num_latent_steps=0."
            )
        for name in ("pixel_values_videos", "inputs_embeds"):
            if kwargs.get(name) is not None:
                raise ValueError(f"Latent generation does not support `{name}`; pass num_latent_steps=0.")
        self._check_decoding_settings(generation_config, kwargs)
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "The prompt batch is right-padded; latent generation needs left padding "
                "(processor.tokenizer.padding_side = 'left')."
            )

    def _num_latent_steps(self, num_latent_steps, generation_config) -> int:
        """Latent steps of a `generate` call: the argument, else `num_latent_steps` set on the passed or the model's
        generation config, else `config.num_latent_steps`."""
        if num_latent_steps is None:
            num_latent_steps = self._generation_setting("num_latent_steps", generation_config, {})
        steps = self.config.num_latent_steps if num_latent_steps is None else num_latent_steps
        if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):  # numpy / torch integers too
            steps = int(steps)
        elif isinstance(steps, torch.Tensor) and steps.numel() == 1 and not steps.is_floating_point():
            steps = int(steps.item())
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"num_latent_steps={steps!r} must be an integer >= 0.")
        return steps

    def _check_position_budget(self, input_ids, steps: int, generation_config, kwargs) -> None:
        """`ValueError` when the prompt, `steps` latent steps (each `replay_top_k` replayed tokens and the latent,
        positions advancing as configured) and the new tokens would run past the text model's position limit."""
        limit = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        if not limit:
            return
        per_step = 1
        if self.config.replay_mode == "patches" and self.config.replay_positions == "sequential":
            per_step += self.config.replay_top_k
        elif self.config.replay_mode == "soft_mix":
            per_step += 1
        new_tokens = self._max_new_tokens(generation_config, kwargs, input_ids.shape[1])
        needed = input_ids.shape[1] + 2 + steps * per_step + new_tokens  # 2: the latent markers
        if needed > limit:
            raise ValueError(
                f"num_latent_steps={steps} needs up to {needed} positions (prompt {input_ids.shape[1]}, {per_step} per "
                f"latent step, max_new_tokens={new_tokens}), more than the model's max_position_embeddings={limit}; "
                "lower num_latent_steps or max_new_tokens, or shorten the prompt."
            )

    def _check_prompt(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, kwargs):
        """Processor outputs of a `generate` prompt (`check_model_inputs`), without latent tokens (they would run the
        latent training forward as the prefill, any `num_latent_steps`). A prompt that continues a filled cache (a
        stock multi-turn call) is checked from the first column the cache does not hold: its images are in the
        cache, only new ones come with `pixel_values`. A cache returned by a latent `generate` is refused."""
        _, cache = _cache_argument(kwargs)
        past = 0 if cache is None else int(cache.get_seq_length())
        if getattr(cache, "vedas_hidden_columns", 0):
            raise ValueError(
                f"This cache comes from a latent generate: besides the {input_ids.shape[-1]}-token prompt and answer it "
                f"holds {cache.vedas_hidden_columns} latent-step columns that the returned ids leave out, so it cannot "
                "continue them. Call generate on the whole conversation without the cache."
            )
        if past and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
            # a multi-turn prompt: the cache holds its first `past` columns, checked by the call that filled it
            new = slice(min(past, input_ids.shape[1] - 1), None)
            input_ids = input_ids[:, new]
            attention_mask = None if attention_mask is None else attention_mask[:, new]
            mm_token_type_ids = None if mm_token_type_ids is None else mm_token_type_ids[:, new]
        check_model_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids)
        latent_id = self.config.latent_token_id
        if latent_id is not None and bool((input_ids == latent_id).any()):
            raise ValueError(
                f"The prompt holds <|latent|> tokens (id {latent_id}); generate inserts the latent steps itself: "
                "pass the prompt only and set num_latent_steps."
            )

    def _generation_setting(self, name: str, generation_config, kwargs, model_config: bool = True):
        """The value `generate` would use for `name`: the first one set (not None) among the arguments, a passed
        generation config and (with `model_config`) the model's generation config."""
        for source in (kwargs, generation_config, self.generation_config if model_config else None):
            value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
            if value is not None:
                return value
        return None

    def _check_decoding_settings(self, generation_config, kwargs):
        """The latent steps live in the KV cache that decoding continues from (a DynamicCache built by the latent
        loop): settings that would replace or bypass it are errors."""
        for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
            if self._generation_setting(name, generation_config, kwargs) is not None:
                raise ValueError(
                    f"Latent generation does not support assisted decoding (`{name}`); pass num_latent_steps=0 to "
                    "use it."
                )
        name, cache = _cache_argument(kwargs)
        if cache is not None:
            raise ValueError(
                f"Latent generation builds its own cache (prompt and latent steps); do not pass `{name}`, or "
                "pass num_latent_steps=0."
            )
        use_cache = self._generation_setting("use_cache", generation_config, kwargs)
        use_cache = True if use_cache is None else use_cache
        # "static" (the caller's) decodes from a StaticCache filled with the latent phase; any other caller's
        # implementation is an error; the model's own is set aside (`_decoding_config`)
        implementation = self._static_decoding(generation_config, kwargs)
        if not use_cache or implementation not in (None, "static"):
            setting = "use_cache=False" if not use_cache else f"cache_implementation={implementation!r}"
            raise ValueError(
                f"Latent generation got {setting}: the latent steps live in the KV cache the answer is decoded from, "
                "which generate builds itself (a DynamicCache, or a StaticCache with cache_implementation='static'); "
                "drop that setting (also from the generation config), or pass num_latent_steps=0."
            )

    def _max_new_tokens(self, generation_config, kwargs, prompt_columns: int) -> int:
        """The most answer tokens a `generate` call may decode: `max_new_tokens`, else the absolute `max_length`
        (prompt + answer, the stock layout; transformers' default when unset) minus the `prompt_columns`."""
        max_new = self._generation_setting("max_new_tokens", generation_config, kwargs)
        if max_new is None:
            max_length = self._generation_setting("max_length", generation_config, kwargs) or GenerationConfig().max_length
            max_new = max(max_length - prompt_columns, 1)
        return max_new

    def _static_decoding(self, generation_config, kwargs):
        """The caller's `cache_implementation` (argument or passed generation config), else `"static"` when the
        model's generation config asks for it (transformers' documented way to compile decoding), else None."""
        implementation = self._generation_setting("cache_implementation", generation_config, kwargs, model_config=False)
        if implementation is None and getattr(self.generation_config, "cache_implementation", None) == "static":
            return "static"
        return implementation

    def _decoding_cache(self, cache, generation_config, kwargs, prompt_columns: int, total_columns: int):
        """The cache the stock loop decodes from: the latent phase's DynamicCache, or with
        `cache_implementation="static"` a StaticCache holding the same keys/values, sized for `total_columns`
        (prompt, latent steps and end marker) plus the new tokens (what compiled decoding needs: fixed shapes).
        `prompt_columns`: the caller's prompt length, which an absolute `max_length` includes."""
        if self._static_decoding(generation_config, kwargs) != "static":
            return cache
        max_new = self._max_new_tokens(generation_config, kwargs, prompt_columns)
        static = StaticCache(config=self.config.get_text_config(), max_cache_len=total_columns + max_new)
        for layer_idx, layer in enumerate(cache.layers):
            static.update(layer.keys, layer.values, layer_idx)
        return static

    def _with_start_marker(self, input_ids, attention_mask, mm_token_type_ids):
        """Append `<|start-latent|>` (when configured) to the prompt, its mask and its modality types."""
        start = self.config.start_latent_token_id
        if start is None:
            return input_ids, attention_mask, mm_token_type_ids
        column = torch.full((input_ids.shape[0], 1), start, dtype=input_ids.dtype, device=input_ids.device)
        types = None
        if mm_token_type_ids is not None:
            types = torch.cat([mm_token_type_ids, torch.zeros_like(column, dtype=mm_token_type_ids.dtype)], dim=1)
        return torch.cat([input_ids, column], dim=1), torch.cat([attention_mask, torch.ones_like(column)], dim=1), types

    def _decoding_config(self, generation_config, kwargs, hidden_columns: int):
        """The generation config and arguments of the stock loop that decodes after the latent steps.

        `max_length` / `min_length` (from the arguments, a passed or the model's generation config) count prompt +
        answer, the stock layout `generate` returns; the loop also sees the `hidden_columns` inserted after the
        prompt (start marker, replayed tokens, latents, end marker), so they are shifted by those. Relative limits
        (`max_new_tokens`, `min_new_tokens`) take precedence in transformers and need no shift. A
        `cache_implementation` in the model's generation config is dropped: decoding continues from the
        DynamicCache of the latent steps. A passed config is copied, never changed."""
        kwargs, updates = dict(kwargs), {}
        for name, relative in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            if self._generation_setting(relative, generation_config, kwargs) is not None:
                continue
            if kwargs.get(name) is not None:
                kwargs[name] += hidden_columns
                continue
            value = self._generation_setting(name, generation_config, kwargs)
            if value is not None:
                updates[name] = value + hidden_columns
        if (getattr(self.generation_config, "cache_implementation", None) is not None
                or getattr(generation_config, "cache_implementation", None) is not None
                or kwargs.get("cache_implementation") is not None):
            # the cache is passed in (`_decoding_cache`); as an argument, since transformers fills a passed config's
            # unset fields from the model's config first
            kwargs["cache_implementation"] = None
            if getattr(generation_config, "cache_implementation", None) is not None:
                generation_config = copy.deepcopy(generation_config)
                generation_config.cache_implementation = None
        if updates and generation_config is None:
            kwargs.update(updates)  # no config was passed: arguments are the usual way to override it
        elif updates:
            generation_config = copy.deepcopy(generation_config)
            for name, value in updates.items():
                setattr(generation_config, name, value)
        return generation_config, kwargs

    def _merge_criteria_processor_list(self, default_list, custom_list):
        """transformers' merge of the passed processors / criteria with those the generation config builds (a passed
        one replaces a built one of the same type), seeing through the stock-layout wrappers of a latent `generate`
        (`_callbacks_in_stock_layout`), which keep their place in the merged list."""
        wrapped = {id(_unwrapped(item)): item for item in custom_list}
        unwrapped = type(custom_list)(_unwrapped(item) for item in custom_list)
        merged = super()._merge_criteria_processor_list(default_list, unwrapped)
        return type(merged)(wrapped.get(id(item), item) for item in merged)

    def _generation_expand_size(self, generation_config, kwargs) -> int:
        """How many rows `generate` makes of each prompt (beams or returned sequences); the cache must match."""
        num_beams = self._generation_setting("num_beams", generation_config, kwargs) or 1
        returned = self._generation_setting("num_return_sequences", generation_config, kwargs) or 1
        return num_beams if num_beams > 1 else returned

    def _public_trace(self, trace, steps, prompt_ids, image_grid_thw, pixel_values):
        """Per step, per row: `{"visual_indices", "image", "box"}` (box `(x0, y0, x1, y1)` in resized pixels;
        empty indices and `None` when nothing was replayed)."""
        if not trace:
            empty = {"visual_indices": [], "image": None, "box": None}
            return [[dict(empty) for _ in range(prompt_ids.shape[0])] for _ in range(steps)]
        layout = image_layout(prompt_ids == self.config.image_token_id, self._token_grids(image_grid_thw, pixel_values))
        cell = self.config.image_token_pixels
        steps = []
        for step in trace:
            rows = []
            for row in range(step["index"].shape[0]):
                indices = step["index"][row][step["valid"][row]].tolist()
                window = replay_window(layout, row, step["index"][row], step["valid"][row], self.config.recon_window)
                box = None
                if window is not None:
                    top, left, size = window["row"] * cell, window["col"] * cell, window["size"] * cell
                    box = (left, top, left + size, top + size)
                rows.append({
                    "visual_indices": indices,
                    "image": None if window is None else window["image_in_row"],
                    "box": box,
                })
            steps.append(rows)
        return steps


class VedasQwen2VLForConditionalGeneration(VedasForConditionalGenerationMixin, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with Vedas latent reasoning (see [`VedasForConditionalGenerationMixin`])."""

    config_class = VedasQwen2VLConfig
    _no_split_modules = ["VedasQwen2VLDecoderLayer", "Qwen2VLVisionBlock"]
    vedas_pretrained_class = Qwen2VLPreTrainedModel
    vedas_model_class = VedasQwen2VLModel


class VedasQwen2_5_VLForConditionalGeneration(VedasForConditionalGenerationMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with Vedas latent reasoning (see [`VedasForConditionalGenerationMixin`])."""

    config_class = VedasQwen2_5_VLConfig
    _no_split_modules = ["VedasQwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]
    vedas_pretrained_class = Qwen2_5_VLPreTrainedModel
    vedas_model_class = VedasQwen2_5_VLModel


class VedasChameleonForConditionalGeneration(VedasForConditionalGenerationMixin, ChameleonForConditionalGeneration):
    """Chameleon with Vedas latent reasoning (see [`VedasForConditionalGenerationMixin`]).

    What differs from the Qwen backbones: the visual tokens are the VQ-VAE codes of each image, embedded by the
    language model's own embedding table (so replay re-inserts those embeddings); positions are 1-D; the
    reconstruction target is the mean embedding of the codes the same VQ-VAE gives the cropped window. Inputs are
    the `ChameleonProcessor`'s `input_ids`, `attention_mask` and `pixel_values` `(images, C, H, W)`.
    """

    config_class = VedasChameleonConfig
    _no_split_modules = ["VedasChameleonDecoderLayer"]
    vedas_pretrained_class = ChameleonPreTrainedModel
    vedas_model_class = VedasChameleonModel
    vedas_position_planes = 1

    def _token_grids(self, image_grid_thw, pixel_values) -> list:
        """`(1, H / cell, W / cell)` per image of `pixel_values` `(images, C, H, W)`; None without images."""
        return None if pixel_values is None else vq_grids(pixel_values, self.config.image_token_pixels)

    def _prompt_embeddings(self, input_ids, pixel_values, image_grid_thw):
        """Token embeddings with each image's VQ-VAE codes (as vocabulary ids) in its `<image>` placeholders:
        `(batch, seq, hidden)`."""
        if pixel_values is not None:
            codes = self.model.get_image_tokens(pixel_values)  # (images, codes per image) vocabulary ids
            mask = input_ids == self.config.image_token_id
            input_ids = input_ids.masked_scatter(mask, codes.to(input_ids.dtype))
        return self.model.get_input_embeddings()(input_ids)

    def _stock_forward(self, pixel_values_videos=None, image_grid_thw=None, video_grid_thw=None,
                       mm_token_type_ids=None, **inputs):
        """Stock Chameleon forward: the Qwen-only processor outputs are dropped (`mm_token_type_ids`, which the
        collator writes for every backbone, carries nothing Chameleon uses); videos are an error."""
        if pixel_values_videos is not None or video_grid_thw is not None:
            raise ValueError("Chameleon takes no videos; drop pixel_values_videos / video_grid_thw.")
        return super()._stock_forward(**inputs)

    def _vedas_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """As the stock forward: image-code ids can never be predicted (their logits are the dtype's minimum)."""
        logits = self.lm_head(hidden)
        logits[..., self.model.vocabulary_mapping.image_tokens] = torch.finfo(logits.dtype).min
        return logits

    def _decoding_inputs(self, extended_mask, rope_deltas) -> dict:
        """1-D positions of every column (what transformers would derive from the mask) plus the latent phase's
        offset; the generation loop continues them."""
        positions = (extended_mask.long().cumsum(-1) - 1).clamp(min=0) + rope_deltas
        return {"position_ids": positions.masked_fill(extended_mask == 0, 0)}

    def _encode_crops(self, windows, pixel_values, grids, frames=None):
        """Each window cropped from `pixel_values` `(images, C, H, W)`, resized (bilinear) to `recon_crop_size`
        (default: the image's size), re-tokenised by the VQ-VAE and embedded: the mean embedding of its codes,
        `(n_windows, hidden)`."""
        cell, side = self.config.image_token_pixels, self.config.recon_crop_size
        out_size = tuple(pixel_values.shape[-2:]) if side is None else (side, side)
        crops = []
        for window in windows:
            top, left, size = window["row"] * cell, window["col"] * cell, window["size"] * cell
            crop = pixel_values[window["image"] : window["image"] + 1, :, top : top + size, left : left + size]
            crops.append(F.interpolate(crop.float(), size=out_size, mode="bilinear", align_corners=False))
        codes = self.model.get_image_tokens(torch.cat(crops).to(pixel_values.dtype))  # (n_windows, codes)
        return self.model.get_input_embeddings()(codes).mean(dim=1)


# --------------------------------------------------------------------------------------------------------------
# Helpers: latent block, visual layout, window search, (un)patchify
# --------------------------------------------------------------------------------------------------------------


def _drop_unattended_columns(phase: ImplicitPhase, prompt_columns: int) -> None:
    """Remove from `phase` (cache, attention mask, `inserted`) the inserted columns that no row attends: the replay
    slots of steps that found no unvisited visual token (a prompt with fewer than `T x K` visual tokens leaves
    whole steps empty). Decoding then sees the stock layout: an unpadded prompt gets an all-ones mask, which
    transformers drops (5.25; no mask built per decoding step, no host sync). Outputs do not change: those keys are masked for every query,
    and the text positions count attended columns only. One host sync; caches other than plain `DynamicLayer`s
    (sliding windows, quantized, ...) are left as they are."""
    attended = phase.inserted.bool().any(dim=0)  # (inserted_len,)
    if bool(attended.all()) or any(type(layer) is not DynamicLayer for layer in phase.cache.layers):
        return
    device = phase.inserted.device
    keep = torch.cat([torch.arange(prompt_columns, device=device), attended.nonzero().squeeze(1) + prompt_columns])
    for layer in phase.cache.layers:
        layer.keys, layer.values = layer.keys.index_select(2, keep), layer.values.index_select(2, keep)
    phase.attention_mask = phase.attention_mask.index_select(1, keep)
    phase.inserted = phase.inserted[:, attended]


def _stock_layout(input_ids, start: int, count: int):
    """`input_ids` `(..., len)` without the `count` columns from `start` (what latent `generate` inserted after the
    prompt): the prompt then the answer, as stock `generate` lays them out."""
    return torch.cat([input_ids[..., :start], input_ids[..., start + count :]], dim=-1)


class _StockLayoutView:
    """A caller's logits processor or stopping criterion (`inner`), handed the ids in the stock layout (see
    `_callbacks_in_stock_layout`)."""

    def __init__(self, inner, start: int, count: int):
        self.inner, self.start, self.count = inner, start, count


class _StockLayoutLogitsProcessor(_StockLayoutView, LogitsProcessor):
    def __call__(self, input_ids, scores):  # two arguments: the generation loop passes no others
        return self.inner(_stock_layout(input_ids, self.start, self.count), scores)


class _StockLayoutStoppingCriteria(_StockLayoutView, StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return self.inner(_stock_layout(input_ids, self.start, self.count), scores, **kwargs)


class _StockLayoutStreamer(_StockLayoutView, BaseStreamer):
    """A caller's streamer: its first `put` (the loop's input ids) gets the prompt without the inserted columns,
    as in stock `generate`; the answer tokens that follow pass through."""

    def __init__(self, inner, start: int, count: int):
        super().__init__(inner, start, count)
        self.prompt_sent = False

    def put(self, value):
        if not self.prompt_sent:
            self.prompt_sent = True
            value = _stock_layout(value, self.start, self.count)
        self.inner.put(value)

    def end(self):
        self.inner.end()


def _unwrapped(item):
    """The caller's processor or criterion inside a stock-layout wrapper (else `item`)."""
    return item.inner if isinstance(item, _StockLayoutView) else item


def _callbacks_in_stock_layout(kwargs: dict, start: int, count: int) -> dict:
    """`logits_processor`, `stopping_criteria`, `prefix_allowed_tokens_fn` and a `streamer` passed to a latent
    `generate` see the ids as stock `generate` would (prompt, then answer): the decoding loop's ids also hold the
    `count` columns inserted at `start` (start marker, replayed tokens, latents, end marker), which are cut out for
    them. (The processors the generation config builds, e.g. `repetition_penalty`, see the loop's ids; `max_length`
    and `min_length` are shifted instead, see `_decoding_config`.)"""
    kwargs = dict(kwargs)
    if kwargs.get("logits_processor"):
        kwargs["logits_processor"] = LogitsProcessorList(
            _StockLayoutLogitsProcessor(p, start, count) for p in kwargs["logits_processor"]
        )
    if kwargs.get("stopping_criteria"):
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            _StockLayoutStoppingCriteria(c, start, count) for c in kwargs["stopping_criteria"]
        )
    if kwargs.get("streamer") is not None:
        kwargs["streamer"] = _StockLayoutStreamer(kwargs["streamer"], start, count)
    allowed = kwargs.get("prefix_allowed_tokens_fn")
    if allowed is not None:
        kwargs["prefix_allowed_tokens_fn"] = lambda batch_id, ids: allowed(batch_id, _stock_layout(ids, start, count))
    return kwargs


def _check_latent_forward_arguments(latent_id, cache, use_cache, kwargs):
    """The latent forward builds its own KV cache (which also holds the replayed tokens, so it cannot continue
    `input_ids`) and returns logits and losses only: a cache, `use_cache=True` or extra outputs are errors."""
    if cache is not None or use_cache:
        if cache is None:
            setting = "passes use_cache=True"
        else:
            setting = "continues a filled cache" if cache.get_seq_length() > 0 else "passes a cache"
        raise ValueError(
            f"input_ids hold <|latent|> tokens (id {latent_id}) and the call {setting}: the latent forward "
            "builds its own cache from the prompt and returns none. Pass the whole sequence without a cache and "
            "with use_cache=False (training), or use generate(num_latent_steps=...) with a prompt without latents."
        )
    for name in ("output_hidden_states", "output_attentions"):
        if kwargs.get(name):
            raise ValueError(f"The latent forward does not return {name.split('_', 1)[1]}; drop {name}=True.")


def _check_same_shape(name, tensor, input_ids):
    if tensor is not None and tuple(tensor.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but input_ids has {tuple(input_ids.shape)}; pass the processor "
            "outputs of one call together."
        )


def merged_grids(image_grid_thw, merge: int) -> list:
    """Qwen `image_grid_thw` rows `[t, h, w]` (patches) -> `(t, h / merge, w / merge)` in visual tokens."""
    return [(t, h // merge, w // merge) for t, h, w in image_grid_thw.tolist()]


def vq_grids(pixel_values, cell: int) -> list:
    """Chameleon `pixel_values` `(images, C, H, W)` -> `(1, H / cell, W / cell)` per image, in VQ codes."""
    return [(1, pixel_values.shape[-2] // cell, pixel_values.shape[-1] // cell)] * pixel_values.shape[0]


def _check_pixels_given(config, image_tokens: int, pixel_values, fix: str) -> bool:
    """`ValueError` for image placeholders without `pixel_values`; whether there are pixels to check further."""
    if pixel_values is None and image_tokens:
        raise ValueError(
            f"input_ids hold {image_tokens} image tokens (id {config.image_token_id}) but pixel_values is None; {fix}"
        )
    return pixel_values is not None


def _check_finite(pixel_values) -> None:
    if not pixel_values.is_floating_point() or not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("pixel_values must be finite floats (found NaN/inf or an integer dtype); check the images.")


def _check_images(config, input_ids, pixel_values, image_grid_thw):
    """`pixel_values` `(patches, C*Tp*P*P)` and `image_grid_thw` `(images, 3)` agree with each other, the vision
    config and the image placeholders in `input_ids`."""
    vision = config.vision_config
    image_tokens = int((input_ids == config.image_token_id).sum())
    fix = "pass the processor's pixel_values and image_grid_thw."
    if not _check_pixels_given(config, image_tokens, pixel_values, fix):
        return
    if image_grid_thw is None:
        raise ValueError("pixel_values was given without image_grid_thw; pass both from the processor.")
    for name, value in (("pixel_values", pixel_values), ("image_grid_thw", image_grid_thw)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}; use return_tensors='pt'.")
    if image_grid_thw.dim() != 2 or image_grid_thw.shape[-1] != 3 or image_grid_thw.is_floating_point():
        raise ValueError(
            f"image_grid_thw must be an integer tensor of shape (num_images, 3), got {tuple(image_grid_thw.shape)} "
            f"{image_grid_thw.dtype}."
        )
    merge = vision.spatial_merge_size
    grids = image_grid_thw.tolist()
    for index, (t, h, w) in enumerate(grids):
        if t < 1 or h < merge or w < merge or h % merge or w % merge:
            raise ValueError(
                f"image_grid_thw[{index}]={[t, h, w]}: every image needs t >= 1 and h, w multiples of "
                f"spatial_merge_size={merge} (an image smaller than one merged patch, "
                f"{merge * vision.patch_size}px, cannot be encoded); resize it with the processor."
            )
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    rows = sum(t * h * w for t, h, w in grids)
    if pixel_values.dim() != 2 or tuple(pixel_values.shape) != (rows, width):
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)} but image_grid_thw describes ({rows}, {width}) "
            "patch rows; pass the processor outputs of one call together."
        )
    _check_finite(pixel_values)
    expected = rows // merge**2
    if image_tokens != expected:
        raise ValueError(
            f"input_ids hold {image_tokens} image tokens but image_grid_thw describes {len(grids)} images with "
            f"{expected} merged patches; every image needs one <|image_pad|> per merged patch (use the processor)."
        )
    image_layout(input_ids == config.image_token_id, merged_grids(image_grid_thw, merge))  # per row: a ValueError


def _check_vq_images(config, input_ids, pixel_values, image_grid_thw):
    """Chameleon: `pixel_values` `(images, C, H, W)` agrees with the VQ-VAE config and the `<image>` placeholders
    (one per VQ code: `(H / cell) * (W / cell)` per image, `cell` = `config.image_token_pixels`)."""
    image_tokens = int((input_ids == config.image_token_id).sum())
    if image_grid_thw is not None:
        raise ValueError(
            "image_grid_thw was given to a Chameleon model, whose images are whole (images, C, H, W) tensors; drop it "
            "(it belongs to Qwen2-VL processors)."
        )
    if not _check_pixels_given(config, image_tokens, pixel_values, "pass the processor's pixel_values."):
        return
    channels, cell = config.vq_config.in_channels, config.image_token_pixels
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(
            f"pixel_values must be a tensor of shape (images, {channels}, height, width), got {shape}; use the "
            "processor with return_tensors='pt'."
        )
    height, width = pixel_values.shape[-2:]
    if height % cell or width % cell:
        raise ValueError(
            f"pixel_values holds {height}x{width} images; the VQ-VAE needs sides that are multiples of {cell} pixels "
            "(one code each); resize them with the processor."
        )
    _check_finite(pixel_values)
    per_image = (height // cell) * (width // cell)
    if image_tokens != per_image * pixel_values.shape[0]:
        raise ValueError(
            f"input_ids hold {image_tokens} image tokens but pixel_values holds {pixel_values.shape[0]} images of "
            f"{per_image} codes each; every image needs {per_image} <image> placeholders (use the processor, whose "
            "image_seq_length must match the VQ-VAE)."
        )
    image_layout(input_ids == config.image_token_id, vq_grids(pixel_values, cell))


def check_model_inputs(config, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                       mm_token_type_ids=None, labels=None):
    """Raise a `ValueError` naming the value for malformed processor outputs (shapes, dtypes, ids out of the
    vocabulary, images that do not match their placeholders, non-finite pixels) before they reach torch."""
    if input_ids is None:
        return
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor of shape (batch, seq), got {shape}.")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: an empty batch or an empty prompt.")
    vocab_size = config.get_text_config().vocab_size
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids hold id {low if low < 0 else high}, outside the vocabulary [0, {vocab_size}).")
    for name, tensor in (("attention_mask", attention_mask), ("mm_token_type_ids", mm_token_type_ids),
                         ("labels", labels)):
        _check_same_shape(name, tensor, input_ids)
    if config.model_type == VedasChameleonConfig.model_type:  # by name: remote code has its own copy of the class
        _check_vq_images(config, input_ids, pixel_values, image_grid_thw)
    else:
        _check_images(config, input_ids, pixel_values, image_grid_thw)


def latent_block(input_ids, attention_mask, latent_id):
    """Locate the latent block: columns `[start, end)` and `(batch, end - start)` bool of active latent steps.

    Raises `ValueError` unless the latent tokens form one block of columns shared by all rows, each row holding
    latents at the start of the block and padding (attention 0) after them.
    """
    is_latent = input_ids == latent_id
    columns = is_latent.any(dim=0).nonzero().flatten().tolist()
    start, end = columns[0], columns[-1] + 1
    block = is_latent[:, start:end]
    padding = attention_mask[:, start:end] == 0
    decreasing = (block.int().diff(dim=1) <= 0).all() if end - start > 1 else True
    if not bool((block | padding).all()) or not bool(decreasing) or not bool(block[:, 0].any()):
        raise ValueError(
            f"The <|latent|> tokens (id {latent_id}) must form one block of columns [{start}, {end}) shared by "
            "every row, latents first and padding after them; build batches with vedas_hf.data.VedasDataCollator."
        )
    if start == 0:
        raise ValueError("The sequence starts with <|latent|>; latent steps need a prompt before them.")
    return start, end, block


def _visual_positions(visual_mask):
    """Columns of the visual tokens of each row: `(batch, Nv)` long and `(batch, Nv)` bool valid."""
    counts = visual_mask.sum(dim=1)
    width = int(counts.max()) if visual_mask.numel() else 0
    order = torch.sort((~visual_mask).int(), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=visual_mask.device)[None, :] < counts[:, None]
    return order, valid


def image_layout(visual_mask, grids):
    """Assign images to rows: list per row of `(global image index, first visual index, h, w)`.

    Args:
        visual_mask: `(batch, seq)` bool, the image placeholder tokens.
        grids: per image, `(t, h, w)` in visual tokens (`_token_grids` of the model), or None without images.
    Images belong to rows in order (as the processor emits them); each holds `t * h * w` placeholder tokens.
    Raises `ValueError` when the counts do not match.
    """
    if grids is None:
        return [[] for _ in range(visual_mask.shape[0])]
    counts = visual_mask.sum(dim=1).tolist()
    layout, image = [], 0
    for row, count in enumerate(counts):
        row_images, first = [], 0
        while first < count:
            if image >= len(grids):
                raise ValueError(
                    f"Row {row} has {count} image tokens but the inputs only describe {len(grids)} images."
                )
            t, h, w = grids[image]
            row_images.append((image, first, h, w))
            first += t * h * w
            image += 1
        if first != count:
            raise ValueError(f"Row {row}: {count} image tokens do not match the image grids (expected {first}).")
        layout.append(row_images)
    return layout


def densest_window(counts: torch.Tensor, size: int):
    """Top-left `(row, col)` of the `size x size` window with the most selections in `counts` `(h, w)` (eq. 7).

    Ties go to the first window in row-major order.
    """
    h, w = counts.shape
    if size > h or size > w:
        raise ValueError(
            f"recon_window={size} is larger than the image's merged grid {h}x{w}; lower recon_window or use "
            "larger images."
        )
    integral = F.pad(counts.float().cumsum(0).cumsum(1), (1, 0, 1, 0))
    sums = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    flat = int(sums.flatten().argmax())
    return flat // sums.shape[1], flat % sums.shape[1]


def replay_window(layout, row, index, valid, size):
    """The W x W window of a row's selected visual tokens, on the image holding most of them.

    Args:
        index: `(K,)` selected visual-token indices of the row; valid `(K,)` bool.
        size: W; an image whose merged grid is smaller on a side (a thin or small image) gets the largest square
            window that fits, `min(W, h, w)`.
    Returns:
        `{"image", "image_in_row", "row", "col", "size"}` on the merged grid, or `None` without a selection.
    """
    selected = index[valid].tolist()
    if not selected or not layout[row]:
        return None
    hits = [sum(first <= i < first + h * w for i in selected) for _, first, h, w in layout[row]]
    best = max(range(len(hits)), key=hits.__getitem__)
    image, first, h, w = layout[row][best]
    local = torch.tensor([i - first for i in selected if first <= i < first + h * w], dtype=torch.long)
    counts = torch.bincount(local, minlength=h * w).view(h, w)  # selections per grid cell, in one op
    size = min(size, h, w)
    top, left = densest_window(counts, size)
    return {"image": image, "image_in_row": best, "row": top, "col": left, "size": size}


def _patch_shape(grid, vision_config):
    t, h, w = (int(v) for v in grid)
    merge, patch = vision_config.spatial_merge_size, vision_config.patch_size
    return (t, h // merge, w // merge, merge, merge, vision_config.in_channels,
            vision_config.temporal_patch_size, patch, patch)


def unpatchify(rows: torch.Tensor, grid, vision_config) -> torch.Tensor:
    """Qwen2-VL patch rows `(t*h*w, C*Tp*P*P)` of one image -> frames `(t*Tp, C, h*P, w*P)`."""
    t, hm, wm, m, _, c, tp, p, _ = _patch_shape(grid, vision_config)
    x = rows.reshape(t, hm, wm, m, m, c, tp, p, p).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
    return x.reshape(t * tp, c, hm * m * p, wm * m * p)


def patchify(frames: torch.Tensor, grid, vision_config) -> torch.Tensor:
    """Inverse of [`unpatchify`]: frames `(t*Tp, C, h*P, w*P)` -> rows `(t*h*w, C*Tp*P*P)`."""
    t, hm, wm, m, _, c, tp, p, _ = _patch_shape(grid, vision_config)
    x = frames.reshape(t, tp, c, hm, m, p, wm, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * hm * m * wm * m, c * tp * p * p)


# Stock checkpoints store the legacy key layout (`model.layers.*`, `visual.*`); reuse Qwen2-VL's conversion for our
# class names so `from_pretrained(<stock checkpoint>)` loads every stock weight.
for _ours, _stock in (
    ("VedasQwen2VLForConditionalGeneration", "Qwen2VLForConditionalGeneration"),
    ("VedasQwen2VLModel", "Qwen2VLModel"),
    ("VedasQwen2_5_VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
    ("VedasQwen2_5_VLModel", "Qwen2_5_VLModel"),
):
    _mapping = get_checkpoint_conversion_mapping(_stock)
    if _mapping is not None:
        register_checkpoint_conversion_mapping(_ours, _mapping, overwrite=True)


__all__ = [
    "VedasChameleonDecoderLayer",
    "VedasChameleonForConditionalGeneration",
    "VedasChameleonModel",
    "VedasDecoderLayerMixin",
    "VedasForConditionalGenerationMixin",
    "VedasModelMixin",
    "VedasTextModelMixin",
    "VedasQwen2VLForConditionalGeneration",
    "VedasQwen2VLModel",
    "VedasQwen2VLTextModel",
    "VedasQwen2VLDecoderLayer",
    "VedasQwen2_5_VLForConditionalGeneration",
    "VedasQwen2_5_VLModel",
    "VedasQwen2_5_VLTextModel",
    "VedasQwen2_5_VLDecoderLayer",
    "VedasRouter",
    "VedasRouterCache",
    "TokenSR",
    "VedasCausalLMOutput",
    "check_model_inputs",
    "densest_window",
    "image_layout",
    "latent_block",
    "patchify",
    "select_top_alpha",
    "unpatchify",
]
