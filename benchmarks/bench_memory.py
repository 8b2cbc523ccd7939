"""Peak memory of the Vedas latent phase vs a stock prefill, and of the naive (attention-map) loop, vs prompt length.

    python benchmarks/bench_memory.py [--device cpu|cuda] [--dtype float32|bfloat16] [--json out.json] ...

At each prompt length (one image + filler text), with the same weights:
  stock  : `generate(max_new_tokens=1, num_latent_steps=0)`: the stock prefill (+ one token).
  vedas  : `generate(max_new_tokens=1, num_latent_steps=T_r)`: routed prefill, T_r KV-cached latent steps with
           visual replay (saliency from the cached keys), `<|end-latent|>`, one token.
  naive  : the paper authors' loop (`_common.NaiveReference`): T_r + 1 full recomputations with eager attention
           and `output_attentions=True` (all L layers' (B, H, S, S) maps alive at once), then one token.
Memory is the peak allocated *above what is resident before the call* (weights and inputs excluded), measured with
`torch.cuda.max_memory_allocated` on GPU and with the torch profiler's allocation records on CPU (see
`_common.peak_memory`). Weights are printed separately.
"""

import math

from _common import (
    NaiveReference,
    base_parser,
    build_model,
    finish_args,
    model_bytes,
    peak_memory,
    print_header,
    prompt_batch,
    table,
    verdict,
    write_json,
)

import torch


MB = 2**20
OOM_ERRORS = (torch.cuda.OutOfMemoryError,)  # torch.OutOfMemoryError is the same class where it exists


def main():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="prompt lengths in tokens; default 512 1024 2048 (tiny/small), 1024 4096 8192 (2b)")
    parser.add_argument("--latent-steps", type=int, default=4, help="T_r")
    parser.add_argument("--top-k", type=int, default=32, help="K")
    parser.add_argument("--router-top-k", type=int, default=32, help="alpha")
    parser.add_argument("--visual-tokens", type=int, default=None, help="default 256 (tiny/small), 1024 (2b)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-naive", action="store_true")
    args = finish_args(parser.parse_args())
    if args.lengths is None:
        args.lengths = [1024, 4096, 8192] if args.size == "2b" else [512, 1024, 2048]
    if args.visual_tokens is None:
        args.visual_tokens = 1024 if args.size == "2b" else 256

    built = build_model(args, with_naive=not args.no_naive, num_latent_steps=args.latent_steps,
                        replay_top_k=args.top_k, router_top_k=args.router_top_k)
    model = built.model
    naive = None if args.no_naive else NaiveReference(built.naive)
    steps = args.latent_steps
    base = prompt_batch(built, args.batch, device=args.device)
    base_len = base["input_ids"].shape[1]
    text = model.config.text_config
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    print_header("bench_memory", args, built, {
        "prompt": f"one {built.image_side}x{built.image_side} image ({built.visual_tokens} visual tokens) + filler "
                  f"text, batch {args.batch}, T_r={steps}, K={args.top_k}",
        "weights": f"{model_bytes(model) / MB:.1f} MiB (not counted below)",
        "method": "torch.cuda.max_memory_allocated" if args.device == "cuda"
                  else "torch.profiler(profile_memory=True) allocation records, running sum, max",
    })

    def run(kind, inputs):
        with torch.no_grad():
            if kind == "naive":
                return naive.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                      inputs["image_grid_thw"], inputs["mm_token_type_ids"], steps, 1)
            return model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                                  num_latent_steps=0 if kind == "stock" else steps)

    kinds = ["stock", "vedas"] + ([] if naive is None else ["naive"])
    results = []
    for length in args.lengths:
        if length < base_len:
            raise SystemExit(f"--lengths {length} is below the image prompt length {base_len}")
        inputs = prompt_batch(built, args.batch, filler_tokens=length - base_len, device=args.device)
        row = {"length": length}
        for kind in kinds:
            try:
                run(kind, inputs)  # warmup (lazy buffers, allocator)
                peak, _ = peak_memory(lambda: run(kind, inputs), args.device)
                row[kind] = peak
            except OOM_ERRORS:
                row[kind] = None
                torch.cuda.empty_cache()
        # the attention maps alone that output_attentions keeps for the last full pass of the naive loop
        final = length + 1 + steps * (args.top_k + 1)
        row["naive_maps_theory"] = text.num_hidden_layers * text.num_attention_heads * final**2 * element * args.batch
        results.append(row)
        if not args.quiet:
            print("  " + ", ".join(f"{k} {v / MB:.1f} MiB" if isinstance(v, int) and k != "length" else f"{k} {v}"
                                   for k, v in row.items()))

    def fmt(value):
        return "OOM" if value is None else f"{value / MB:.1f}"

    rows, ratios = [], {}
    for row in results:
        if row["stock"] is None or row["vedas"] is None:
            raise SystemExit(f"out of memory at {row['length']} tokens without the naive loop: {row}")
        vs = row["vedas"] / row["stock"]
        cells = [row["length"], fmt(row["stock"]), fmt(row["vedas"]), f"{vs:.3f}"]
        ratios[f"vedas_over_stock_{row['length']}"] = vs
        if naive is not None:
            ns = None if row["naive"] is None else row["naive"] / row["stock"]
            cells += [fmt(row["naive"]), "OOM" if ns is None else f"{ns:.2f}", fmt(row["naive_maps_theory"])]
            if ns is not None:
                ratios[f"naive_over_stock_{row['length']}"] = ns
        rows.append(cells)
    headers = ["prompt tokens", "stock MiB", "vedas MiB", "vedas/stock"]
    if naive is not None:
        headers += ["naive MiB", "naive/stock", "naive maps (theory) MiB"]
    print()
    print(table(headers, rows))
    print()

    worst = max(ratios[f"vedas_over_stock_{r['length']}"] for r in results)
    lines = [f"vedas/stock peak memory, worst over lengths: {worst:.3f}x ({verdict(worst, 1.15, False)})"]
    ratios["vedas_over_stock_worst"] = worst
    first, last = results[0], results[-1]
    if last["length"] != first["length"]:  # the trend needs two lengths
        drift = ratios[f"vedas_over_stock_{last['length']}"] / ratios[f"vedas_over_stock_{first['length']}"]
        growth = math.log(last["length"] / first["length"])
        lines += [
            f"vedas/stock at {last['length']} vs {first['length']} tokens: {drift:.3f}x (flat = 1.0)",
            f"peak growth exponent {first['length']}->{last['length']} tokens: "
            f"stock {math.log(last['stock'] / first['stock']) / growth:.2f}, "
            f"vedas {math.log(last['vedas'] / first['vedas']) / growth:.2f}"
            + ("" if naive is None or last["naive"] is None or first["naive"] is None else
               f", naive {math.log(last['naive'] / first['naive']) / growth:.2f} (1 = linear, 2 = quadratic)"),
        ]
        ratios["vedas_over_stock_drift"] = drift
    print("\n".join(lines))
    print("RATIOS: " + ", ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    write_json(args.json, {"benchmark": "memory", "args": vars(args), "model": built.description,
                           "weights_bytes": model_bytes(model), "results_bytes": results, "ratios": ratios})


if __name__ == "__main__":
    main()
