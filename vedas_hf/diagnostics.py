"""What the Vedas components do in a trained model: router gates, the share of tokens refined, the effect of switching
the routers off, and the cross-entropy of held-out records.

    diagnostics = router_diagnostics(model, processor, test_records, args)   # a JSON-ready dict
    with routers_disabled(model):                                            # every gate e(d) at 0, restored after
        ...
"""

import contextlib

import torch

from .data import IGNORE_INDEX, VedasDataCollator, chat_prompt, prompt_messages


def _routers(model) -> dict:
    """`{decoder layer index: VedasRouter}` of a Vedas model (under a PEFT wrapper too), found by class name so
    remote-code models count."""
    found = {}
    for module in model.modules():
        router = getattr(module, "router", None)
        if type(router).__name__ == "VedasRouter" and hasattr(module, "layer_idx"):
            found[module.layer_idx] = router
    return dict(sorted(found.items()))


def gate_magnitudes(model) -> dict:
    """Mean |e(d)| per routed layer and depth: `{layer index: [mean |gate| of depth 1, ...]}`. All zero for a freshly
    converted checkpoint (eq. 12's gate starts at zero)."""
    return {layer: router.gate.detach().abs().float().mean(dim=-1).tolist()
            for layer, router in _routers(model).items()}


@contextlib.contextmanager
def routers_disabled(model):
    """Inside the block every router gate is zero, so each routed layer is the stock layer (eq. 12 adds nothing);
    the gates are restored on exit, also after an error."""
    routers = list(_routers(model).values())
    saved = [router.gate.detach().clone() for router in routers]
    try:
        with torch.no_grad():
            for router in routers:
                router.gate.zero_()
        yield model
    finally:
        with torch.no_grad():
            for router, gate in zip(routers, saved):
                router.gate.copy_(gate)


def refined_share(config, prompt_lengths, visual_counts, num_latent_steps: int) -> dict:
    """Share of the implicit-phase tokens (prompt, replayed tokens and latents) that each routed layer refines.

    Routing picks `min(alpha(l), n)` of the `n` valid tokens of each chunk: the prompt is one chunk, each latent
    step another (its replayed visual tokens plus the latent); a step replays `replay_top_k` unvisited visual tokens,
    or those left.

    Args:
        config: the Vedas config.
        prompt_lengths, visual_counts: per sample, the prompt's token count (with `<|start-latent|>`) and its visual
            tokens.
    Returns:
        `{layer index: share}` and `"mean"` over the routed layers (0.0 without routers).
    """
    replay = config.replay_top_k if config.replay_mode != "none" else 0
    shares = {}
    for layer in config.router_layer_indices:
        alpha = config.router_alpha(layer)
        refined = total = 0
        for length, visual in zip(prompt_lengths, visual_counts):
            chunks = [length]
            for step in range(num_latent_steps):
                replayed = max(0, min(replay, visual - step * replay))
                if config.replay_mode == "soft_mix":
                    replayed = min(replayed, 1)
                chunks.append(replayed + 1)
            refined += sum(min(alpha, n) for n in chunks)
            total += sum(chunks)
        shares[layer] = refined / total if total else 0.0
    shares["mean"] = sum(shares.values()) / len(shares) if shares else 0.0
    return shares


@torch.no_grad()
def heldout_cross_entropy(model, processor, records, args, batch_size: int = 32) -> float:
    """Mean per-token cross-entropy of `records`' targets (remaining reasoning steps and answer) rendered as
    training renders them at the schedule's last stage (`args`, a `VedasSFTConfig`), in eval mode."""
    from .trainer import StageRenderer

    renderer = StageRenderer(records, processor, args, stage=args.last_stage)
    collator = VedasDataCollator(processor)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(records), batch_size):
            batch = collator([renderer.example(i) for i in range(start, min(start + batch_size, len(records)))])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            out = model(**batch, use_cache=False)
            total += float(out.get("ce_loss", out.loss)) * tokens
            count += tokens
    finally:
        model.train(was_training)
    return total / max(count, 1)


def prompt_statistics(processor, records, config) -> tuple[list, list]:
    """Per record: the prompt's token count as `generate` runs it (with `<|start-latent|>` when the config has
    one) and its number of visual tokens."""
    lengths, visual = [], []
    marker = 1 if config.start_latent_token_id is not None else 0
    for record in records:
        prompt = chat_prompt(processor, prompt_messages(record))
        inputs = processor(text=[prompt], images=record["images"] or None, return_tensors="pt")
        lengths.append(inputs["input_ids"].shape[1] + marker)
        visual.append(int((inputs["input_ids"] == config.image_token_id).sum()))
    return lengths, visual


def router_diagnostics(model, processor, records, args, *, num_latent_steps: int, evaluate_kwargs=None,
                       accuracy: float | None = None) -> dict:
    """Router diagnostics on held-out `records`: mean |e(d)| per layer, the share of implicit-phase tokens refined,
    and test cross-entropy and accuracy with the routers on and switched off (`routers_disabled`).

    Args:
        args: the `VedasSFTConfig` the model was trained with (how records are rendered for the cross-entropy).
        num_latent_steps: latent steps at inference.
        evaluate_kwargs: extra keyword arguments of `vedas_hf.eval.evaluate` (e.g. `batch_size`).
        accuracy: the accuracy with the routers on, when the caller has just measured it with the same settings
            (skips evaluating again).
    """
    from .data import NormalizedRecords
    from .eval import evaluate
    from .trainer import base_model

    config = base_model(model).config
    gates = gate_magnitudes(model)
    normalized = NormalizedRecords(records, require_steps=False)
    lengths, visual = prompt_statistics(processor, normalized, config)
    kwargs = {"progress": False, **(evaluate_kwargs or {})}
    result = {
        "gate_abs_mean": gates,
        "gate_abs_mean_all": (sum(sum(v) / len(v) for v in gates.values()) / len(gates)) if gates else 0.0,
        "refined_share": refined_share(config, lengths, visual, num_latent_steps),
        "ce": heldout_cross_entropy(model, processor, records, args),
    }
    if accuracy is None:
        accuracy = evaluate(model, processor, records, num_latent_steps=num_latent_steps, **kwargs)["accuracy"]
    result["accuracy"] = accuracy
    with routers_disabled(model):
        result["ce_routers_off"] = heldout_cross_entropy(model, processor, records, args)
        result["accuracy_routers_off"] = evaluate(model, processor, records, num_latent_steps=num_latent_steps,
                                                  **kwargs)["accuracy"]
    return result


__all__ = [
    "gate_magnitudes", "heldout_cross_entropy", "prompt_statistics", "refined_share", "router_diagnostics",
    "routers_disabled",
]
