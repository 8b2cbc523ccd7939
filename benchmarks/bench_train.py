"""Time per optimizer step at the final curriculum stage (T_r latents) vs a stock SFT step vs the naive recompute.

    python benchmarks/bench_train.py [--device cpu|cuda] [--dtype float32|bfloat16] [--json out.json] ...

One batch of the bundled digit-arithmetic task (`vedas_hf.toy.make_digit_arithmetic`, real handwritten digits)
rendered at stage T_r by `vedas_hf.data.build_stage_example` and collated by `VedasDataCollator` (what
`VedasSFTTrainer` feeds the model; its `compute_loss` is `model(**inputs)` plus logging). Each variant is
`zero_grad -> loss = ... -> loss.backward() -> AdamW.step()` on the same parameters:
  stock  : the same token sequence with every `<|latent|>` replaced by an ordinary text token, so the model runs
           the stock Qwen2-VL forward: one pass, no latents (a stock SFT step on the same tokens).
  vedas  : `model(**batch)`: the KV-cached latent forward (routed prefill, T_r cached passes of K replayed tokens
           + 1 latent, then the rest), CE + lambda * reconstruction loss (eq. 13).
  vedas (recon off): the same with lambda = 0 (no crop re-encoding), to show where the time goes.
  vedas (crop N px): with `--recon-crop-size N`, the same with the crops resized to N x N pixels instead of their
           image's size before re-encoding (`recon_crop_size`, a config field; default off).
  vedas (checkpointing): `vedas` with activation checkpointing on every decoder layer and vision block (what
           `gradient_checkpointing=True`, TRL's default, does): each layer is re-run in the backward pass.
  naive  : the paper authors' approach (`_common.NaiveReference.train_forward`): every latent pass re-runs the
           whole growing sequence with eager attention and `output_attentions=True`, then a final full pass;
           same routing, replay and reconstruction loss.

Then the peak memory of forward + backward above what is resident (weights, gradients, optimizer state, inputs) for
stock and vedas, each with and without activation checkpointing (`_common.peak_memory`).
"""

from _common import (
    NaiveReference,
    base_parser,
    build_model,
    finish_args,
    interleaved,
    median,
    paired_ratio,
    peak_memory,
    print_header,
    spread,
    table,
    verdict,
    write_json,
)

import torch


