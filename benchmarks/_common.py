"""Shared pieces of the benchmarks: command line, model builders, interleaved timing, memory measurement, tables,
and the *naive* reference implementation of the latent loop (the paper authors' approach).

Not a library module: the scripts in this folder import it as `_common` (Python puts the script's folder first on
`sys.path`). Nothing here downloads anything; every model has random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import vedas_hf  # noqa: E402,F401  (registers the Auto classes)
from vedas_hf.testing import (  # noqa: E402
    build_tiny_processor,
    build_tiny_tokenizer,
    make_tiny_checkpoint,
    make_tiny_images,
    tiny_qwen2_vl_config_dict,
)


# --------------------------------------------------------------------------------------------------------------
# Model sizes
# --------------------------------------------------------------------------------------------------------------

# Backbone overrides on top of `vedas_hf.testing.tiny_qwen2_vl_config_dict`.
SIZES = {
    # the test-suite model: text 64 wide x 4 layers, vision 32 wide x 2 blocks, 4x4 patches
    "tiny": {},
    # a CPU model where the matmuls, not the Python overhead, start to matter
    "small": {
        "text_config": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 8,
                        "num_attention_heads": 8, "num_key_value_heads": 2},
        "vision_config": {"depth": 4, "embed_dim": 128, "num_heads": 4},
    },
    # Qwen2-VL-2B shapes (random weights, built in memory; meant for --device cuda)
    "2b": {
        "text_config": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                        "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                            "mrope_section": [16, 24, 24]}},
        "vision_config": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        "tie_word_embeddings": True,
    },
}


def size_overrides(size: str, layers: int | None = None, vision_depth: int | None = None) -> dict:
    overrides = copy.deepcopy(SIZES[size])
    if layers is not None:
        overrides.setdefault("text_config", {})["num_hidden_layers"] = layers
    if vision_depth is not None:
        overrides.setdefault("vision_config", {})["depth"] = vision_depth
    return overrides


@dataclass
class Built:
    model: torch.nn.Module  # Vedas model, SDPA attention
    processor: object  # tiny processor whose images give `visual_tokens` merged tokens
    image_side: int  # square image side in pixels
    visual_tokens: int
    naive: torch.nn.Module | None = None  # same parameters, eager attention in the language model
    description: dict = field(default_factory=dict)


def _image_side(vision: dict, visual_tokens: int) -> int:
    """Side of a square image whose merged grid has about `visual_tokens` cells."""
    cell = vision["patch_size"] * vision["spatial_merge_size"]
    per_side = max(2, round(visual_tokens**0.5))
    return per_side * cell


def build_model(args, with_naive: bool = False, **vedas_fields) -> Built:
    """A Vedas Qwen2-VL model with random weights in `args.dtype` on `args.device`, plus a matching tiny processor.

    `tiny` / `small` go through the public path (`make_tiny_checkpoint` + `AutoModelForImageTextToText.
    from_pretrained(..., trust_remote_code=True)`); `2b` builds `VedasQwen2VLConfig` in memory with Qwen2-VL-2B
    shapes and instantiates the model class directly (no checkpoint on disk).
    """
    from vedas_hf import VedasQwen2VLConfig, VedasQwen2VLForConditionalGeneration

    dtype = getattr(torch, args.dtype)
    overrides = size_overrides(args.size, args.layers, args.vision_depth)
    tokenizer = build_tiny_tokenizer(add_latent_tokens=True)
    config_kwargs = tiny_qwen2_vl_config_dict(tokenizer, **overrides)
    vision = config_kwargs["vision_config"]
    side = _image_side(vision, args.visual_tokens)
    processor = build_tiny_processor(
        patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
        temporal_patch_size=vision["temporal_patch_size"], max_pixels=side * side,
    )
    torch.manual_seed(args.seed)
    if args.size == "2b":
        vocab = tokenizer.get_vocab()
        latent_ids = {
            "start_latent_token_id": vocab["<|start-latent|>"],
            "latent_token_id": vocab["<|latent|>"],
            "end_latent_token_id": vocab["<|end-latent|>"],
        }
        config = VedasQwen2VLConfig(**config_kwargs, **latent_ids, **vedas_fields)
        config._attn_implementation = "sdpa"
        with torch.device(args.device):
            model = VedasQwen2VLForConditionalGeneration(config)
        model = model.to(dtype)
    else:
        with tempfile.TemporaryDirectory() as folder:
            path = make_tiny_checkpoint(os.path.join(folder, "vedas"), seed=args.seed, stock_overrides=overrides,
                                        **vedas_fields)
            model = AutoModelForImageTextToText.from_pretrained(
                path, trust_remote_code=True, dtype=dtype, attn_implementation="sdpa"
            )
        model = model.to(args.device)
    model.eval()
    randomize_gates(model, seed=args.seed + 1)
    # tie the generation config to the tiny tokenizer (no bos, eos = <|im_end|>, pad = <|endoftext|>)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    built = Built(model=model, processor=processor, image_side=side, visual_tokens=0)
    if with_naive:
        built.naive = eager_twin(model)
    text = model.config.text_config
    built.description = {
        "size": args.size,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "text": f"hidden {text.hidden_size}, {text.num_hidden_layers} layers, {text.num_attention_heads} heads "
                f"({text.num_key_value_heads} kv), intermediate {text.intermediate_size}, vocab {text.vocab_size}",
        "vision": f"embed {model.config.vision_config.embed_dim}, depth {model.config.vision_config.depth}, "
                  f"patch {model.config.vision_config.patch_size}",
        "vedas": {k: getattr(model.config, k) for k in ("num_latent_steps", "replay_top_k", "router_top_k",
                                                         "router_layers", "router_depth", "replay_mode")},
    }
    return built


def randomize_gates(model, scale: float = 0.5, seed: int = 1):
    """Converted checkpoints have zero router gates (stock outputs); give them random values so the routed
    refinement changes the outputs (timings do not depend on it; the consistency checks become meaningful)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if getattr(layer, "router", None) is not None:
                gate = layer.router.gate
                gate.copy_((torch.randn(gate.shape, generator=generator) * scale).to(gate.dtype))


