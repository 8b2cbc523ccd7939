# Copyright 2026 The vedas-hf authors. Licensed under the Apache License, Version 2.0.
"""Configuration of Vedas (Visual Enhanced Depth Scaling) on Qwen2-VL, Qwen2.5-VL and Chameleon backbones.

This file is uploaded to the Hub next to `modeling_vedas.py`; it imports only transformers.
"""

import math
from dataclasses import dataclass

from transformers import ChameleonConfig, Qwen2_5_VLConfig, Qwen2VLConfig


REPLAY_MODES = ("patches", "soft_mix", "none")
REPLAY_POSITIONS = ("sequential", "image")
ROUTER_LAYER_PRESETS = ("all", "odd", "even", "none")
ROUTER_SCHEDULES = ("fixed", "cosine")
ROUTER_POSITIONS = ("keep", "rearrange")
TOKEN_SR_KINDS = ("linear", "mlp")


def resolve_router_layers(spec, num_layers: int) -> list[int]:
    """Turn a router-layer spec into sorted decoder-layer indices.

    Args:
        spec: `"all"`, `"odd"` (indices 1, 3, ...), `"even"` (0, 2, ...), `"none"`, or a list of indices.
        num_layers: number of decoder layers of the language model.
    """
    if isinstance(spec, str):
        if spec not in ROUTER_LAYER_PRESETS:
            raise ValueError(
                f"router_layers={spec!r} is not a known preset; use one of {ROUTER_LAYER_PRESETS} or a list of "
                f"layer indices in [0, {num_layers})."
            )
        if spec == "none":
            return []
        start = {"all": 0, "odd": 1, "even": 0}[spec]
        step = 1 if spec == "all" else 2
        return list(range(start, num_layers, step))
    if not isinstance(spec, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        raise ValueError(f"router_layers={spec!r} must be a preset string or a list of ints.")
    bad = [i for i in spec if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"router_layers contains {bad}, outside [0, {num_layers}) for a language model with {num_layers} layers."
        )
    return sorted(set(spec))


def cosine_alpha(layer_idx: int, num_layers: int, alpha_start: int, alpha_end: int) -> int:
    """Cosine-annealed token retention of eq. 15.

    The paper prints `alpha_s + (alpha_s - alpha_e) / 2 * (1 + cos(pi * l / L))`, which would start at
    `2 * alpha_s - alpha_e`; its text says the count "decays from alpha_s to alpha_e". We implement the stated
    intent: `alpha_e + (alpha_s - alpha_e) / 2 * (1 + cos(pi * l / L))`, equal to `alpha_s` at layer 0 and
    approaching `alpha_e` at the last layer.
    """
    value = alpha_end + (alpha_start - alpha_end) / 2 * (1 + math.cos(math.pi * layer_idx / num_layers))
    return max(1, int(round(value)))


_VEDAS_ARGS_DOC = """
        latent_token_id (`int`, *optional*):
            Id of `<|latent|>`. Training sequences hold one per latent step; `generate` inserts them itself.
        start_latent_token_id (`int`, *optional*):
            Id of `<|start-latent|>`, appended to the prompt before the latent steps.
        end_latent_token_id (`int`, *optional*):
            Id of `<|end-latent|>`, fed after the last latent step; required by `generate` with latent steps.
        num_latent_steps (`int`, *optional*, defaults to 4):
            Latent steps T_r run by `generate` (0 = plain decoding).
        replay_mode (`str`, *optional*, defaults to `"patches"`):
            Visual replay (SCF-VR): `"patches"` inserts the K selected visual tokens, weighted by their softmaxed
            saliency (eq. 6), before each latent; `"soft_mix"` inserts their weighted sum as one token
            (table 5c); `"none"` disables replay (Coconut-style baseline).
        replay_top_k (`int`, *optional*, defaults to 32):
            K, visual tokens replayed per latent step (eq. 5).
        replay_positions (`str`, *optional*, defaults to `"sequential"`):
            Rotary positions of the replayed visual tokens (the paper does not say): `"sequential"` gives them the
            next text positions after the prompt, like the latents; `"image"` gives each the M-RoPE position
            (t, h, w) it has in the prompt, so it keeps where in the image it came from, and the replayed tokens do
            not advance the text positions of the latents and the answer. `"image"` needs `replay_mode="patches"`.
        router_layers (`str` or `list[int]`, *optional*, defaults to `"all"`):
            Decoder layers wrapped with a router (Routing Depth Scaling): `"all"`, `"odd"`, `"even"`, `"none"` or
            a list of layer indices.
        router_top_k (`int`, *optional*, defaults to 32):
            alpha, tokens refined per routed chunk and layer with the `"fixed"` schedule.
        router_schedule (`str`, *optional*, defaults to `"fixed"`):
            `"fixed"` (alpha for every layer) or `"cosine"` (eq. 15, from `router_alpha_start` to
            `router_alpha_end`).
        router_alpha_start (`int`, *optional*, defaults to 64):
            alpha_s of the cosine schedule.
        router_alpha_end (`int`, *optional*, defaults to 16):
            alpha_e of the cosine schedule.
        router_depth (`int`, *optional*, defaults to 1):
            D, extra passes of a routed layer over its selected tokens (eqs. 11-12).
        router_positions (`str`, *optional*, defaults to `"keep"`):
            Rotary positions of selected tokens in the extra passes: `"keep"` their own, `"rearrange"` re-indexed
            0..n-1 over the selected set (table 5d).
        recon_window (`int`, *optional*, defaults to 3):
            W, side of the densest window on the merged visual grid that is cropped and re-encoded (eq. 7). An image
            whose merged grid is smaller on a side gets the largest square that fits (`min(W, h, w)`).
        recon_crop_size (`int`, *optional*):
            Side in pixels of the square the crop is resized to before it is re-encoded (eq. 8: "the standard
            encoder input resolution"); a multiple of `vision_config.patch_size * vision_config.spatial_merge_size`
            (28 for the Qwen2-VL backbones). `None` (default) resizes the crop to its image's own height x width.
            Sets the cost of the reconstruction loss: the vision tower re-encodes one crop per latent step and
            sample, `(recon_crop_size / patch_size) ** 2` patches each.
        token_sr (`str`, *optional*, defaults to `"linear"`):
            TokenSR mapping pooled replay tokens to the re-encoded crop (table 4): `"linear"` or `"mlp"`.
        recon_loss_weight (`float`, *optional*, defaults to 1.0):
            lambda of eq. 13. The paper is inconsistent here: its implementation details give 1.0 for 2B/3B and 0.2
            for 7B backbones, its sensitivity study finds 0.2 best for 2B and 1.0 for 7B, and the authors' training
            script uses 0.2. 1.0 is kept as the default; `hub_configs/` and the bundled tasks set their own.
        recon_grad_to_vision (`bool`, *optional*, defaults to `False`):
            Whether the reconstruction loss may send gradient into the vision tower. Off (default): the pooled
            replay features b(t) are a stop-gradient of the visual features' values, and the saliency weights of
            eq. 6 take their gradient from the saliency recomputed from each layer's detached input, so the loss
            trains TokenSR and every layer's query / key projections and input norm, and nothing upstream of them. The target is the
            tower's own (no-grad) encoding of the crop, so with the path on the loss can fall by flattening the
            tower's features instead of by predicting the crop (measured on the bundled digits task: feature variance
            across tokens falls, later replay steps pick blank tiles, test cross-entropy rises). For research only.
"""


@dataclass(kw_only=True, eq=False, repr=False)
class VedasConfigMixin:
    """The Vedas fields (paper sections 3.2-3.4), their validation and derived values, shared by the backbones."""

    latent_token_id: int | None = None
    start_latent_token_id: int | None = None
    end_latent_token_id: int | None = None
    num_latent_steps: int = 4
    replay_mode: str = "patches"
    replay_top_k: int = 32
    replay_positions: str = "sequential"
    router_layers: str | list[int] = "all"
    router_top_k: int = 32
    router_schedule: str = "fixed"
    router_alpha_start: int = 64
    router_alpha_end: int = 16
    router_depth: int = 1
    router_positions: str = "keep"
    recon_window: int = 3
    recon_crop_size: int | None = None
    token_sr: str = "linear"
    recon_loss_weight: float = 1.0
    recon_grad_to_vision: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_vedas_fields()

    def validate(self):
        """transformers' checks (run by `save_pretrained`), then [`check_vedas_fields`]."""
        super().validate()
        self.check_vedas_fields()

    def check_vedas_fields(self):
        """`ValueError` naming the field for any Vedas value out of range. Run at construction, by the model's
        `__init__` (keyword arguments of `from_pretrained` are set on the config after construction) and at save."""
        choices = {
            "replay_mode": REPLAY_MODES,
            "replay_positions": REPLAY_POSITIONS,
            "router_schedule": ROUTER_SCHEDULES,
            "router_positions": ROUTER_POSITIONS,
            "token_sr": TOKEN_SR_KINDS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; use one of {allowed}.")
        minimums = {
            "num_latent_steps": 0,
            "replay_top_k": 1,
            "router_top_k": 1,
            "router_alpha_start": 1,
            "router_alpha_end": 1,
            "router_depth": 1,
            "recon_window": 1,
        }
        for name, low in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
        if self.replay_positions == "image" and self.replay_mode == "soft_mix":
            raise ValueError(
                "replay_positions='image' needs one position per replayed token, but replay_mode='soft_mix' replays "
                "their weighted sum as one token; use replay_mode='patches' or replay_positions='sequential'."
            )
        if not isinstance(self.recon_grad_to_vision, bool):
            raise ValueError(f"recon_grad_to_vision={self.recon_grad_to_vision!r} must be True or False.")
        if not isinstance(self.recon_loss_weight, (int, float)) or self.recon_loss_weight < 0:
            raise ValueError(f"recon_loss_weight={self.recon_loss_weight!r} must be a number >= 0.")
        resolve_router_layers(self.router_layers, self.get_text_config().num_hidden_layers)
        self.check_recon_crop_size(self.recon_crop_size)
        self._validate_token_ids()

    def check_recon_crop_size(self, size):
        """`ValueError` unless `size` is a valid `recon_crop_size` for this vision tower: `None` or a positive
        multiple of the pixels per visual token side ([`image_token_pixels`])."""
        if size is None:
            return
        cell = self.image_token_pixels
        if not isinstance(size, int) or isinstance(size, bool) or size < cell or size % cell:
            nearest = f" (nearest: {max(1, round(size / cell)) * cell})" if isinstance(size, (int, float)) else ""
            raise ValueError(
                f"recon_crop_size={size!r} must be None (crops resized to their image's size) or a positive multiple "
                f"of {self.image_token_pixels_name} = {cell} pixels{nearest}."
            )

    @property
    def image_token_pixels(self) -> int:
        """Side in pixels of the square one visual token covers (Qwen: `patch_size * spatial_merge_size`)."""
        return self.vision_config.patch_size * self.vision_config.spatial_merge_size

    image_token_pixels_name = "patch_size * spatial_merge_size"

    def reserved_token_ids(self) -> dict:
        """Ids of the backbone's image/video marker tokens, which no latent token may reuse."""
        return {
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
        }

    def _validate_token_ids(self):
        latent_ids = {
            "latent_token_id": self.latent_token_id,
            "start_latent_token_id": self.start_latent_token_id,
            "end_latent_token_id": self.end_latent_token_id,
        }
        vocab_size = self.get_text_config().vocab_size
        reserved = self.reserved_token_ids()
        seen = {}
        for name, value in latent_ids.items():
            if value is None:
                continue
            if not isinstance(value, int) or not 0 <= value < vocab_size:
                raise ValueError(f"{name}={value!r} must be an int in [0, vocab_size={vocab_size}).")
            clash = [other for other, other_value in {**reserved, **seen}.items() if other_value == value]
            if clash:
                raise ValueError(
                    f"{name}={value} is also {clash[0]}; every latent token needs its own id (re-run "
                    "vedas_hf.convert to add the latent tokens)."
                )
            seen[name] = value

    @property
    def router_layer_indices(self) -> list[int]:
        """Decoder-layer indices that carry a router."""
        return resolve_router_layers(self.router_layers, self.get_text_config().num_hidden_layers)

    def router_alpha(self, layer_idx: int) -> int:
        """alpha(l): tokens refined at decoder layer `layer_idx` per routed chunk."""
        if self.router_schedule == "fixed":
            return self.router_top_k
        return cosine_alpha(
            layer_idx, self.get_text_config().num_hidden_layers, self.router_alpha_start, self.router_alpha_end
        )



class VedasQwen2VLConfig(VedasConfigMixin, Qwen2VLConfig):
    __doc__ = (
        "Configuration of [`VedasQwen2VLForConditionalGeneration`]: a stock Qwen2-VL configuration plus the fields "
        "of Vedas (paper sections 3.2-3.4). Defaults are the paper's settings.\n\n    Args:" + _VEDAS_ARGS_DOC
    )

    model_type = "vedas_qwen2_vl"


class VedasQwen2_5_VLConfig(VedasConfigMixin, Qwen2_5_VLConfig):
    __doc__ = (
        "Configuration of [`VedasQwen2_5_VLForConditionalGeneration`]: a stock Qwen2.5-VL configuration plus the "
        "fields of Vedas (paper sections 3.2-3.4). Defaults are the paper's settings.\n\n    Args:" + _VEDAS_ARGS_DOC
    )

    model_type = "vedas_qwen2_5_vl"


class VedasChameleonConfig(VedasConfigMixin, ChameleonConfig):
    __doc__ = (
        "Configuration of [`VedasChameleonForConditionalGeneration`]: a stock Chameleon configuration plus the fields "
        "of Vedas (paper sections 3.2-3.4). Defaults are the paper's settings. What differs from the Qwen backbones: "
        "a visual token is one VQ-VAE code (its embedding row), one per `2 ** (len(vq_config.channel_multiplier) - "
        "1)` pixels on a side; positions are 1-D, so `replay_positions=\"image\"` gives a replayed token its prompt "
        "column's position; the reconstruction target is the crop re-tokenised by the model's own VQ-VAE. "
        "`swin_norm=True` (Chameleon-30B's layer order) is not supported.\n\n    Args:" + _VEDAS_ARGS_DOC
    )

    model_type = "vedas_chameleon"
    image_token_pixels_name = "2 ** (len(vq_config.channel_multiplier) - 1)"

    def check_vedas_fields(self):
        super().check_vedas_fields()
        if self.swin_norm:
            raise ValueError(
                "swin_norm=True (Chameleon-30B's normalisation order) is not supported by the Vedas layers, which "
                "recompute a layer's queries, keys and restricted passes in the pre-norm order of Chameleon-7B; use a "
                "swin_norm=False checkpoint."
            )

    @property
    def image_token_pixels(self) -> int:
        """Side in pixels of the square one VQ-VAE code covers: the encoder halves the resolution at every level but
        the last."""
        return 2 ** (len(self.vq_config.channel_multiplier) - 1)

    def reserved_token_ids(self) -> dict:
        vocabulary = self.vocabulary_map or {}
        return {
            "image_token_id": self.image_token_id,
            "begin_of_image_token_id": vocabulary.get("<racm3:break>"),
            "end_of_image_token_id": vocabulary.get("<eoss>"),
        }


__all__ = [
    "VedasChameleonConfig",
    "VedasConfigMixin",
    "VedasQwen2VLConfig",
    "VedasQwen2_5_VLConfig",
    "cosine_alpha",
    "resolve_router_layers",
]