def training_batch(built, args):
    from vedas_hf.data import VedasDataCollator, build_stage_example, normalize_record
    from vedas_hf.toy import make_digit_arithmetic

    records, _ = make_digit_arithmetic(args.batch, 1, seed=args.seed, digit_size=args.digit_size, rows=1)
    processor = built.processor
    examples = [
        build_stage_example(normalize_record(record, i, max_steps=args.latent_steps), args.latent_steps,
                            processor=processor, max_latent_stage=args.latent_steps)
        for i, record in enumerate(records)
    ]
    batch = VedasDataCollator(processor)(examples)
    config = built.model.config
    dtype = next(built.model.parameters()).dtype
    batch = {k: (v.to(args.device, dtype) if k == "pixel_values" else v.to(args.device)) for k, v in batch.items()}
    stock = dict(batch)
    filler = processor.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    stock["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == config.latent_token_id, filler)
    return batch, stock


def main():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--latent-steps", type=int, default=4, help="T_r (final curriculum stage)")
    parser.add_argument("--top-k", type=int, default=32, help="K")
    parser.add_argument("--router-top-k", type=int, default=32, help="alpha")
    parser.add_argument("--batch", type=int, default=8, help="per-device batch (paper: 8)")
    parser.add_argument("--digit-size", type=int, default=None,
                        help="digit tile side in pixels (3 digits per image); default 64 (tiny/small), 224 (2b)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--reps", type=int, default=None, help="minimum timed rounds; default 5 on cpu, 10 on cuda")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--no-recon-variant", action="store_true", help="skip the lambda = 0 variant")
    parser.add_argument("--no-checkpointing-variant", action="store_true",
                        help="skip the activation-checkpointing variant and the memory table")
    parser.add_argument("--recon-crop-size", type=int, default=None,
                        help="add a variant with recon_crop_size=N (crops re-encoded at N x N px), e.g. 64 on "
                             "tiny/small, 224 on 2b")
    args = finish_args(parser.parse_args())
    if args.digit_size is None:
        args.digit_size = 224 if args.size == "2b" else 64
    if args.reps is None:
        args.reps = 10 if args.device == "cuda" else 5
    cell = 28 if args.size == "2b" else 8
    args.visual_tokens = (3 * args.digit_size // cell + 1) * (args.digit_size // cell + 1)  # processor cap

    built = build_model(args, with_naive=not args.no_naive, num_latent_steps=args.latent_steps,
                        replay_top_k=args.top_k, router_top_k=args.router_top_k)
    model = built.model.train()
    naive = None
    if not args.no_naive:
        built.naive.train()
        naive = NaiveReference(built.naive)
    batch, stock_batch = training_batch(built, args)
    config = model.config
    visual = int((batch["input_ids"][0] == config.image_token_id).sum())
    latents = int((batch["input_ids"][0] == config.latent_token_id).sum())
    print_header("bench_train", args, built, {
        "batch": f"{args.batch} x {batch['input_ids'].shape[1]} tokens ({visual} visual, {latents} latents), "
                 f"K={args.top_k}, lambda={config.recon_loss_weight}",
        "step": "zero_grad + forward + backward + AdamW.step",
        "timing": f"{args.warmup} warmup + interleaved rounds (>= {args.reps}, until >= {args.min_time:g} s), median",
    })
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    weight, crop_size = config.recon_loss_weight, config.recon_crop_size
    crop_name = f"vedas (crop {args.recon_crop_size} px)"
    config.check_recon_crop_size(args.recon_crop_size)  # a clear error before timing

    def stock_loss():
        return model(**stock_batch).loss

    def vedas_loss():
        return model(**batch).loss

    def vedas_no_recon_loss():
        config.recon_loss_weight = 0.0
        try:
            return model(**batch).loss
        finally:
            config.recon_loss_weight = weight

    def vedas_crop_loss():
        config.recon_crop_size = args.recon_crop_size
        try:
            return model(**batch).loss
        finally:
            config.recon_crop_size = crop_size

    def naive_loss():
        return naive.train_forward(**batch)

    checkpointed_layers = enable_checkpointing(model)

    def checkpointed(loss_fn):
        def run():
            set_checkpointing(checkpointed_layers, True)
            try:
                return loss_fn()
            finally:
                set_checkpointing(checkpointed_layers, False)

        return run

    def step(loss_fn):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss

    # consistency (no optimizer step): the naive recompute computes the same loss
    checks = {}
    cached = vedas_loss().item()
    checks["vedas_loss"] = cached
    if naive is not None:
        reference = naive_loss().item()
        checks["naive_loss"] = reference
        checks["abs_diff"] = abs(cached - reference)
    print("   check: " + ", ".join(f"{k} {v:.6g}" for k, v in checks.items()))

    variants = {"stock": lambda: step(stock_loss), "vedas": lambda: step(vedas_loss)}
    if not args.no_recon_variant:
        variants["vedas (recon off)"] = lambda: step(vedas_no_recon_loss)
    if args.recon_crop_size is not None:
        variants[crop_name] = lambda: step(vedas_crop_loss)
    if not args.no_checkpointing_variant:
        variants["vedas (checkpointing)"] = lambda: step(checkpointed(vedas_loss))
    if naive is not None:
        variants["naive"] = lambda: step(naive_loss)
    times = interleaved(variants, args.reps, args.warmup, args.device, min_time=args.min_time,
                        log=None if args.quiet else print)
    med = {name: median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    rows = [[name, len(times[name]), f"{med[name] * 1e3:.1f}", f"{best[name] * 1e3:.1f}", f"{spread(times[name]):.1f}",
             f"{med[name] / med['stock']:.2f}"] for name in variants]
    print()
    print(table(["variant", "rounds", "median ms/step", "min ms", "+-% (IQR/2)", "x stock"], rows))
    print()
    ratios, lines = {}, []

    def add(key, label, top, bottom, target=None, higher=False):
        ratios[key] = paired_ratio(times, top, bottom)
        ratios[key + "_of_medians"] = med[top] / med[bottom]
        ratios[key + "_of_minima"] = best[top] / best[bottom]
        check = f"; {verdict(ratios[key], target, higher)}" if target is not None else ""
        lines.append(f"{label}: {ratios[key]:.2f}x (paired per-round median; ratio of medians "
                     f"{ratios[key + '_of_medians']:.2f}x, of minima {ratios[key + '_of_minima']:.2f}x{check})")

    add("vedas_over_stock", "vedas/stock time per step", "vedas", "stock", 1.8)
    if "vedas (recon off)" in med:
        add("vedas_no_recon_over_stock", "vedas (recon off)/stock time per step", "vedas (recon off)", "stock")
    if crop_name in med:
        add("vedas_crop_over_stock", f"{crop_name}/stock time per step", crop_name, "stock", 1.8)
    if "vedas (checkpointing)" in med:
        add("vedas_checkpointing_over_vedas", "vedas (checkpointing)/vedas time per step", "vedas (checkpointing)",
            "vedas")
    if naive is not None:
        add("naive_over_vedas", "naive/vedas time per step", "naive", "vedas", 2, True)
    memory = {}
    if not args.no_checkpointing_variant:
        memory = step_memory(args, model, stock_loss, vedas_loss, checkpointed)
        ratios["vedas_checkpointing_memory_over_vedas"] = memory["vedas (checkpointing)"] / memory["vedas"]
        ratios["vedas_memory_over_stock"] = memory["vedas"] / memory["stock"]
        ratios["checkpointed_vedas_memory_over_stock"] = memory["vedas (checkpointing)"] / memory["stock (checkpointing)"]
        lines.append(f"peak forward+backward memory, vedas with/without checkpointing: "
                     f"{ratios['vedas_checkpointing_memory_over_vedas']:.3f}x; vedas/stock: "
                     f"{ratios['vedas_memory_over_stock']:.2f}x without checkpointing, "
                     f"{ratios['checkpointed_vedas_memory_over_stock']:.2f}x with")
    print("\n".join(lines))
    headline = {k: v for k, v in ratios.items() if not k.endswith(("_of_medians", "_of_minima"))}
    print("RATIOS: " + ", ".join(f"{k}={v:.2f}" for k, v in headline.items()))
    write_json(args.json, {"benchmark": "train", "args": vars(args), "model": built.description,
                           "seq_len": batch["input_ids"].shape[1], "checks": checks, "times_s": times,
                           "median_s": med, "min_s": best, "peak_forward_backward_bytes": memory, "ratios": ratios})


def enable_checkpointing(model) -> list:
    """Turn activation checkpointing on once (non-reentrant, the transformers default) to install the checkpoint
    function, then off again; returns the modules whose `gradient_checkpointing` flag switches it per variant."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    set_checkpointing(layers, False)
    return layers


def set_checkpointing(layers, on: bool):
    for layer in layers:
        layer.gradient_checkpointing = on


def step_memory(args, model, stock_loss, vedas_loss, checkpointed) -> dict:
    """Peak bytes of forward + backward above the resident level, per variant; prints a table.

    The gradients stay allocated (zeroed in place) and the optimizer step is left out, so the peak is what the
    variants differ in: activations kept for the backward pass, the KV cache, temporaries."""
    variants = {"stock": stock_loss, "stock (checkpointing)": checkpointed(stock_loss), "vedas": vedas_loss,
                "vedas (checkpointing)": checkpointed(vedas_loss)}

    def forward_backward(loss_fn):
        loss_fn().backward()

    memory = {}
    for name, loss_fn in variants.items():
        model.zero_grad(set_to_none=False)
        memory[name] = peak_memory(lambda: forward_backward(loss_fn), args.device)[0]
    rows = [[name, f"{value / 2**20:.1f}", f"{value / memory['stock']:.2f}"] for name, value in memory.items()]
    print()
    print(table(["variant", "peak fwd+bwd MiB", "x stock"], rows))
    print()
    return memory


if __name__ == "__main__":
    main()