def eager_twin(model):
    """A copy of `model` that *shares every parameter and buffer* with it but runs the language model with eager
    attention (so `output_attentions=True` returns the full attention maps); the vision tower keeps SDPA, so vision
    cost is identical in every variant."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    twin = copy.deepcopy(model, memo)
    twin.set_attn_implementation({"text_config": "eager"})
    return twin


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def prompt_batch(built: Built, batch: int, question: str = "What colour is the largest shape, and where is it?",
                 filler_tokens: int = 0, device="cpu") -> dict:
    """`batch` prompts (one distinct square image each, same size, so no padding) as processor outputs on `device`.

    `filler_tokens` ordinary text tokens are inserted right after `<|vision_end|>` to reach a given prompt length.
    """
    processor = built.processor
    images = make_tiny_images(batch, sizes=((built.image_side, built.image_side),), seed=0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    processor.tokenizer.padding_side = "left"
    inputs = dict(processor(text=[prompt] * batch, images=images, return_tensors="pt", padding=True))
    config = built.model.config
    built.visual_tokens = int((inputs["input_ids"][0] == config.image_token_id).sum())
    if filler_tokens > 0:
        filler_id = processor.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
        ids = inputs["input_ids"]
        cut = int((ids[0] == config.vision_end_token_id).nonzero()[0, 0]) + 1
        rows = ids.shape[0]
        inputs["input_ids"] = torch.cat([ids[:, :cut], torch.full((rows, filler_tokens), filler_id), ids[:, cut:]], 1)
        for key in ("attention_mask", "mm_token_type_ids"):
            value = inputs[key]
            pad = torch.ones(rows, filler_tokens, dtype=value.dtype) if key == "attention_mask" else \
                torch.zeros(rows, filler_tokens, dtype=value.dtype)
            inputs[key] = torch.cat([value[:, :cut], pad, value[:, cut:]], 1)
    dtype = next(built.model.parameters()).dtype
    return {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}


# --------------------------------------------------------------------------------------------------------------
# The naive reference (paper authors' approach)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class NaiveState:
    embeds: torch.Tensor
    mask: torch.Tensor
    eligible: torch.Tensor
    chunks: list
    prompt_positions: torch.Tensor
    rope_deltas: torch.Tensor
    prompt_len: int
    latent_columns: list
    recon_losses: list
    hidden: torch.Tensor


class NaiveReference:
    """The latent loop as the official code runs it: every latent step re-runs the *whole* sequence (prompt, all
    replayed tokens and latents so far) from scratch through the language model with eager attention and
    `output_attentions=True`, and takes the visual saliency (eq. 4, last row) from the returned L x (B, H, S, S)
    attention maps. Routing (all chunks routed in one call, same selections), visual replay and reconstruction
    are the model's own, so it computes the same function as the KV-cached implementation (checked by the
    benchmarks).

    After the latent phase the answer is decoded greedily: one full pass over prompt + latents + `<|end-latent|>`
    that fills a fresh KV cache, then one cached step per answer token (stock layers, no attention maps), i.e. the
    answer tokens are decoded as efficiently as in `generate`; only the latent phase differs.

    It uses the model's internal helpers (`_prompt_embeddings`, `_prompt_positions`, `_replay_tokens`, ...) so that
    the two paths cannot drift apart; adapt here if `modeling_vedas.py` renames them.
    """

    def __init__(self, twin):
        from vedas_hf.modeling import modeling_vedas as mv

        if twin.config.replay_positions != "sequential":
            raise ValueError(
                f"NaiveReference implements replay_positions='sequential' only, not "
                f"{twin.config.replay_positions!r}; benchmark a model with the default."
            )

        self.mv = mv
        self.model = twin
        self.config = twin.config
        self.lm = twin.model.language_model

    def _pass(self, embeds, mask, positions, chunks, eligible, attentions=True, cache=None):
        mv = self.mv
        vedas_pass = mv.VedasPass(
            key_mask=mask.bool(), eligible=eligible, chunks=chunks, chunk_index=0,
            router_cache=mv.VedasRouterCache(), config=self.config, rotary_emb=self.lm.rotary_emb,
            capture_saliency=False,
        )
        kwargs = {mv.CACHE_KWARG: cache} if cache is not None else {}
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                      output_attentions=attentions, use_cache=cache is not None, vedas_pass=vedas_pass, **kwargs)
        saliency = None
        if attentions:
            # eq. 4 for the last token: mean over layers and heads of its attention row, (batch, keys)
            saliency = torch.stack([a[:, :, -1, :].float() for a in out.attentions]).mean(dim=(0, 2))
        return out.last_hidden_state, saliency

    def _positions(self, state_prompt_positions, mask, prompt_len, deltas):
        new = mask.shape[1] - prompt_len
        if new == 0:
            return state_prompt_positions
        after = self.model._positions_after_prompt(mask, new, deltas)
        return torch.cat([state_prompt_positions, after], dim=2)

    def implicit_phase(self, ids, mask, pixel_values, grid, types, steps, compute_recon=False) -> NaiveState:
        model, config = self.model, self.config
        mask = mask.long()
        batch, prompt_len = ids.shape
        prompt_embeds = model._prompt_embeddings(ids, pixel_values, grid)
        prompt_positions, deltas = model._prompt_positions(ids, mask, grid, types)
        visual_pos, visual_valid = self.mv._visual_positions(ids == config.image_token_id)
        visited = torch.zeros_like(visual_valid)
        top_k = min(config.replay_top_k, visual_pos.shape[1]) if config.replay_mode != "none" else 0
        active = torch.ones(batch, dtype=torch.bool, device=ids.device)
        embeds, chunks, eligible = prompt_embeds, [(0, prompt_len)], mask.bool()
        hidden, saliency = self._pass(embeds, mask, prompt_positions, chunks, eligible)
        latent_columns, selections = [], []
        for _ in range(steps):
            latent = hidden[:, -1:].to(prompt_embeds.dtype)
            chunk, valid = latent, active[:, None]
            if top_k > 0:
                tokens, tokens_valid, index, index_valid, pooled = model._replay_tokens(
                    saliency, visual_pos, visual_valid, visited, prompt_embeds, active, top_k
                )
                chunk = torch.cat([tokens, latent], dim=1)
                valid = torch.cat([tokens_valid, active[:, None]], dim=1)
                visited = visited | torch.zeros_like(visited).scatter(1, index, index_valid)
                selections.append({"index": index, "valid": index_valid, "pooled": pooled})
            chunks = chunks + [(embeds.shape[1], embeds.shape[1] + chunk.shape[1])]
            embeds = torch.cat([embeds, chunk], dim=1)
            mask = torch.cat([mask, valid.long()], dim=1)
            eligible = torch.cat([eligible, valid], dim=1)
            latent_columns.append(embeds.shape[1] - 1)
            positions = self._positions(prompt_positions, mask, prompt_len, deltas)
            hidden, saliency = self._pass(embeds, mask, positions, chunks, eligible)
        recon = []
        if compute_recon and pixel_values is not None and selections:
            recon = model._reconstruction_losses(selections, ids, grid, pixel_values)
        return NaiveState(embeds, mask, eligible, chunks, prompt_positions, deltas, prompt_len, latent_columns,
                          recon, hidden)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
                 num_latent_steps, max_new_tokens):
        """Greedy decoding of exactly `max_new_tokens` tokens (end of sequence suppressed, as `min_new_tokens`)."""
        model, config = self.model, self.config
        ids, mask, types = model._with_start_marker(input_ids, attention_mask, mm_token_type_ids)
        state = self.implicit_phase(ids, mask, pixel_values, image_grid_thw, types, num_latent_steps)
        batch = ids.shape[0]
        ones = torch.ones(batch, 1, dtype=torch.long, device=ids.device)
        end = model.get_input_embeddings()(ones * config.end_latent_token_id)
        embeds = torch.cat([state.embeds, end], dim=1)
        mask = torch.cat([state.mask, ones], dim=1)
        eligible = torch.cat([state.eligible, torch.zeros_like(ones, dtype=torch.bool)], dim=1)
        positions = self._positions(state.prompt_positions, mask, state.prompt_len, state.rope_deltas)
        cache = DynamicCache(config=config.text_config)
        hidden, _ = self._pass(embeds, mask, positions, state.chunks, eligible, attentions=False, cache=cache)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        logits = model.lm_head(hidden[:, -1]).float()
        tokens = []
        for step in range(max_new_tokens):
            if eos:
                logits[:, eos] = float("-inf")
            token = logits.argmax(dim=-1, keepdim=True)
            tokens.append(token)
            if step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, ones], dim=1)
            position = model._positions_after_prompt(mask, 1, state.rope_deltas)
            out = self.lm(inputs_embeds=model.get_input_embeddings()(token), attention_mask=mask,
                          position_ids=position, use_cache=True, **{self.mv.CACHE_KWARG: cache})
            logits = model.lm_head(out.last_hidden_state[:, -1]).float()
        return torch.cat([input_ids, torch.cat(tokens, dim=1)], dim=1)

    def train_forward(self, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None,
                      mm_token_type_ids=None):
        """Training loss of a batch with a `<|latent|>` block (all rows the same number of latents): T+1 full
        recomputations of the growing prefix (with attention maps), then one full pass over the whole sequence."""
        model, config = self.model, self.config
        is_latent = input_ids == config.latent_token_id
        columns = is_latent.any(dim=0).nonzero().flatten().tolist()
        start, end = columns[0], columns[-1] + 1
        if not bool(is_latent[:, start:end].all()):
            raise ValueError("The naive reference needs the same number of latents in every row.")
        weight = config.recon_loss_weight
        state = self.implicit_phase(
            input_ids[:, :start], attention_mask[:, :start], pixel_values, image_grid_thw,
            None if mm_token_type_ids is None else mm_token_type_ids[:, :start], end - start,
            compute_recon=model.training and weight > 0,
        )
        rest = model.get_input_embeddings()(input_ids[:, end:])
        embeds = torch.cat([state.embeds, rest], dim=1)
        mask = torch.cat([state.mask, attention_mask[:, end:].long()], dim=1)
        eligible = torch.cat([state.eligible, torch.zeros_like(input_ids[:, end:], dtype=torch.bool)], dim=1)
        positions = self._positions(state.prompt_positions, mask, state.prompt_len, state.rope_deltas)
        hidden, _ = self._pass(embeds, mask, positions, state.chunks, eligible, attentions=False)
        rest_start = state.embeds.shape[1]
        keep = list(range(start)) + state.latent_columns + list(range(rest_start, embeds.shape[1]))
        logits = model.lm_head(hidden[:, keep])
        loss = model.loss_function(logits=logits, labels=labels, vocab_size=config.text_config.vocab_size)
        if state.recon_losses:
            loss = loss + weight * torch.stack(state.recon_losses).mean()
        return loss


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn, device) -> float:
    gc.collect()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(variants: dict, reps: int, warmup: int, device, log=None, min_time: float = 0.0,
                max_reps: int = 100) -> dict:
    """Run every variant `warmup` times, then rounds that each run every variant once (order reversed on odd
    rounds, so drift and neighbours hit all variants alike): at least `reps` rounds, and more while the timed rounds
    have taken less than `min_time` seconds (at most `max_reps`). Returns `{name: [seconds, ...]}`."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times = {name: [] for name in names}
    spent, rep = 0.0, 0
    while rep < reps or (spent < min_time and rep < max_reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            times[name].append(time_once(variants[name], device))
            spent += times[name][-1]
        rep += 1
        if log:
            log(f"  round {rep}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.1f} ms" for n in names))
    return times


def median(values):
    return statistics.median(values)


def paired_ratio(times: dict, top: str, bottom: str) -> float:
    """Median over rounds of `time[top] / time[bottom]` measured in the same round: the machine's slow phases
    (this VM shares its cores) hit both runs of a round, so the per-round ratio cancels them."""
    return statistics.median(t / b for t, b in zip(times[top], times[bottom]))


def spread(values):
    """Half the inter-quartile range relative to the median (a robust noise figure), in percent."""
    if len(values) < 4:
        return (max(values) - min(values)) / 2 / median(values) * 100
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / 2 / median(values) * 100


# --------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------


def peak_memory(fn, device) -> tuple[int, object]:
    """Peak bytes allocated *above the level at the call* while `fn()` runs (activations, KV cache, temporaries;
    the weights and inputs already resident are excluded), and `fn`'s result.

    CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus `memory_allocated` before.
    CPU: torch has no allocator statistics for CPU, so we run `fn` under `torch.profiler` with
    `profile_memory=True`, which records every CPU allocation and free made by torch's allocator with its size
    and time stamp; the running sum of those records, in time order, is the live-bytes curve and its maximum is
    the peak (exact for tensor memory; Python objects and allocator slack are not counted).
    """
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, result
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    records = sorted(
        ((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
         if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU),
    )
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak, result


@contextlib.contextmanager
def _stderr_silenced():
    """Silence file descriptor 2 (the profiler backend prints start/stop lines from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# --------------------------------------------------------------------------------------------------------------
# Command line, environment, output
# --------------------------------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="model shapes (random weights); default: tiny on cpu, 2b on cuda")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--vision-depth", type=int, default=None, help="override the number of vision blocks")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads; default 1 on cpu (stable on a shared machine), untouched on cuda")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of every variant first")
    parser.add_argument("--min-time", type=float, default=None,
                        help="keep adding timed rounds until a group of variants has run this many seconds "
                             "(default 20 on cpu, 10 on cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--quiet", action="store_true", help="do not print every round")
    return parser


def finish_args(args):
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.size is None:
        args.size = "2b" if args.device == "cuda" else "tiny"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    if args.min_time is None:
        args.min_time = 10.0 if args.device == "cuda" else 20.0
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    return args


def environment(args) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": args.device,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_header(title: str, args, built: Built | None = None, extra: dict | None = None):
    env = environment(args)
    print(f"== {title}")
    print("   " + ", ".join(f"{k} {v}" for k, v in env.items()))
    if built is not None:
        d = built.description
        print(f"   model {d['size']} ({d['params_M']} M params): text {d['text']}; vision {d['vision']}")
        print(f"   vedas {d['vedas']}")
    for key, value in (extra or {}).items():
        print(f"   {key}: {value}")


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path, payload):
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        print(f"wrote {path}")


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"target {sign} {target:g}: {'MET' if ok else 'MISSED'}"
